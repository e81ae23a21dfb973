"""The reference encoder-decoder: fairseq's transformer, BART and mBART in one readable file (inference).

Shapes: B batch, S source length, T target length, C model width, H heads, D head width, V vocabulary.
Tokens are fairseq dictionary ids; sources are left-padded with `pad`, as fairseq batches them.
Parameter names follow fairseq's (upgraded) state-dict names, so the weight map stays short.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fairport.errors import FairportError
from fairport.reference.config import ModelConfig
from fairport.reference.hub import HubMixin


def gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


# fairseq.utils.get_activation_fn; gelu runs in fp32 as fairseq's does
ACTIVATIONS = {
    "relu": F.relu,
    "relu_squared": lambda x: F.relu(x).pow(2),
    "gelu": lambda x: F.gelu(x.float()).type_as(x),
    "gelu_fast": gelu_accurate,
    "gelu_accurate": gelu_accurate,
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "swish": F.silu,
}


def make_positions(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """fairseq.utils.make_positions: non-pad tokens count from pad+1; pads keep position `pad`."""
    mask = tokens.ne(pad).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad


def sinusoidal_table(num: int, dim: int, pad: int) -> torch.Tensor:
    """fairseq's SinusoidalPositionalEmbedding.get_embedding (tensor2tensor layout: sin | cos)."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -step)
    angles = torch.arange(num, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    table[pad, :] = 0
    return table


def _onednn_linear_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


class PackedWeight:
    """A (N, K) weight also held in oneDNN's blocked layout, for CPU fp32/bf16 matrix products: measured
    2.3-4x faster than torch's default CPU path at every row count incremental decoding uses, 1 to 512 rows
    (`fairport bench` reports the machine's numbers). It costs a second copy of the weight. The copy is used
    only while the weight it was made from is unchanged: same memory, same version counter (in-place edits
    through `.data` bypass the counter: call `model.pack()` again after those)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.key = self.key_of(weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    @staticmethod
    def key_of(weight: torch.Tensor | None) -> tuple | None:
        return None if weight is None else (weight.data_ptr(), weight._version, weight.dtype, weight.shape)

    def fits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
        return (x.device.type == "cpu" and x.dtype == weight.dtype and self.key == self.key_of(weight)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")


def _int8_linear_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and ("x86" in engines or "fbgemm" in engines)


class Int8Weight:
    """A (N, K) weight (with its bias) as int8 for dynamically quantized CPU products: each output row's
    weights scaled by its largest |value| (symmetric, per channel, as torch's per-channel observer does);
    the activations are quantized afresh at every call (7-bit range, as torch's dynamic Linear does on x86).
    Measured here 2.6-5.8x faster than the packed fp32 product at 1-40 rows (`fairport bench --dtype int8`);
    results move, and `fairport verify --dtypes int8` measures by how much. Used only while weight and bias
    are unchanged (see PackedWeight)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.key = (PackedWeight.key_of(weight), PackedWeight.key_of(bias))
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.5).clamp_min(torch.finfo(torch.float32).eps).double()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; this path is opt-in
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros(scale.shape, dtype=torch.long), 0, torch.qint8)
            self.params = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())

    def fits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32
                and self.key == (PackedWeight.key_of(weight), PackedWeight.key_of(bias))
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.params, True)  # bias is in self.params


PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# below this many weights a oneDNN call's fixed cost (~13 us measured) outweighs its faster product
PACK_MIN_NUMEL = 1 << 18
Prepared = PackedWeight | Int8Weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: Prepared | None) -> torch.Tensor:
    """F.linear, through the packed (oneDNN or int8) copy of the weight when there is a valid one."""
    if packed is not None and packed.fits(x, weight, bias):
        return packed(x, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that uses a PackedWeight or Int8Weight once `pack()` made one (see EncoderDecoder.pack)."""

    packed: Prepared | None = None

    def pack(self, min_numel: int = PACK_MIN_NUMEL, kind: type = PackedWeight) -> None:
        self.packed = kind(self.weight, self.bias) if self.weight.numel() >= min_numel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class LearnedPositions(nn.Embedding):
    def __init__(self, max_positions: int, dim: int, pad: int):
        super().__init__(max_positions + pad + 1, dim, padding_idx=pad)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return F.embedding(positions, self.weight, self.padding_idx)

    def at(self, position: int) -> torch.Tensor:  # one position's (C,) row, a view
        return self.weight[position]


class SinusoidalPositions(nn.Module):
    def __init__(self, max_positions: int, dim: int, pad: int):
        super().__init__()
        self.dim, self.pad = dim, pad
        self.register_buffer("table", sinusoidal_table(max_positions + pad + 1, dim, pad), persistent=False)

    def _cover(self, needed: int) -> None:
        if needed > self.table.size(0):  # fairseq grows the table on demand, computed in fp32
            self.table = sinusoidal_table(needed, self.dim, self.pad).to(self.table)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        self._cover(int(positions.max()) + 1 if positions.numel() else 0)
        return self.table[positions]  # the buffer follows model.to(dtype), as fairseq's does

    def at(self, position: int) -> torch.Tensor:  # one position's (C,) row, a view
        self._cover(position + 1)
        return self.table[position]


class Attention(nn.Module):
    """fairseq MultiheadAttention at inference: q scaled before q.k, softmax in fp32."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim**-0.5
        # fairseq scales q before q.k; when the scale is a power of two (head width 16, 64, 256, ...) the kernel
        # scaling q.k instead gives the same bits (checked by the tests), one multiplication fewer per call
        self.scale_in_kernel = math.frexp(self.scaling)[0] == 0.5
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(kv_dim, dim)
        self.v_proj = Linear(kv_dim, dim)
        self.out_proj = Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, D)
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(kv)), self.split(self.v_proj(kv))

    qkv_packed: Prepared | None = None
    qkv: tuple[torch.Tensor, torch.Tensor] | None = None  # the fused (3C, C) weight and (3C,) bias

    def pack_qkv(self, min_numel: int = PACK_MIN_NUMEL, kind: type = PackedWeight) -> None:
        w, b = self.fused_qkv()
        self.qkv_packed = kind(w, b) if w is not None and w.numel() >= min_numel else None

    def fuse_qkv(self) -> None:
        """Self-attention: put the q, k and v projections in one (3C, C) matrix (and one bias) that the three
        parameters become views of, so `project_qkv` is one matrix product. No memory is duplicated; if the
        parameters are later replaced (load_state_dict(assign=True), .data = ...), the separate path is used
        again (EncoderDecoder re-fuses after .to())."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = []
        for name in ("weight", "bias"):
            whole = torch.cat([getattr(p, name).detach() for p in projs])
            for p, part in zip(projs, whole.chunk(3)):
                getattr(p, name).data = part
            fused.append(whole)
        self.qkv = (fused[0], fused[1])

    def fused_qkv(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The fused weight and bias while the three projections are still views of them, else (None, None)."""
        if self.qkv is None:
            return None, None
        w, b = self.qkv
        ws, bs = w.numel() // 3 * w.element_size(), b.numel() // 3 * b.element_size()
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        if (q.weight.data_ptr(), k.weight.data_ptr(), v.weight.data_ptr(), q.bias.data_ptr(), k.bias.data_ptr(),
                v.bias.data_ptr()) != (w.data_ptr(), w.data_ptr() + ws, w.data_ptr() + 2 * ws, b.data_ptr(),
                                       b.data_ptr() + bs, b.data_ptr() + 2 * bs):
            return None, None
        return w, b

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention projections of x (B, T, C): q (B, T, C) unscaled, and keys and values side by side
        (B, T, 2, H, D), as LayerCache stores them (a view of the fused product: no copy)."""
        B, T, C = x.shape
        w, b = self.fused_qkv()
        if w is None:
            q, kv = self.q_proj(x), torch.stack([self.k_proj(x), self.v_proj(x)], dim=2)
        else:
            qkv = linear(x, w, b, self.qkv_packed)  # (B, T, 3C)
            q, kv = qkv[..., :C], qkv[..., C:]
        return q, kv.reshape(B, T, 2, self.heads, self.head_dim)

    @staticmethod
    def heads_first(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 2, H, D) -> k, v (B, H, T, D), views."""
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None, q: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, T, C); k, v (B, H, S, D); mask additive, broadcastable to (B, H, T, S); q: q_proj(x) if known
        # k/v may have fewer rows than x: then each k/v row serves G consecutive query rows (the beams
        # of one sentence share its cross-attention keys/values; they are never copied per beam)
        B, T, C = x.shape
        Bk, H, D = k.size(0), self.heads, self.head_dim
        G = B // Bk
        q = self.q_proj(x) if q is None else q
        if not self.scale_in_kernel:
            q = q * self.scaling
        # (B, T, C) -> (Bk, H, G*T, D): row b = bk*G + g of x is query g*T + t of key row bk (G = 1: the usual
        # (B, H, T, D)); a view when T == 1, as in incremental decoding
        q = q.view(Bk, G, T, H, D).permute(0, 3, 1, 2, 4).reshape(Bk, H, G * T, D)
        # softmax(q k^T + mask) v with q scaled as fairseq scales it; one fused kernel
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=self.scaling if self.scale_in_kernel else 1.0)  # (Bk, H, G*T, D)
        if mask is not None and mask.dim() == 4 and mask.size(-2) > 1:
            out = out.nan_to_num(0.0)  # a query whose keys are all padding attends to nothing (fairseq/torch)
        out = out.view(Bk, H, G, T, D).permute(0, 2, 3, 1, 4).reshape(B, T, C)
        return self.out_proj(out)  # (B, T, C)


def residual_block(x, norm: nn.LayerNorm, pre_norm: bool, fn):
    """x + fn(x) with the layer norm before (pre-norm) or after (post-norm) the residual sum."""
    y = fn(norm(x) if pre_norm else x)
    return x + y if pre_norm else norm(x + y)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.encoder_embed_dim
        self.pre_norm = cfg.encoder_normalize_before
        self.self_attn = Attention(C, cfg.encoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = Linear(C, cfg.encoder_ffn_dim)
        self.fc2 = Linear(cfg.encoder_ffn_dim, C)
        self.act = ACTIVATIONS[cfg.activation_fn]
        self.final_layer_norm = nn.LayerNorm(C)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # (B, S, C)
        def attend(h):
            q, kv = self.self_attn.project_qkv(h)
            return self.self_attn(h, *Attention.heads_first(kv), mask, q)

        x = residual_block(x, self.self_attn_layer_norm, self.pre_norm, attend)
        return residual_block(x, self.final_layer_norm, self.pre_norm, self.ffn)


class LayerCache:
    """One decoder layer's incremental state. Self-attention keys and values live side by side in one
    preallocated time-major buffer (capacity, 2, B, H, D): the first t steps are one contiguous block, a step
    writes its rows in place (one copy for both), and a beam reorder gathers rows into a spare buffer (one
    gather per step, no allocation; fairseq's concatenate-then-reorder copies k and v twice each).
    Cross-attention keys/values are computed once per source."""

    def __init__(self) -> None:
        self.kv: torch.Tensor | None = None  # (capacity, 2, B, H, D)
        self.spare: torch.Tensor | None = None
        self.len = 0
        self.cross_k: torch.Tensor | None = None  # (B, H, S, D)
        self.cross_v: torch.Tensor | None = None

    def _grow(self, need: int) -> None:
        new = self.kv.new_empty((max(32, 2 * need), *self.kv.shape[1:]))
        new[: self.len] = self.kv[: self.len]
        self.kv, self.spare = new, None

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the newest steps' keys and values (B, T, 2, H, D); returns all steps' k, v (B, H, t, D), views."""
        B, T, _, H, D = kv.shape
        if self.kv is None:
            self.kv = kv.new_empty((max(32, 2 * T), 2, B, H, D))
        elif self.len + T > self.kv.size(0):
            self._grow(self.len + T)
        self.kv[self.len: self.len + T] = kv.permute(1, 2, 0, 3, 4)
        self.len += T
        kv = self.kv[: self.len]  # (t, 2, B, H, D)
        return kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3)

    def reorder(self, order: torch.Tensor) -> None:
        """Beam search: keep the rows in `order` (self-attention only; cross k/v are per source)."""
        if self.kv is None:
            return
        t = self.len
        if order.numel() != self.kv.size(2):  # finished sentences left the batch: a buffer of the new size
            cap, _, _, H, D = self.kv.shape
            new = self.kv.new_empty((cap, 2, order.numel(), H, D))
            torch.index_select(self.kv[:t], 2, order, out=new[:t])
            self.kv, self.spare = new, None
            return
        if self.spare is None:
            self.spare = torch.empty_like(self.kv)
        torch.index_select(self.kv[:t], 2, order, out=self.spare[:t])
        self.kv, self.spare = self.spare, self.kv


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.decoder_embed_dim
        self.pre_norm = cfg.decoder_normalize_before
        self.self_attn = Attention(C, cfg.decoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.encoder_attn = Attention(C, cfg.decoder_heads, kv_dim=cfg.encoder_embed_dim)
        self.encoder_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = Linear(C, cfg.decoder_ffn_dim)
        self.fc2 = Linear(cfg.decoder_ffn_dim, C)
        self.act = ACTIVATIONS[cfg.activation_fn]
        self.final_layer_norm = nn.LayerNorm(C)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x, enc, enc_mask, self_mask, cache: LayerCache | None = None):
        # x (B, T, C); enc (B, S, C); enc_mask additive (B, 1, 1, S); self_mask additive (T, T) or None
        def self_attend(h):
            q, kv = self.self_attn.project_qkv(h)
            k, v = cache.append(kv) if cache is not None else Attention.heads_first(kv)
            return self.self_attn(h, k, v, self_mask, q)

        def cross_attend(h):
            if cache is not None and cache.cross_k is not None:
                k, v = cache.cross_k, cache.cross_v
            else:
                k, v = self.encoder_attn.project_kv(enc)
                if cache is not None:
                    cache.cross_k, cache.cross_v = k, v
            return self.encoder_attn(h, k, v, enc_mask)

        x = residual_block(x, self.self_attn_layer_norm, self.pre_norm, self_attend)
        x = residual_block(x, self.encoder_attn_layer_norm, self.pre_norm, cross_attend)
        return residual_block(x, self.final_layer_norm, self.pre_norm, self.ffn)


def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else scale * x  # times 1.0 changes nothing: one operation fewer per step


def _positions_module(learned: bool, max_positions: int, dim: int, pad: int) -> nn.Module:
    return (LearnedPositions if learned else SinusoidalPositions)(max_positions, dim, pad)


@dataclass
class EncoderOut:
    x: torch.Tensor  # (B, S, C)
    padding_mask: torch.Tensor  # (B, S) bool, True at pads

    @functools.cached_property
    def attn_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, S) additive mask, 0 or -inf at pads; None when nothing is padded. Computed once: the
        decoder reads it at every step."""
        if not self.padding_mask.any():
            return None
        m = torch.zeros(self.padding_mask.shape, dtype=self.x.dtype, device=self.x.device)
        return m.masked_fill(self.padding_mask, float("-inf"))[:, None, None, :]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        C = cfg.encoder_embed_dim
        self.pad = cfg.pad
        self.embed_scale = cfg.encoder_embed_scale
        self.embed_tokens = embed_tokens
        self.embed_positions = (_positions_module(cfg.encoder_learned_pos, cfg.max_source_positions, C, cfg.pad)
                                if cfg.positional_embeddings else None)
        self.layernorm_embedding = nn.LayerNorm(C) if cfg.layernorm_embedding else None
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(C) if cfg.encoder_final_norm else None

    def embed(self, src_tokens: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, C)
        x = scaled(self.embed_tokens(src_tokens), self.embed_scale)
        if self.embed_positions is not None:
            x = x + self.embed_positions(make_positions(src_tokens, self.pad))
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def forward(self, src_tokens: torch.Tensor, hiddens: dict | None = None) -> EncoderOut:
        """`hiddens`, when given, collects every stage's output (B, S, C) by name, for `fairport verify`."""
        padding_mask = src_tokens.eq(self.pad)  # (B, S)
        x = self.embed(src_tokens)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))  # fairseq zeroes pad rows
        out = EncoderOut(x, padding_mask)
        mask = out.attn_mask
        if hiddens is not None:
            hiddens["encoder.embed"] = x
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if hiddens is not None:
                hiddens[f"encoder.layers.{i}"] = x
        if self.layer_norm is not None:
            x = self.layer_norm(x)
            if hiddens is not None:
                hiddens["encoder.layer_norm"] = x
        out.x = x  # same padding, dtype and device: the mask computed above serves the decoder too
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        C = cfg.decoder_embed_dim
        self.pad = cfg.pad
        self.embed_scale = cfg.decoder_embed_scale
        self.embed_tokens = embed_tokens
        self.project_in_dim = (Linear(cfg.decoder_input_embed_dim, C, bias=False)
                               if cfg.decoder_input_embed_dim != C else None)
        self.embed_positions = (_positions_module(cfg.decoder_learned_pos, cfg.max_target_positions, C, cfg.pad)
                                if cfg.positional_embeddings else None)
        self.layernorm_embedding = nn.LayerNorm(C) if cfg.layernorm_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(C) if cfg.decoder_final_norm else None
        self.project_out_dim = (Linear(C, cfg.decoder_output_dim, bias=False)
                                if cfg.decoder_output_dim != C else None)
        self.output_projection = Linear(cfg.decoder_output_dim, cfg.tgt_vocab_size, bias=False)
        if cfg.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight

    def features(self, prev_output_tokens: torch.Tensor, enc: EncoderOut,
                 caches: list[LayerCache] | None = None, step: int | None = None,
                 hiddens: dict | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, C_out) features before the output projection.
        Incremental decoding: pass only the newest token (B, 1), its 0-based `step`, and `caches`."""
        x = scaled(self.embed_tokens(prev_output_tokens), self.embed_scale)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if self.embed_positions is not None:
            if step is None:
                x = x + self.embed_positions(make_positions(prev_output_tokens, self.pad))
            else:  # fairseq: the step's position is pad + 1 + step for every row (targets carry no padding)
                x = x + self.embed_positions.at(self.pad + 1 + step)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)

        T = x.size(1)
        self_mask = None
        if step is None:
            self_mask = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device), 1)
            pads = prev_output_tokens.eq(self.pad)
            if pads.any():  # fairseq also masks padded target keys
                self_mask = self_mask + torch.zeros(pads.shape, dtype=x.dtype, device=x.device).masked_fill(
                    pads, float("-inf"))[:, None, None, :]
        enc_mask = enc.attn_mask
        if hiddens is not None:
            hiddens["decoder.embed"] = x
        for i, layer in enumerate(self.layers):
            x = layer(x, enc.x, enc_mask, self_mask, caches[i] if caches is not None else None)
            if hiddens is not None:
                hiddens[f"decoder.layers.{i}"] = x
        if self.layer_norm is not None:
            x = self.layer_norm(x)
            if hiddens is not None:
                hiddens["decoder.layer_norm"] = x
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x

    def forward(self, prev_output_tokens, enc, caches=None, step=None) -> torch.Tensor:  # (B, T, V)
        x = self.features(prev_output_tokens, enc, caches, step)
        return self.output_projection(x)


class ClassificationHead(nn.Module):
    """BART sentence classification head: dense -> pooler activation -> out_proj."""

    def __init__(self, dim: int, inner_dim: int, num_classes: int, activation: str):
        super().__init__()
        self.dense = Linear(dim, inner_dim)
        self.act = ACTIVATIONS[activation]
        self.out_proj = Linear(inner_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.act(self.dense(x)))


class EncoderDecoder(HubMixin, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        enc_embed = nn.Embedding(cfg.src_vocab_size, cfg.encoder_embed_dim, padding_idx=cfg.pad)
        dec_embed = enc_embed if cfg.share_all_embeddings else nn.Embedding(
            cfg.tgt_vocab_size, cfg.decoder_input_embed_dim, padding_idx=cfg.pad)
        self.encoder = Encoder(cfg, enc_embed)
        self.decoder = Decoder(cfg, dec_embed)
        self.classification_heads = nn.ModuleDict({
            name: ClassificationHead(cfg.encoder_embed_dim, h["inner_dim"], h["num_classes"],
                                     cfg.pooler_activation_fn)
            for name, h in cfg.classification_heads.items()})

    def self_attentions(self) -> list[Attention]:
        return [layer.self_attn for layer in [*self.encoder.layers, *self.decoder.layers]]

    def fuse_qkv(self) -> "EncoderDecoder":
        """One matrix product for each self-attention's q, k, v (see Attention.fuse_qkv); load() does this."""
        for attn in self.self_attentions():
            attn.fuse_qkv()
        return self

    def pack(self, min_numel: int = PACK_MIN_NUMEL) -> "EncoderDecoder":
        """CPU, fp32/bf16: hold each linear layer's weight of at least `min_numel` values also in oneDNN's
        blocked layout (PackedWeight), a fused self-attention's q/k/v as one. load() does this on the CPU
        unless asked not to; other devices and dtypes: nothing to do. Moving the model (`.to(...)`) re-packs
        for where it lands."""
        self.unpack()
        p = next(self.parameters())
        if p.device.type == "cpu" and p.dtype in PACKABLE_DTYPES and _onednn_linear_available():
            try:
                self._prepare(PackedWeight, min_numel)
            except RuntimeError:  # this oneDNN build cannot pack this dtype here: torch's default path it is
                self.unpack()
        return self

    def quantize(self, min_numel: int = 0) -> "EncoderDecoder":
        """int8: every linear layer with at least `min_numel` weights (all by default, the output projection
        included; embeddings stay fp32) multiplies through an int8 copy of its weight, activations quantized
        per call (Int8Weight). CPU and float32 only; replaces the oneDNN copies. Undo with `unpack()`."""
        p = next(self.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise FairportError(f"int8 needs the model on the CPU in float32 (it is on {p.device}, {p.dtype})")
        if not _int8_linear_available():
            raise FairportError(f"int8: this torch ({torch.__version__}) has no quantized dynamic linear "
                                f"(engines: {torch.backends.quantized.supported_engines})")
        self.unpack()
        self._prepare(Int8Weight, min_numel)
        return self

    def _prepare(self, kind: type, min_numel: int) -> None:
        covered: set[int] = set()
        for m in self.modules():
            if isinstance(m, Attention):
                m.pack_qkv(min_numel, kind)
                if m.fused_qkv()[0] is not None:  # q/k/v run as one product, packed or not
                    covered |= {id(m.q_proj), id(m.k_proj), id(m.v_proj)}
        for m in self.modules():
            if isinstance(m, Linear) and id(m) not in covered:
                m.pack(min_numel, kind)
        self.prepared = (kind, min_numel)

    @property
    def packed(self) -> int | bool:
        """The min_numel the weights were packed for oneDNN with, or False."""
        kind, min_numel = getattr(self, "prepared", None) or (None, 0)
        return min_numel if kind is PackedWeight else False

    @property
    def quantized(self) -> bool:
        """True while the linear layers run through int8 copies (see quantize)."""
        kind, _ = getattr(self, "prepared", None) or (None, 0)
        return kind is Int8Weight

    def unpack(self) -> "EncoderDecoder":
        """Drop the packed (oneDNN or int8) copies: frees their memory; torch's default products are used."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = None
            elif isinstance(m, Attention):
                m.qkv_packed = None
        self.prepared: tuple[type, int] | None = None
        return self

    def _apply(self, fn, recurse=True):  # .to() / .float() / .cuda(): packed copies follow the weights
        prepared = getattr(self, "prepared", None)
        fused = all(attn.fused_qkv()[0] is not None for attn in self.self_attentions())
        self.unpack()
        for attn in self.self_attentions():
            attn.qkv = None
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse_qkv()
        if prepared is not None:
            kind, min_numel = prepared
            p = next(self.parameters())
            if kind is PackedWeight:
                self.pack(min_numel)
            elif p.device.type == "cpu" and p.dtype == torch.float32:  # int8 where it can be, else plain
                self.quantize(min_numel)
        return out

    def forward(self, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor,
                hiddens: dict | None = None) -> torch.Tensor:
        """(B, S) left-padded source ids, (B, T) decoder input ids -> (B, T, V) logits.
        `hiddens` (a dict) collects each stage's output by name: encoder.embed, encoder.layers.{i},
        encoder.layer_norm, decoder.embed, decoder.layers.{i}, decoder.layer_norm, decoder.logits."""
        enc = self.encoder(src_tokens, hiddens)
        logits = self.decoder.output_projection(self.decoder.features(prev_output_tokens, enc, hiddens=hiddens))
        if hiddens is not None:
            hiddens["decoder.logits"] = logits
        return logits

    def generate(self, src_tokens: torch.Tensor, seed: int | None = None, **opts) -> list[list[dict]]:
        """fairseq SequenceGenerator with fairseq's option names (see fairport.reference.generate):
        beam, lenpen, max_len_a, max_len_b, min_len, no_repeat_ngram_size, unkpen, temperature,
        prefix_tokens, match_source_len, sampling, sampling_topk, sampling_topp; `seed` seeds sampling."""
        from fairport.reference.generate import generate

        if seed is not None:
            torch.manual_seed(seed)
        return generate(self, src_tokens, **opts)

    def predict(self, head: str, src_tokens: torch.Tensor) -> torch.Tensor:
        """fairseq BART hub `predict(head, tokens, return_logits=True)`: the decoder reads the source
        shifted right (its last token first) and the head reads the state at the final </s>."""
        if head not in self.classification_heads:
            raise KeyError(f"no classification head {head!r}; this model has {list(self.classification_heads)}")
        tokens = src_tokens if src_tokens.dim() == 2 else src_tokens.unsqueeze(0)
        prev = tokens.clone()
        last = tokens.ne(self.config.pad).sum(dim=1) - 1
        prev[:, 0] = tokens.gather(1, last.unsqueeze(-1)).squeeze(-1)
        prev[:, 1:] = tokens[:, :-1]
        x = self.decoder.features(prev, self.encoder(tokens))  # (B, T, C)
        eos = tokens.eq(self.config.eos)
        sentence = x[eos, :].view(x.size(0), -1, x.size(-1))[:, -1, :]  # (B, C)
        return self.classification_heads[head](sentence)
