"""Read a fairseq checkpoint without importing fairseq and without running code from the file.

A fairseq checkpoint is a torch pickle: a dict with `model` (the state dict), `args` (2019-2020: an
`argparse.Namespace`) or `cfg` (newer: omegaconf objects or plain containers), and training state
(`extra_state`, `last_optimizer_state`, `optimizer_history`) that we never need.

Unpickling is restricted. Only the globals in `ALLOWED_GLOBALS` may be called; classes from the
modules in `STUB_MODULES` (fairseq's own meters and configs, omegaconf containers) are replaced by inert
stand-ins that only record their state, so no fairseq or omegaconf code runs. Any other global is refused
with an error that names it. Checkpoints (zip and legacy formats) are memory-mapped tensor by tensor, so
optimizer state is never read from disk and conversion holds only the tensors it is writing.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from fairport.errors import FairportError


def _numpy_scalar(dtype, data=None):
    import numpy as np

    return np.frombuffer(data, dtype=dtype)[0].item() if data is not None else np.zeros((), dtype).item()


def _numpy_dtype(name, *args):
    import numpy as np

    return np.dtype(name)


def _numpy_reconstruct(cls, shape, dtype):
    import numpy as np

    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _codecs_encode(text, encoding="latin1"):
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); only that is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode call that is not a latin1 bytes literal")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    try:
        import numpy as np
    except ImportError:  # numpy objects only appear in training state; refuse them without numpy
        return {}
    return {
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    }


# Everything a fairseq checkpoint may call while unpickling. Each entry only builds data.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "object"): object,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
    **{("torch", str(dt).split(".")[1]): dt for dt in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool)},
    **_numpy_globals(),
}

# Modules whose classes are replaced by inert stand-ins (their code never runs).
STUB_MODULES = ("fairseq", "omegaconf", "typing", "hydra", "enum")


class Stub(dict):
    """Inert stand-in for a class from a stubbed module: records constructor args, items and state."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.stub_args = args
        self.stub_kwargs = kwargs
        self.stub_state = None

    def __setstate__(self, state):
        self.stub_state = state

    def __reduce__(self):  # pragma: no cover - stubs are never pickled again
        raise TypeError("fairport stubs are read-only")


_stub_classes: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _stub_classes:
        _stub_classes[key] = type(name, (Stub,), {"_qualname": key, "__module__": "fairport.stub"})
    return _stub_classes[key]


def _stub_getattr(obj, name):
    """`getattr` for pickles that name enum members as getattr(EnumClass, 'NAME'): stubs only."""
    if isinstance(obj, type) and issubclass(obj, Stub):
        return obj(name)
    raise pickle.UnpicklingError(f"refused getattr on {type(obj).__name__}")


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 pickles name Python 2 modules
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if (module, name) == ("builtins", "getattr"):
            return _stub_getattr
        if module.split(".")[0] in STUB_MODULES:
            return _stub_class(module, name)
        raise FairportError(
            f"refusing to load: the checkpoint asks to call {module}.{name}, which is not on fairport's "
            f"allowlist of data-only constructors (nothing from the file was executed)"
        )


# torch.load takes a module-like object with `Unpickler` and `load`.
restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="fairport_restricted_pickle",
)


def _storage_type(name: str):
    """torch.FloatStorage & co. as torch.load resolves them (they only carry a dtype)."""
    try:
        return torch.serialization.StorageType(name)
    except KeyError:
        return None


def _text(value) -> str:
    """Pickled storage keys and persistent-id tags: str, or bytes from protocol-2 pickles."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _mapped_storage(path: Path, offset: int, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
    """`numel` values of `dtype` at byte `offset` of the file, as a private copy-on-write memory map: read
    from disk only when used, returned to the system when the last tensor on it is dropped."""
    import numpy as np

    nbytes = int(numel) * torch._utils._element_size(dtype)
    if nbytes == 0:
        untyped = torch.UntypedStorage(0)
    else:
        if offset + nbytes > path.stat().st_size:
            raise EOFError(f"tensor data at byte {offset} runs past the end of the file")
        untyped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=offset,
                                             shape=(nbytes,))).untyped_storage()
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


class _TensorUnpickler(RestrictedUnpickler):
    """The restricted unpickler plus torch's persistent ids for storages. `storage(key, dtype, numel)` makes
    each root storage (memory-mapped, or on the meta device while only shapes are wanted)."""

    def __init__(self, file, storage):
        super().__init__(file)
        self.storage = storage
        self.roots: dict[str, torch.storage.TypedStorage] = {}
        self.views: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name.endswith("Storage") and _storage_type(name) is not None:
            return _storage_type(name)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        # zip format: ('storage', type, key, location, numel)
        # legacy format: ('storage', type, root_key, location, numel, view_metadata) or ('module', cls, ...)
        kind = _text(pid[0]) if isinstance(pid, tuple) and pid else None
        if kind == "module" and len(pid) >= 2:
            return pid[1]  # a class already resolved through find_class
        if kind != "storage" or len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        key = _text(key)
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in self.roots:
            self.roots[key] = self.storage(key, dtype, int(numel))
        root = self.roots[key]
        if view is None:
            return root
        view_key, offset, size = view
        if view_key not in self.views:
            es = torch._utils._element_size(dtype)
            self.views[view_key] = torch.storage.TypedStorage(
                wrap_storage=root._untyped_storage[offset * es: (offset + size) * es], dtype=dtype, _internal=True)
        return self.views[view_key]


def _load_zip(path: Path) -> Any:
    """torch >= 1.6 zip checkpoints: each storage is a record of the (uncompressed) archive."""
    reader = torch._C.PyTorchFileReader(str(path))
    pickles = [n for n in reader.get_all_records() if n.endswith("data.pkl")]
    prefix = min(pickles, key=len)[: -len("data.pkl")]

    def storage(key, dtype, numel):
        offset = reader.get_record_offset(f"{prefix}data/{key}") if numel else 0
        return _mapped_storage(path, offset, dtype, numel)

    return _TensorUnpickler(io.BytesIO(reader.get_record(f"{prefix}data.pkl")), storage).load()


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _load_legacy(path: Path) -> Any:
    """torch < 1.6 (and `_use_new_zipfile_serialization=False`) checkpoints, as the 2019-2020 fairseq
    releases are: magic, protocol and system-info pickles, the main pickle, the list of storage keys, then
    each storage as an 8-byte element count and its raw bytes. The main pickle is read twice: once with
    shape-only (meta) storages to learn the keys and where the data starts, then with each storage
    memory-mapped at its offset."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        if RestrictedUnpickler(f).load() != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a torch checkpoint (bad magic number)")
        if RestrictedUnpickler(f).load() != LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("unsupported torch serialization protocol")
        RestrictedUnpickler(f).load()  # system info
        start = f.tell()
        described: dict[str, tuple[torch.dtype, int]] = {}

        def shape_only(key, dtype, numel):
            described[key] = (dtype, numel)
            return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(
                numel * torch._utils._element_size(dtype), device="meta"), dtype=dtype, _internal=True)

        _TensorUnpickler(f, shape_only).load()
        keys = RestrictedUnpickler(f).load()
        offsets = {}
        pos = f.tell()
        for key in map(_text, keys):
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise EOFError("the file ends inside its tensor data")
            count = struct.unpack("<q", head)[0]
            if key not in described or count != described[key][1]:
                raise pickle.UnpicklingError(f"storage {key} does not match the pickle's description")
            offsets[key] = pos + 8
            pos += 8 + count * torch._utils._element_size(described[key][0])
        if pos > size:
            raise EOFError("the file ends inside its tensor data")
        f.seek(start)
        return _TensorUnpickler(f, lambda key, dtype, numel: _mapped_storage(path, offsets[key], dtype,
                                                                             numel)).load()


def _what_it_is(head: bytes) -> str:
    """What a file that is not a checkpoint looks like, from its first bytes."""
    if not head:
        return "it is empty"
    if len(head) > 9 and head[8:10] == b'{"':
        return ("it is a safetensors file (a converted model's weights?); convert takes the fairseq checkpoint "
                "(*.pt), and a fairport folder is already converted")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "it is a text file"
    return "its first bytes are neither a zip archive nor a pickle (not a torch.save file)"


def load_checkpoint(path: str | Path) -> dict:
    """Load a fairseq checkpoint dict safely, on the CPU. Tensors are memory-mapped one by one from the file
    (zip checkpoints of torch >= 1.6 and the legacy format before it), so training state is never read
    from disk and a tensor's memory is returned when it is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FairportError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(512)
    is_zip = head[:2] == b"PK"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise FairportError(f"{path} is truncated or corrupt (bad zip archive: {e})") from None
        if not any(n.endswith("data.pkl") for n in names):
            raise FairportError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl inside)")
    elif not head or head[0] != 0x80:  # legacy torch files start with a pickle PROTO opcode
        raise FairportError(f"{path} is not a PyTorch checkpoint: {_what_it_is(head)}")
    try:
        state = _load_zip(path) if is_zip else _load_legacy(path)
    except FairportError:
        raise
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, KeyError, TypeError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FairportError(f"{path} is truncated or corrupt ({type(e).__name__}: {msg})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise FairportError(f"{path} is a PyTorch file but not a fairseq checkpoint (no 'model' state dict)")
    return state


# ---------------------------------------------------------------------------------------------------
# Configuration: `args` Namespace or `cfg` (omegaconf stand-ins or plain containers) -> plain dicts

_VALUE_NODES = {"AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode",
                "PathNode", "BytesNode", "ValueNode", "UnionNode"}


def to_plain(obj: Any) -> Any:
    """Turn Namespaces, omegaconf stand-ins, enums and tuples into dicts, lists and scalars."""
    if isinstance(obj, Stub):
        kind = obj._qualname.rsplit(".", 1)[-1]
        state = obj.stub_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if kind == "DictConfig":
            content = (state or {}).get("_content")
            return {str(k): to_plain(v) for k, v in content.items()} if isinstance(content, dict) else None
        if kind == "ListConfig":
            content = (state or {}).get("_content")
            return [to_plain(v) for v in content] if isinstance(content, (list, tuple)) else None
        if kind in _VALUE_NODES:
            return to_plain((state or {}).get("_val"))
        if obj.stub_args and state is None and not len(obj):  # an enum member: Enum(value)
            return to_plain(obj.stub_args[0])
        return {"__stub__": obj._qualname}
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, str) and obj == "???":  # omegaconf's MISSING
        return None
    return obj


_INTERP = re.compile(r"^\$\{([\w.]+)\}$")


def resolve_interpolations(cfg: dict) -> dict:
    """Resolve omegaconf `${a.b}` references (fairseq saves cfg unresolved)."""

    def lookup(path):
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def walk(node, depth=0):
        if isinstance(node, dict):
            return {k: walk(v, depth) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, depth) for v in node]
        if isinstance(node, str) and depth < 10:
            m = _INTERP.match(node)
            if m:
                return walk(lookup(m.group(1)), depth + 1)
        return node

    return walk(cfg)


def _flatten_groups(model: dict) -> dict:
    """New-style dataclass configs nest `encoder: {embed_dim: ..}`; legacy names are `encoder_embed_dim`."""
    flat = {}
    for k, v in model.items():
        if k in ("encoder", "decoder") and isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}_{kk}"] = vv
        elif k == "quant_noise" and isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"quant_noise_{kk}"] = vv
        else:
            flat[k] = v
    return flat


def checkpoint_options(state: dict) -> tuple[dict, dict]:
    """Return (options, generation) from a checkpoint: one flat dict of model+task options as fairseq's
    legacy `args` would hold them, and the generation settings when the checkpoint carries them."""
    cfg = state.get("cfg")
    args = state.get("args")
    if cfg is not None:
        cfg = resolve_interpolations(to_plain(cfg))
        if not isinstance(cfg, dict):
            raise FairportError("checkpoint 'cfg' is not a mapping")
        model = cfg.get("model") or {}
        if isinstance(model, dict) and model.get("__stub__"):
            model = {}
        task = cfg.get("task") or {}
        opts: dict = {}
        if isinstance(task, dict):
            opts.update({k: v for k, v in task.items() if k != "_name"})
            opts["task"] = task.get("_name")
        if isinstance(model, dict):
            opts.update(_flatten_groups({k: v for k, v in model.items() if k != "_name"}))
            opts["arch"] = model.get("arch") or model.get("_name")
        if isinstance(model, dict) and not model and args is not None:
            opts.update(to_plain(args))
        generation = cfg.get("generation") or {}
        return opts, generation if isinstance(generation, dict) else {}
    if args is not None:
        opts = to_plain(args)
        if not isinstance(opts, dict):
            raise FairportError("checkpoint 'args' is not a Namespace")
        # fairseq's _upgrade_state_dict: very old checkpoints had one max_positions and no task
        if "max_positions" in opts and "max_source_positions" not in opts:
            opts["max_source_positions"] = opts["max_target_positions"] = opts["max_positions"]
        opts.setdefault("task", "translation")
        return opts, {}
    raise FairportError("checkpoint has neither 'args' nor 'cfg': cannot tell its architecture")


def recorded_text(state: dict) -> dict:
    """The text pipeline the checkpoint says it was trained with: {"bpe": name | None, "tokenizer": name | None,
    plus their options (sentencepiece_model, bpe_codes, gpt2_encoder_json, moses_* ...)}. fairseq keeps them
    in `cfg.bpe`/`cfg.tokenizer` (dataclass configs, `_name` = the choice) or flat in the legacy `args`."""
    cfg = state.get("cfg")
    cfg = resolve_interpolations(to_plain(cfg)) if cfg is not None else None
    out: dict = {"bpe": None, "tokenizer": None}
    if isinstance(cfg, dict) and (isinstance(cfg.get("bpe"), dict) or isinstance(cfg.get("tokenizer"), dict)):
        for part in ("bpe", "tokenizer"):
            section = cfg.get(part)
            if isinstance(section, dict):
                out.update({k: v for k, v in section.items() if k != "_name"})
                out[part] = section.get("_name")
        return out
    args = to_plain(state.get("args")) if state.get("args") is not None else None
    if isinstance(args, dict):
        out.update({k: v for k, v in args.items()
                    if k in ("bpe", "tokenizer") or k.startswith(("moses_", "gpt2_", "sentencepiece_", "bpe_"))})
    return out


def recorded_file(recorded, folder: Path) -> Path | None:
    """A file the checkpoint recorded (usually the trainer's path, or a URL): that path if it exists, else its
    base name beside the checkpoint."""
    if not isinstance(recorded, str) or not recorded:
        return None
    return next((p for p in (Path(recorded), folder / Path(recorded).name) if p.is_file()), None)
