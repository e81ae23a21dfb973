"""The reference encoder-decoder: fairseq's transformer, BART and mBART in one readable file (inference only).

Follows fairseq's TransformerEncoder/TransformerDecoder and MultiheadAttention (fairseq 0.12,
fairseq/models/transformer/, fairseq/modules/multihead_attention.py). Every variant is a ModelConfig flag.
Shapes: B batch, S source length, T target length, C model width, H heads, D head width, V vocabulary.
Tokens are fairseq dictionary ids; sources are left-padded with `pad`, as fairseq batches them.
Parameter names follow fairseq's (upgraded) state-dict names, so the weight map is the identity.
Speed-ups that swap layers (fused q/k/v, oneDNN-packed and int8 weights) live in fast.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fairport.reference.config import ModelConfig


def residual_block(x: torch.Tensor, norm: nn.LayerNorm, pre_norm: bool, fn, *args) -> torch.Tensor:
    """x + fn(x, *args) with the layer norm before (pre-norm) or after (post-norm) the residual sum."""
    y = fn(norm(x) if pre_norm else x, *args)
    return x + y if pre_norm else norm(x + y)


class Attention(nn.Module):
    """fairseq MultiheadAttention at inference: q scaled before q.k, softmax over keys, no dropout."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim**-0.5
        # fairseq scales q before q.k; when the scale is a power of two (head width 16, 64, 256, ...) the kernel
        # scaling q.k instead gives the same bits (checked by the tests), one multiplication fewer per call
        self.scale_in_kernel = math.frexp(self.scaling)[0] == 0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, D), a view
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               fused: bool = True) -> torch.Tensor:
        """softmax(q k^T + mask) v, projected out. q (B, T, C) unscaled; k, v (Bk, H, S, D); mask additive,
        broadcastable to (Bk, H, T, S). k/v may have fewer rows than q: then each k/v row serves G = B / Bk
        consecutive query rows (the beams of one sentence share its cross-attention keys and values).
        `fused`: torch's fused attention kernel; else the same products and sums written out, which a compiler
        fuses into loops around them (the compiled step: at small sizes the fused kernel is an opaque call
        costing more than the whole product). k and v may be strided views either way."""
        B, T, C = q.shape
        Bk, H, D = k.size(0), self.heads, self.head_dim
        G = B // Bk
        if not self.scale_in_kernel or not fused:
            q = q * self.scaling
        # (B, T, C) -> (Bk, H, G*T, D): row b = bk*G + g of q is query g*T + t of key row bk (G = 1: the usual
        # (B, H, T, D)); a view when T == 1, as in incremental decoding
        q = q.view(Bk, G, T, H, D).permute(0, 3, 1, 2, 4).reshape(Bk, H, G * T, D)
        if fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 scale=self.scaling if self.scale_in_kernel else 1.0)
        else:
            scores = (q.unsqueeze(-2) * k.unsqueeze(2)).sum(-1)  # (Bk, H, G*T, S)
            if mask is not None:
                scores = scores + mask
            out = (torch.softmax(scores, dim=-1).unsqueeze(-1) * v.unsqueeze(2)).sum(-2)
        if mask is not None and mask.dim() == 4 and mask.size(-2) > 1:
            out = out.nan_to_num(0.0)  # a query whose keys are all padding attends to nothing (fairseq/torch)
        out = out.view(Bk, H, G, T, D).permute(0, 2, 3, 1, 4).reshape(B, T, C)
        return self.out_proj(out)  # (B, T, C)


class SelfAttention(Attention):
    """Attention of a sequence over itself; in incremental decoding its keys/values go to the layer's cache."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads)
        self.register_module("qkv_proj", None)  # fast.fuse_qkv: q, k and v as one (3C, C) projection

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, C) unscaled, and keys and values side by side (B, T, 2, H, D)."""
        B, T, C = x.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)  # (B, T, 3C)
            q, kv = qkv[..., :C], qkv[..., C:]
        else:
            q, kv = self.q_proj(x), torch.cat([self.k_proj(x), self.v_proj(x)], dim=-1)
        return q, kv.view(B, T, 2, self.heads, self.head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        q, kv = self.project_qkv(x)
        if cache is not None:  # incremental decoding: this step's keys/values join the earlier steps'
            k, v = cache.append(kv)
        else:
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, T, D) views
        return self.attend(q, k, v, mask)


class CrossAttention(Attention):
    """The decoder's attention over the encoder output; its keys/values are computed once per source."""

    def keys_values(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output (B, S, C) -> keys and values (B, H, S, D), once per source sentence."""
        return self.split(self.k_proj(enc)), self.split(self.v_proj(enc))

    def forward(self, x: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            k, v = self.keys_values(enc)
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        return self.attend(self.q_proj(x), k, v, mask)


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


def feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fc2(act(fc1(x))): a layer's position-wise feed-forward block (fairseq keeps fc1/fc2 on the layer)."""
    return layer.fc2(layer.act(layer.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.encoder_embed_dim
        self.pre_norm = cfg.encoder_normalize_before
        self.self_attn = SelfAttention(C, cfg.encoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = nn.Linear(C, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, C)
        self.act = ACTIVATIONS[cfg.activation_fn]
        self.final_layer_norm = nn.LayerNorm(C)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(self, x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # (B, S, C) -> (B, S, C)
        x = residual_block(x, self.self_attn_layer_norm, self.pre_norm, self.self_attn, mask)
        return residual_block(x, self.final_layer_norm, self.pre_norm, self.ffn)


class LayerCache:
    """One decoder layer's incremental state. Self-attention keys and values live side by side in one
    preallocated time-major buffer (capacity, 2, B, H, D): the first t steps are one contiguous block, a step
    writes its rows in place (one copy for both), and a beam reorder gathers rows into a spare buffer (one
    gather per step, no allocation; fairseq's concatenate-then-reorder copies k and v twice each).
    Cross-attention keys/values (B, H, S, D) are computed once per source sentence."""

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
        if self.kv is not None:
            self.kv, self.spare = gather_rows(self.kv, self.spare, self.len, 2, order)


def gather_rows(kv: torch.Tensor, spare: torch.Tensor | None, used: int, dim: int, order: torch.Tensor):
    """Keep the rows in `order` (along `dim`) of a time-major cache's first `used` slots, gathered into `spare`
    (made on first use), or into a buffer of the new size when sentences left the batch. Returns the new
    (cache, spare): the two buffers swap, so a step allocates nothing."""
    if order.numel() != kv.size(dim):
        new = kv.new_empty((*kv.shape[:dim], order.numel(), *kv.shape[dim + 1:]))
        torch.index_select(kv[:used], dim, order, out=new[:used])
        return new, None
    if spare is None:
        spare = torch.empty_like(kv)
    torch.index_select(kv[:used], dim, order, out=spare[:used])
    return spare, kv


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.decoder_embed_dim
        self.pre_norm = cfg.decoder_normalize_before
        self.self_attn = SelfAttention(C, cfg.decoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.encoder_attn = CrossAttention(C, cfg.decoder_heads, kv_dim=cfg.encoder_embed_dim)
        self.encoder_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = nn.Linear(C, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, C)
        self.act = ACTIVATIONS[cfg.activation_fn]
        self.final_layer_norm = nn.LayerNorm(C)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(self, x)

    def forward(self, x: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor | None,
                self_mask: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, C); enc (Bs, S, C) with Bs = B or B / beams; enc_mask additive (Bs, 1, 1, S); self_mask
        additive (T, T) (or (B, 1, T, T) with padded targets) or None (incremental decoding)."""
        x = residual_block(x, self.self_attn_layer_norm, self.pre_norm, self.self_attn, self_mask, cache)
        x = residual_block(x, self.encoder_attn_layer_norm, self.pre_norm, self.encoder_attn, enc, enc_mask, cache)
        return residual_block(x, self.final_layer_norm, self.pre_norm, self.ffn)


def make_positions(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """fairseq.utils.make_positions: non-pad tokens count from pad+1; pads keep position `pad`."""
    mask = tokens.ne(pad).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad


def sinusoidal_table(num: int, dim: int, pad: int) -> torch.Tensor:
    """fairseq's SinusoidalPositionalEmbedding.get_embedding (tensor2tensor layout: sin | cos), in fp32."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -step)
    angles = torch.arange(num, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    table[pad, :] = 0
    return table


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
        rows = max_positions + pad + 1
        # built on the meta device (as load() builds), the table is only a shape: load() computes it for real
        on_meta = torch.empty(0).is_meta  # where new tensors go now (torch.get_default_device needs torch 2.3)
        table = torch.empty(rows, dim) if on_meta else sinusoidal_table(rows, dim, pad)
        self.register_buffer("table", table, persistent=False)

    def _cover(self, needed: int) -> None:
        if needed > self.table.size(0):  # fairseq grows the table on demand, computed in fp32
            self.table = sinusoidal_table(needed, self.dim, self.pad).to(self.table)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        self._cover(int(positions.max()) + 1 if positions.numel() else 0)
        return self.table[positions]  # the buffer follows model.to(dtype), as fairseq's does

    def at(self, position: int) -> torch.Tensor:  # one position's (C,) row, a view
        self._cover(position + 1)
        return self.table[position]


def positions_module(learned: bool, max_positions: int, dim: int, pad: int) -> nn.Module:
    return (LearnedPositions if learned else SinusoidalPositions)(max_positions, dim, pad)


def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else scale * x  # times 1.0 changes nothing: one operation fewer per step


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
        self.embed_positions = (positions_module(cfg.encoder_learned_pos, cfg.max_source_positions, C, cfg.pad)
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

    def forward(self, src_tokens: torch.Tensor) -> EncoderOut:  # (B, S) -> (B, S, C)
        padding_mask = src_tokens.eq(self.pad)  # (B, S)
        x = self.embed(src_tokens)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))  # fairseq zeroes pad rows
        out = EncoderOut(x, padding_mask)
        mask = out.attn_mask
        for layer in self.layers:
            x = layer(x, mask)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        out.x = x  # same padding, dtype and device: the mask computed above serves the decoder too
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        C = cfg.decoder_embed_dim
        self.pad = cfg.pad
        self.embed_scale = cfg.decoder_embed_scale
        self.embed_tokens = embed_tokens
        self.project_in_dim = (nn.Linear(cfg.decoder_input_embed_dim, C, bias=False)
                               if cfg.decoder_input_embed_dim != C else None)
        self.embed_positions = (positions_module(cfg.decoder_learned_pos, cfg.max_target_positions, C, cfg.pad)
                                if cfg.positional_embeddings else None)
        self.layernorm_embedding = nn.LayerNorm(C) if cfg.layernorm_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(C) if cfg.decoder_final_norm else None
        self.project_out_dim = (nn.Linear(C, cfg.decoder_output_dim, bias=False)
                                if cfg.decoder_output_dim != C else None)
        self.output_projection = nn.Linear(cfg.decoder_output_dim, cfg.tgt_vocab_size, bias=False)
        if cfg.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Tokens (B, T) and their positional embeddings (None: a model without them) -> the first layer's input.
        The incremental step, eager or compiled (compiled.py), embeds through this too."""
        x = scaled(self.embed_tokens(tokens), self.embed_scale)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x = x + positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> features (B, T, C_out): the final norm and the output-dim projection."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x

    def features(self, prev_output_tokens: torch.Tensor, enc: EncoderOut, caches: list[LayerCache] | None = None,
                 step: int | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, C_out) features before the output projection.
        Incremental decoding: pass only the newest token (B, 1), its 0-based `step`, and `caches`."""
        positions = None
        if self.embed_positions is not None:
            if step is None:
                positions = self.embed_positions(make_positions(prev_output_tokens, self.pad))
            else:  # fairseq: the step's position is pad + 1 + step for every row (targets carry no padding)
                positions = self.embed_positions.at(self.pad + 1 + step)
        x = self.embed(prev_output_tokens, positions)
        T = x.size(1)
        self_mask = None
        if step is None:  # a whole target at once: causal, and padded target keys masked as fairseq does
            self_mask = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device), 1)
            pads = prev_output_tokens.eq(self.pad)
            if pads.any():
                self_mask = self_mask + torch.zeros(pads.shape, dtype=x.dtype, device=x.device).masked_fill(
                    pads, float("-inf"))[:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, enc.x, enc.attn_mask, self_mask, caches[i] if caches is not None else None)
        return self.head(x)

    def forward(self, prev_output_tokens, enc, caches=None, step=None) -> torch.Tensor:  # (B, T, V)
        return self.output_projection(self.features(prev_output_tokens, enc, caches, step))


class ClassificationHead(nn.Module):
    """BART sentence classification head: dense -> pooler activation -> out_proj."""

    def __init__(self, dim: int, inner_dim: int, num_classes: int, activation: str):
        super().__init__()
        self.dense = nn.Linear(dim, inner_dim)
        self.act = ACTIVATIONS[activation]
        self.out_proj = nn.Linear(inner_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.act(self.dense(x)))


class EncoderDecoder(nn.Module):
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

    def forward(self, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) left-padded source ids, (B, T) decoder input ids -> (B, T, V) logits."""
        return self.decoder(prev_output_tokens, self.encoder(src_tokens))

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
