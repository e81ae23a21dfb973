"""Load a fairport model folder into the reference model: `load(path)`."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from fairport.errors import FairportError
from fairport.reference import compiled, fast
from fairport.reference.config import ModelConfig
from fairport.reference.folder import ModelFolder
from fairport.reference.hub import PortedEnsemble, PortedModel
from fairport.reference.model import EncoderDecoder, SelfAttention, SinusoidalPositions, sinusoidal_table
from fairport.reference.names import reference_name
from fairport.reference.tensorfile import read_safetensors

# what --dtype / --dtypes accept: a torch dtype, or "int8" (fp32 model, int8 linear layers and embeddings)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


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
          cls: type[EncoderDecoder] = EncoderDecoder, fuse: bool = False, finish=None,
          int8_embeddings: bool = False) -> EncoderDecoder:
    """The reference model (eval mode, no gradients) from (reference name, tensor) pairs, without a random init
    pass, holding few tensors at a time: each is cast, placed and put in the model as it comes, and each linear
    layer is handed to `finish(linear)` (which may return its replacement: fast.PackedLinear, fast.Int8Linear)
    as soon as its tensors are in; with `fuse`, self-attention q/k/v are fused first (fast.fuse_attention); with
    `int8_embeddings`, each token embedding becomes a fast.Int8Embedding as soon as it is in (a tied output
    projection is handed to `finish` first). Sinusoidal tables are computed in fp32 (as fairseq computes them),
    then cast to `dtype`."""
    model = _meta_model(cfg, cls)
    device = torch.device(device or "cpu")
    tied = tied_names(cfg)
    with _Layers(model, fuse, finish) as pending:
        for name, t in tensors:
            if name in tied:
                continue
            module, attr = _owner(model, name)
            if module is None:
                raise FairportError(f"weights do not fit the config: unexpected {name}")
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            setattr(module, attr, nn.Parameter(t, requires_grad=False))
            if type(module) is nn.Embedding:
                pending.embedding(module, int8_embeddings)
            else:
                pending.filled(module)
    return _complete(model, device, dtype)


def build_int8(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], where: Path,
               cls: type[EncoderDecoder] = EncoderDecoder) -> EncoderDecoder:
    """The int8 model from the tensors of an int8 folder's file (`where`; written by fast.int8_tensors): each
    int8 layer made from its stored int8 weights and scales once its last tensor (`qweight`) is in, on torch's
    threads, with nothing quantized; every other tensor put in place as build() does. CPU, float32."""
    model = _meta_model(cfg, cls)
    fast.fuse_qkv(model)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with _Layers(model, False, None) as pending:
        for name, t in tensors:
            path, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(path)
            except AttributeError:
                module = None
            if type(module) in (nn.Linear, nn.Embedding) and attr in ("bias", "scale", "qweight"):
                got = parts.setdefault(path, {})
                got[attr] = t
                if attr == "qweight":  # a layer's last tensor
                    pending.replace(module, _stored_int8(parts.pop(path)))
                continue
            module, attr = _owner(model, name)
            if module is None:
                raise FairportError(f"{where} does not fit the config: unexpected {name}")
            setattr(module, attr, nn.Parameter(t.float() if t.is_floating_point() else t, requires_grad=False))
    plain = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    if plain or parts:
        raise FairportError(f"{where} does not fit the config: no int8 weights for {sorted(plain or parts)[:6]}")
    return _complete(model, None, torch.float32)


def _meta_model(cfg: ModelConfig, cls: type[EncoderDecoder]) -> EncoderDecoder:
    """The model's layers on the meta device (no memory, no init), in eval mode without gradients."""
    with torch.device("meta"), _without_random_init():
        model = cls(cfg)
    return model.eval().requires_grad_(False)


def _stored_int8(got: dict[str, torch.Tensor]):
    """A maker of the int8 layer (a linear layer or a token embedding) from its stored tensors."""
    q, scale = got["qweight"], got.get("scale")
    if q.dtype != torch.int8 or q.dim() != 2 or scale is None or scale.shape != (q.size(0),):
        raise FairportError(f"an int8 file's layer does not hold int8 rows with a scale each ({q.dtype}, "
                            f"{list(q.shape)})")

    def make(module: nn.Module) -> nn.Module:
        if tuple(module.weight.shape) != tuple(q.shape):
            raise FairportError(f"an int8 file's layer has shape {list(q.shape)}, the config's "
                                f"{list(module.weight.shape)}")
        if type(module) is nn.Embedding:
            return fast.Int8Embedding.stored(q, scale.float(), module.padding_idx)
        return fast.Int8Linear.stored(q, scale.float(), got.get("bias"))
    return make


def _complete(model: EncoderDecoder, device, dtype: torch.dtype) -> EncoderDecoder:
    """Checks nothing is missing; computes the sinusoidal tables (in fp32, as fairseq does, then cast)."""
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


class _Layers:
    """Hands each linear layer to `finish` once its tensors are in (with `fuse`, self-attention q/k/v once all
    three are, fused into one first) and puts back what `finish` returns; `embedding(module, int8)` finishes a
    token embedding: an output projection that shares its table is handed to `finish` first (from the float
    table), then with `int8` the embedding becomes a fast.Int8Embedding. The conversions run on torch's thread
    count of threads (quantizing and packing release the GIL), a few layers in flight at a time; their results
    are put in the model by this thread, in order, and all of them by the end of the `with` block."""

    def __init__(self, model: nn.Module, fuse: bool, finish):
        self.model, self.fuse, self.finish = model, fuse, finish or (lambda linear: None)
        self.parents: dict[int, list[tuple[nn.Module, str]]] = {}  # a shared module has several
        for module in model.modules():
            for name, child in module.named_children():
                self.parents.setdefault(id(child), []).append((module, name))
        self.threads = max(1, torch.get_num_threads())
        self.running: deque = deque()  # (places, future)

    def __enter__(self) -> _Layers:
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self.running and exc[0] is None:
                self._put_back()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)

    def filled(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear) or any(p.is_meta for p in module.parameters()):
            return
        [(owner, name)] = self.parents[id(module)]
        if self.fuse and isinstance(owner, SelfAttention) and name in ("q_proj", "k_proj", "v_proj"):
            if any(p.is_meta for lin in (owner.q_proj, owner.k_proj, owner.v_proj) for p in lin.parameters()):
                return
            self._run([(owner, "qkv_proj")], self.finish, fast.fuse_attention(owner))
            return
        self.replace(module, self.finish)

    def embedding(self, module: nn.Embedding, int8: bool) -> None:
        decoder = self.model.decoder
        output = decoder.output_projection
        if module is decoder.embed_tokens and isinstance(output, nn.Linear) and output.weight.is_meta \
                and self.model.config.share_decoder_input_output_embed:
            output.weight = module.weight
            self.filled(output)
        if int8:
            self.replace(module, fast.Int8Embedding)

    def replace(self, module: nn.Module, make) -> None:
        """Put `make(module)` (unless None) wherever `module` is in the model."""
        self._run(self.parents[id(module)], make, module)

    def _run(self, places: list[tuple[nn.Module, str]], make, module: nn.Module) -> None:
        if self.pool is None:
            self._set(places, make(module))
            return
        self.running.append((places, self.pool.submit(make, module)))
        if len(self.running) > self.threads:
            self._put_back()

    def _put_back(self) -> None:
        places, future = self.running.popleft()
        self._set(places, future.result())

    @staticmethod
    def _set(places: list[tuple[nn.Module, str]], new: nn.Module | None) -> None:
        if new is not None:
            for owner, name in places:
                setattr(owner, name, new)


def load(path: str | Path | ModelFolder, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, pack: bool = True, compile: bool = False):
    """`fairport.reference.load('out/bart-cnn')` (a path, or a ModelFolder already open) -> the reference model
    with fairseq's hub verbs (`PortedModel`), or for a folder converted from an ensemble a `PortedEnsemble` that
    generates as fairseq's EnsembleModel.

    `dtype`: the compute dtype, a torch dtype or one of PRECISIONS' names. None (the default) is float32 whatever
    the folder stores, as fairseq computes: its hub builds a float32 model and loads fp16 checkpoints into it,
    so the default gives fairseq's numbers. float16/bfloat16 compute in that dtype; "int8" is a float32 model
    whose linear layers run through int8 weights with activations quantized per call, and whose token embeddings
    are int8 rows with a scale each (CPU only; fast.Int8Linear, fast.Int8Embedding): read from the folder's int8
    file where `convert --int8` wrote one (folder.INT8; nothing is quantized, about 4x faster to load), else
    quantized from the float weights as they are read (the same values).
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
        stored = member.int8_file() if int8 else None
        if stored is not None:  # written by convert --int8: nothing to quantize
            model = build_int8(member.config, read_safetensors(stored, member.recorded_sha256(stored)), stored,
                               cls=PortedModel)
            model.folder = member
            models.append(model)
            continue
        model = build(member.config, read_weights(member), device, dtype, cls=PortedModel, fuse=True, finish=finish,
                      int8_embeddings=int8)
        model.folder = member
        if compile:
            compiled.compile_step(model)
        models.append(model)
    return models[0] if len(models) == 1 else PortedEnsemble(models, folder)
