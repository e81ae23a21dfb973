"""Load a fairport model folder into the reference model: `load(path)`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from fairport.errors import FairportError
from fairport.reference import compiled, fast
from fairport.reference.config import ModelConfig
from fairport.reference.folder import ModelFolder, damaged, sha256
from fairport.reference.hub import PortedEnsemble, PortedModel
from fairport.reference.model import EncoderDecoder, SelfAttention, SinusoidalPositions, sinusoidal_table
from fairport.reference.names import reference_name

# what --dtype / --dtypes accept: a torch dtype, or "int8" (fp32 model, int8 linear layers)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


# safetensors' dtype names
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path: Path, expected_sha256: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """A safetensors file's tensors one at a time, each read (not memory-mapped) into a buffer of its own: the
    file's pages never count in this process's memory, which holds only what it keeps. The file is read in order
    and hashed as it is read: a file cut short, or whose sha256 is not `expected_sha256` (what provenance.json
    recorded), raises a one-line FairportError naming it, after its last tensor and before anything uses them."""
    if sys.byteorder != "little":
        raise FairportError("reading safetensors needs a little-endian machine")
    total = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        (size,) = struct.unpack("<Q", head) if len(head) == 8 else (total,)
        if size > total - 8:
            raise damaged(path, f"is cut short ({total} bytes, shorter than its own header says)")
        raw = f.read(size)
        digest.update(head + raw)
        try:
            header = json.loads(raw)
            tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0])
            end = max((v["data_offsets"][1] for _, v in tensors), default=0)
            [SAFETENSORS_DTYPES[v["dtype"]] for _, v in tensors]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
            raise damaged(path, "has a corrupt header (not a safetensors file)") from None
        if 8 + size + end > total:
            raise damaged(path, f"is cut short ({total} of {8 + size + end} bytes)")
        # the hash runs in a thread of its own (hashlib releases the GIL), one tensor behind the reading: it
        # overlaps with the caller's work on the next tensor and holds at most one tensor back
        with ThreadPoolExecutor(1) as hasher:
            pending = None
            pos = 0  # bytes of the data section read so far, in file order
            for name, info in tensors:
                start, stop = info["data_offsets"]
                if start < pos:  # tensors sharing bytes: hash the file apart (no such file is written)
                    pending, digest = None, None
                elif start > pos and digest is not None:  # bytes between tensors count too, in order
                    if pending is not None:
                        pending.result()
                    digest.update(f.read(start - pos))
                t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                buf = t.reshape(-1).view(torch.uint8).numpy()
                f.seek(8 + size + start)
                if f.readinto(buf) != stop - start:
                    raise damaged(path, f"is cut short (in {name})")
                pos = max(pos, stop)
                if digest is not None:
                    if pending is not None:
                        pending.result()
                    pending = hasher.submit(digest.update, buf)
                yield name, t
            if pending is not None:
                pending.result()
        if expected_sha256 is not None:
            if digest is None:
                actual = sha256(path)
            else:
                digest.update(f.read())  # anything after the last tensor counts too
                actual = digest.hexdigest()
            if actual != expected_sha256:
                raise damaged(path, "does not match the sha256 provenance.json recorded when it was written")


def read_weights(folder: ModelFolder) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors one at a time, under the reference's names (each file checked against provenance)."""
    for f in folder.weight_files():
        for k, t in read_safetensors(f, folder.recorded_sha256(f)):
            name = k if folder.weight_names == "fairport" else reference_name(folder.weight_names, k)
            if name is not None:
                yield name, t


def tied_names(cfg: ModelConfig) -> set[str]:
    """Tensors stored once and shared: the decoder's token embedding and/or its output projection."""
    names = set()
    if cfg.share_all_embeddings:
        names.add("decoder.embed_tokens.weight")
    if cfg.share_decoder_input_output_embed:
        names.add("decoder.output_projection.weight")
    return names


# the initializers torch's layers call when built; build() has nothing to initialize
_INITIALIZERS = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "ones_", "zeros_",
                 "constant_")


@contextlib.contextmanager
def _without_random_init():
    """Layers built on the meta device skip their random init (every weight comes from the folder). Besides
    being wasted work, torch's random init of a meta tensor imports torch._dynamo: ~1 s of every process's load."""
    saved = {name: getattr(nn.init, name) for name in _INITIALIZERS}
    for name in _INITIALIZERS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], device=None, dtype=torch.float32,
          cls: type[EncoderDecoder] = EncoderDecoder, fuse: bool = False, finish=None) -> EncoderDecoder:
    """The reference model (eval mode, no gradients) from (reference name, tensor) pairs, without a random init
    pass, holding one tensor at a time: each is cast, placed and put in the model as it comes, and each linear
    layer is handed to `finish(linear)` (which may return its replacement: fast.PackedLinear, fast.Int8Linear)
    as soon as its tensors are in; with `fuse`, self-attention q/k/v are fused first (fast.fuse_attention).
    Sinusoidal tables are computed in fp32 (as fairseq computes them), then cast to `dtype`."""
    with torch.device("meta"), _without_random_init():
        model = cls(cfg)
    model.eval().requires_grad_(False)
    device = torch.device(device or "cpu")
    pending = _Linears(model, fuse, finish or (lambda linear: None))
    tied = tied_names(cfg)
    for name, t in tensors:
        if name in tied:
            continue
        module, attr = _owner(model, name)
        if module is None:
            raise FairportError(f"weights do not fit the config: unexpected {name}")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        setattr(module, attr, nn.Parameter(t, requires_grad=False))
        pending.filled(module)
    if cfg.share_all_embeddings:
        model.decoder.embed_tokens = model.encoder.embed_tokens
    if cfg.share_decoder_input_output_embed and isinstance(model.decoder.output_projection, nn.Linear):
        model.decoder.output_projection.weight = model.decoder.embed_tokens.weight
        pending.filled(model.decoder.output_projection)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FairportError(f"weights do not fit the config: missing {sorted(missing)[:6]}")
    for m in model.modules():
        if isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(m.table.size(0), m.dim, m.pad).to(device=device, dtype=dtype)
    return model


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None, attr
    return (module, attr) if isinstance(getattr(module, attr, None), nn.Parameter) else (None, attr)


class _Linears:
    """Hands each linear layer to `finish` once its tensors are in (with `fuse`, self-attention q/k/v once all
    three are, fused into one first); puts back what `finish` returns."""

    def __init__(self, model: nn.Module, fuse: bool, finish):
        self.fuse, self.finish = fuse, finish
        self.parent = {id(child): (module, name) for module in model.modules()
                       for name, child in module.named_children()}

    def filled(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear) or any(p.is_meta for p in module.parameters()):
            return
        owner, name = self.parent[id(module)]
        if self.fuse and isinstance(owner, SelfAttention) and name in ("q_proj", "k_proj", "v_proj"):
            if any(p.is_meta for lin in (owner.q_proj, owner.k_proj, owner.v_proj) for p in lin.parameters()):
                return
            owner, name, module = owner, "qkv_proj", fast.fuse_attention(owner)
        new = self.finish(module)
        if new is not None:
            setattr(owner, name, new)


def load(path: str | Path | ModelFolder, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, pack: bool = True, compile: bool = False):
    """`fairport.reference.load('out/bart-cnn')` (a path, or a ModelFolder already open) -> the reference model
    with fairseq's hub verbs (`PortedModel`), or for a folder converted from an ensemble a `PortedEnsemble` that
    generates as fairseq's EnsembleModel.

    `dtype`: the compute dtype, a torch dtype or one of PRECISIONS' names. None (the default) is float32 whatever
    the folder stores, as fairseq computes: its hub builds a float32 model and loads fp16 checkpoints into it,
    so the default gives fairseq's numbers. float16/bfloat16 compute in that dtype; "int8" is a float32 model
    whose linear layers run through int8 weights with activations quantized per call (CPU only; fast.Int8Linear).
    Self-attention q/k/v are fused (fast.fuse_attention); on the CPU, large fp32/bf16 weights are held only in
    oneDNN's blocked layout (fast.PackedLinear) unless `pack=False` (slower matrix products). The folder is read
    one tensor at a time, each layer converted as it is read: memory never holds more than the final model and
    one tensor.

    `compile=True`: generation runs the decoder step compiled ahead of time (compiled.py; plain layers, not int8;
    the compilation takes ~30 s on a tiny model, 1-2 min on large ones)."""
    int8 = dtype == "int8"
    if compile and int8:
        raise FairportError("the compiled step runs float32/float16/bfloat16 layers, not int8: drop one of them")
    pack = pack and not compile  # the compiler packs the weights its own way
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise FairportError(f"unknown dtype {dtype!r} (choose from {', '.join(PRECISIONS)})")
        dtype = PRECISIONS[dtype]
    dtype = dtype or torch.float32
    if int8:
        fast.check_int8(device or "cpu", dtype)
        finish = fast.Int8Linear
    else:
        finish = fast.pack_linear if pack else None
    folder = path if isinstance(path, ModelFolder) else ModelFolder.open(path)
    models = []
    for member in folder.members():
        model = build(member.config, read_weights(member), device, dtype, cls=PortedModel, fuse=True, finish=finish)
        model.folder = member
        if compile:
            compiled.compile_step(model)
        models.append(model)
    return models[0] if len(models) == 1 else PortedEnsemble(models, folder)
