"""The model folder's weight files, read and written by the one pair of functions here (the safetensors format:
an 8-byte header length, a JSON header, the tensors' raw bytes), with one table of dtype names. Reading and
writing both stream one tensor at a time and hash the file as they go (provenance.json's sha256)."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.reference.folder import damaged, sha256

# safetensors' dtype names, and the other way round
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


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
            [DTYPES[v["dtype"]] for _, v in tensors]
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
                t = _buffer(info["shape"], DTYPES[info["dtype"]])
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


# a tensor this large is read into memory mapped for it alone, given back to the system when the tensor is freed
MAPPED_BYTES = 1 << 20
_ANONYMOUS = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
              if hasattr(mmap, "MAP_ANONYMOUS") else None)  # None: not a POSIX system, malloc it is


def _buffer(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor to read into. A large one lives in an anonymous mapping of its own rather than in
    malloc's heap: load() frees most of what it reads (packed or quantized copies replace it), and freed heap
    blocks between the kept ones stay in the process (measured at wmt19-en-de in int8: 310 MB of a 875 MB
    process after loading)."""
    n = math.prod(shape) * dtype.itemsize
    if n < MAPPED_BYTES or _ANONYMOUS is None:
        return torch.empty(shape, dtype=dtype)
    # its pages made at once (MAP_POPULATE, Linux): faster than a fault at each first touch by the read
    return torch.frombuffer(mmap.mmap(-1, n, flags=_ANONYMOUS), dtype=dtype).view(shape)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                      metadata: dict[str, str]) -> str:
    """Write a safetensors file one tensor at a time, popping each from `tensors` once written: memory holds
    one converted tensor at a time (the format: 8-byte header length, JSON header, then the raw bytes).
    Returns the file's sha256, computed while writing."""
    if sys.byteorder != "little":
        raise FairportError("writing safetensors needs a little-endian machine")
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * dtypes[name].itemsize
        header[name] = {"dtype": NAMES[dtypes[name]], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for name in list(tensors):
            t = tensors.pop(name).to(dtypes[name]).contiguous()
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy().data
                f.write(data)
                digest.update(data)
            del t
    return digest.hexdigest()
