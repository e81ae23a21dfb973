"""CPU speed for the reference model, kept out of the architecture: functions that swap a model's layers for
faster equivalents with the same outputs (gpt-fast's quantize.py pattern). `load()` applies them.

- `fuse_qkv(model)`: each self-attention's q, k, v projections become one (3C, C) matrix product
  (`SelfAttention.qkv_proj`; the three separate matrices are freed, so no memory is duplicated).
- `pack(model)`: large fp32/bf16 linear layers on the CPU become `PackedLinear`, holding their weight only in
  oneDNN's blocked layout: faster than torch's default CPU product at the 1-512 rows incremental decoding
  uses, by a CPU-dependent factor (`fairport bench --sides reference,reference-unpacked` measures it), with no
  second copy.
- `quantize(model)`: every linear layer becomes `Int8Linear` (int8 weights per output channel, activations
  quantized per call: torch's dynamic quantization kernels), every token embedding `Int8Embedding` (int8 rows,
  a scale each). CPU and float32 only; outputs move, and `fairport verify --dtypes int8` measures by how much.
- `unpack(model)`: packed layers back to plain nn.Linear (their exact weights).

`load()` applies them one layer at a time while it reads the folder, so the float32 weights of a packed or
int8 model are never all in memory at once.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fairport.errors import FairportError
from fairport.reference.model import SelfAttention

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# below this many weights a oneDNN call's fixed cost (~13 us measured) outweighs its faster product
PACK_MIN_NUMEL = 1 << 18


def onednn_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def int8_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and ("x86" in engines or "fbgemm" in engines)


def fuse_qkv(model: nn.Module) -> nn.Module:
    """One (3C, C) product for each self-attention's q, k and v (q | k | v stacked, as fairseq's old in_proj)."""
    for attn in model.modules():
        if isinstance(attn, SelfAttention) and attn.qkv_proj is None:
            fuse_attention(attn)
    return model


def fuse_attention(attn: SelfAttention) -> nn.Linear:
    """This self-attention's q, k, v projections as one Linear (`attn.qkv_proj`); the three are freed."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    fused = nn.Linear(q.in_features, 3 * q.out_features, device="meta")
    grad = q.weight.requires_grad
    fused.weight = nn.Parameter(_stacked(q.weight, k.weight, v.weight), requires_grad=grad)
    fused.bias = nn.Parameter(_stacked(q.bias, k.bias, v.bias), requires_grad=grad)
    attn.qkv_proj = fused
    del attn.q_proj, attn.k_proj, attn.v_proj
    return fused


def _stacked(*ts: torch.Tensor) -> torch.Tensor:
    """The tensors one after another (dim 0). On the meta device only the shape is made: torch's meta kernel
    for cat imports torch._dynamo, ~1.8 s of a process's first int8 load."""
    if ts[0].is_meta:
        return torch.empty((sum(t.size(0) for t in ts), *ts[0].shape[1:]), dtype=ts[0].dtype, device="meta")
    return torch.cat(ts).detach()


def _stays(fn, what: str, dtype: torch.dtype) -> None:
    """Refuse a move or cast (`.to()`, `.half()`, `.cuda()`) of a layer whose copy cannot follow it."""
    probe = fn(torch.zeros(1, dtype=dtype))  # where .to()/.half()/.cuda() would take the model
    if probe.device.type != "cpu" or probe.dtype != dtype:
        raise FairportError(f"an {what} model stays on the CPU in {str(dtype).replace('torch.', '')}: load the folder "
                            f"again with device=/dtype= (or fast.unpack(model) first)")


class PackedLinear(nn.Module):
    """A linear layer held only in oneDNN's blocked layout, for CPU fp32/bf16 products: measured 2-4x faster than
    torch's default CPU product at the 1-512 rows decoding uses. The plain weight is not kept (no second copy);
    `weight()` recovers it exactly (an identity product: every output is one weight times 1). The layer stays on
    the CPU in its dtype; fast.unpack() gives back a plain nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight().to(x.dtype), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.packed.dtype)
        return torch.ops.mkldnn._linear_pointwise(eye, self.packed, None, "none", [], "").t().contiguous()

    def _apply(self, fn, recurse=True):
        _stays(fn, "oneDNN-packed", self.packed.dtype)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def _row_absmax(w: torch.Tensor) -> torch.Tensor:
    """Each row's largest |value|, without a temporary the size of `w`."""
    lo, hi = torch.aminmax(w, dim=1)
    return torch.maximum(hi, -lo)


class Int8Linear(nn.Module):
    """A linear layer whose weight is held only as int8 (symmetric, per output channel: each row scaled by its
    largest |value|, as torch's per-channel observer does) for torch's dynamic int8 product: activations are
    quantized afresh at every call (7-bit range, as torch's dynamic Linear does on x86). Measured 2.6-5.8x
    faster than the packed fp32 product at 1-40 rows. CPU and float32 only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (_row_absmax(w) / 127.5).clamp_min(torch.finfo(torch.float32).eps).double()
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; this path is opt-in
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros(scale.shape, dtype=torch.long), 0, torch.qint8)
            self.params = torch.ops.quantized.linear_prepack(q, bias)

    @classmethod
    def stored(cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """The layer from what `tensors()` gave (an int8 folder's file): the same layer, without the float32
        weight or its quantization; fbgemm's prepacking is left."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = qweight.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(qweight, scale.double(),
                                                         torch.zeros(scale.shape, dtype=torch.long), 0)
            self.params = torch.ops.quantized.linear_prepack(q, bias)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the layer holds, as tensors to store: "bias" (if any), "scale" (float32, one per output channel,
        the exact value it was quantized with) and "qweight" (int8), in that order (`stored()` reads them)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, bias = torch.ops.quantized.linear_unpack(self.params)
        out = {} if bias is None else {"bias": bias.float()}
        return out | {"scale": q.q_per_channel_scales().float(), "qweight": q.int_repr()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.params, True)  # the bias is in params

    def _apply(self, fn, recurse=True):
        _stays(fn, "int8", torch.float32)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """A token embedding held only as int8 rows, each with its float32 scale (symmetric: the row's largest |value|
    maps to 127, as CTranslate2 stores its int8 embeddings): a looked-up row is its int8 values times its scale.
    A quarter of the float32 table's memory. CPU and float32 only; a tied output projection is quantized from the
    float32 table before it is released (load(), quantize())."""

    def __init__(self, embedding: nn.Embedding, rows: int = 4096):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        w = embedding.weight.detach()
        scale = (_row_absmax(w).float() / 127).clamp_min(torch.finfo(torch.float32).eps)
        q = torch.empty(w.shape, dtype=torch.int8)
        for i in range(0, len(w), rows):  # a block of rows at a time: no float32 temporary of the whole table
            q[i:i + rows] = torch.round(w[i:i + rows].float() / scale[i:i + rows, None]).clamp_(-127, 127)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    @classmethod
    def stored(cls, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None) -> Int8Embedding:
        """The embedding from what `tensors()` gave (an int8 folder's file)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "qweight": self.qweight}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.qweight).float() * F.embedding(tokens, self.scale[:, None])

    def _apply(self, fn, recurse=True):
        _stays(fn, "int8", torch.float32)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _swap_linears(model: nn.Module, make) -> None:
    """Replace each nn.Linear child (not a subclass) for which make(linear) returns a module."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                new = make(child)
                if new is not None:
                    setattr(module, name, new)


def packable(linear: nn.Linear, min_numel: int = PACK_MIN_NUMEL) -> bool:
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype in PACKABLE_DTYPES and w.numel() >= min_numel and onednn_available()
            and not w.requires_grad)


def pack_linear(linear: nn.Linear, min_numel: int = PACK_MIN_NUMEL) -> PackedLinear | None:
    """The layer as a PackedLinear where packing applies (`packable`), else None: it stays as it is."""
    if not packable(linear, min_numel):
        return None
    try:
        return PackedLinear(linear)
    except RuntimeError:  # this oneDNN build cannot pack this dtype here: torch's default product it is
        return None


def pack(model: nn.Module, min_numel: int = PACK_MIN_NUMEL) -> nn.Module:
    """CPU, fp32/bf16: every linear layer with at least `min_numel` weights becomes a PackedLinear. Elsewhere
    (other devices or dtypes, no oneDNN in this torch) nothing changes. `load()` does this on the CPU."""
    _swap_linears(model, lambda lin: pack_linear(lin, min_numel))
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Packed layers back to plain nn.Linear, with their exact weights."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight = nn.Parameter(child.weight(), requires_grad=False)
                plain.bias = child.bias
                setattr(module, name, plain)
    return model


def quantize(model: nn.Module, min_numel: int = 0) -> nn.Module:
    """int8: every linear layer with at least `min_numel` weights (all by default, the output projection
    included) becomes an Int8Linear, then every token embedding an Int8Embedding; their float32 weights are
    released. CPU and float32 only."""
    p = next(model.parameters())
    check_int8(p.device, p.dtype)
    unpack(model)
    _swap_linears(model, lambda lin: Int8Linear(lin) if lin.weight.numel() >= min_numel else None)
    quantize_embeddings(model)
    return model


def quantize_embeddings(model: nn.Module) -> None:
    """Each token embedding (`embed_tokens`: nn.Embedding) becomes an Int8Embedding; a shared one stays shared."""
    made: dict[int, Int8Embedding] = {}
    for module in list(model.modules()):
        child = getattr(module, "embed_tokens", None)
        if type(child) is nn.Embedding:
            if id(child) not in made:
                made[id(child)] = Int8Embedding(child)
            module.embed_tokens = made[id(child)]


def check_int8(device: torch.device | str, dtype: torch.dtype) -> None:
    """int8 runs on the CPU in float32, with torch's quantized dynamic linear: say so, or raise one line."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        raise FairportError(f"int8 needs the model on the CPU in float32 (here: {device}, {dtype})")
    if not int8_available():
        raise FairportError(f"int8: this torch ({torch.__version__}) has no quantized dynamic linear "
                            f"(engines: {torch.backends.quantized.supported_engines})")


def int8_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A quantized model's tensors as an int8 folder stores them (converters/write.py; load() reads them back):
    each Int8Linear's and Int8Embedding's `tensors()` under its path, every other parameter and persistent buffer
    as it is; a module shared by two paths once, under its first."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, (Int8Linear, Int8Embedding)):
            out |= {prefix + k: t for k, t in module.tensors().items()}
            continue
        if type(module) in (nn.Linear, nn.Embedding):
            raise FairportError(f"{path} is not quantized: int8 tensors come from a quantized model")
        persistent = [k for k, _ in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set]
        out |= {prefix + k: t for k, t in module.named_parameters(recurse=False)}
        out |= {prefix + k: getattr(module, k) for k in persistent}
    return out


def packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())
