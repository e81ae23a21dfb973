"""CPU speed for the reference model, kept out of the architecture: functions that swap a model's layers for
faster equivalents with the same outputs (gpt-fast's quantize.py pattern). `load()` applies them.

- `fuse_qkv(model)`: each self-attention's q, k, v projections become one (3C, C) matrix product
  (`SelfAttention.qkv_proj`; the three separate matrices are freed, so no memory is duplicated).
- `pack(model)`: large fp32/bf16 linear layers on the CPU become `PackedLinear`, which also holds its weight
  in oneDNN's blocked layout: measured 2.3-4x faster than torch's default CPU product at the 1-512 rows
  incremental decoding uses (`fairport bench` reports the machine's numbers); costs a second copy.
- `quantize(model)`: every linear layer becomes `Int8Linear` (int8 weights per output channel, activations
  quantized per call: torch's dynamic quantization kernels). CPU and float32 only; outputs move, and
  `fairport verify --dtypes int8` measures by how much.
- `unpack(model)`: packed layers back to plain nn.Linear.
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
            q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
            fused = nn.Linear(q.in_features, 3 * q.out_features, device="meta")
            grad = q.weight.requires_grad
            fused.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]).detach(), requires_grad=grad)
            fused.bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]).detach(), requires_grad=grad)
            attn.qkv_proj = fused
            del attn.q_proj, attn.k_proj, attn.v_proj
    return model


class PackedLinear(nn.Linear):
    """nn.Linear that multiplies through a copy of its weight in oneDNN's blocked layout on the CPU (fp32/bf16).
    The copy follows the weight: it is made again when the weight changes (moved, cast, edited in place), and
    torch's default product is used where oneDNN does not apply (other devices, autograd)."""

    packed: torch.Tensor | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> PackedLinear:
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight, out.bias = linear.weight, linear.bias
        out.repack()
        return out

    def _key(self) -> tuple:
        w = self.weight
        return w.data_ptr(), w._version, w.dtype, w.device

    def repack(self) -> None:
        w = self.weight
        ok = w.device.type == "cpu" and w.dtype in PACKABLE_DTYPES
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach()) if ok else None
        self.key = self._key()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.key != self._key():
            self.repack()
        if (self.packed is None or x.device.type != "cpu" or x.dtype != self.weight.dtype
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class Int8Linear(nn.Module):
    """A linear layer whose weight is held only as int8 (symmetric, per output channel: each row scaled by its
    largest |value|, as torch's per-channel observer does) for torch's dynamic int8 product: activations are
    quantized afresh at every call (7-bit range, as torch's dynamic Linear does on x86). Measured 2.6-5.8x
    faster than the packed fp32 product at 1-40 rows. CPU and float32 only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.5).clamp_min(torch.finfo(torch.float32).eps).double()
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; this path is opt-in
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros(scale.shape, dtype=torch.long), 0, torch.qint8)
            self.params = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.params, True)  # the bias is in params

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))  # where .to()/.half()/.cuda() would take the model
        if probe.device.type != "cpu" or probe.dtype != torch.float32:
            raise FairportError("an int8 model stays on the CPU in float32: load the folder again for another "
                                "device or dtype")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _swap_linears(model: nn.Module, make) -> None:
    """Replace each nn.Linear child (not a subclass) for which make(linear) returns a module."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                new = make(child)
                if new is not None:
                    setattr(module, name, new)


def pack(model: nn.Module, min_numel: int = PACK_MIN_NUMEL) -> nn.Module:
    """CPU, fp32/bf16: every linear layer with at least `min_numel` weights becomes a PackedLinear. Elsewhere
    (other devices or dtypes, no oneDNN in this torch) nothing changes. `load()` does this on the CPU."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in PACKABLE_DTYPES or not onednn_available():
        return model
    try:
        _swap_linears(model, lambda lin: PackedLinear.wrap(lin) if lin.weight.numel() >= min_numel else None)
    except RuntimeError:  # this oneDNN build cannot pack this dtype here: torch's default product it is
        unpack(model)
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Packed layers back to plain nn.Linear (their oneDNN copies freed)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, name, plain)
    return model


def quantize(model: nn.Module, min_numel: int = 0) -> nn.Module:
    """int8: every linear layer with at least `min_numel` weights (all by default, the output projection
    included; embeddings stay float32) becomes an Int8Linear, and its float32 weight is released (a tied
    output projection keeps the embedding it shares). CPU and float32 only."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise FairportError(f"int8 needs the model on the CPU in float32 (it is on {p.device}, {p.dtype})")
    if not int8_available():
        raise FairportError(f"int8: this torch ({torch.__version__}) has no quantized dynamic linear "
                            f"(engines: {torch.backends.quantized.supported_engines})")
    unpack(model)
    _swap_linears(model, lambda lin: Int8Linear(lin) if lin.weight.numel() >= min_numel else None)
    return model


def packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
