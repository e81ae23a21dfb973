"""Inputs for `fairport verify`: a text file, a binarized fairseq data folder, or random valid ids; and
random batches for the tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fairport.converters.tasks import infer_language_pair
from fairport.errors import FairportError
from fairport.reference.batching import pad_batch

# fairseq/data/indexed_dataset.py: MMapIndexedDataset dtype codes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.double,
           8: np.uint16, 9: np.uint32, 10: np.uint64}
_MAGIC = b"MMIDIDX\x00\x00"


def read_mmap_dataset(prefix: Path) -> list[list[int]]:
    """Sequences of a fairseq-preprocess `mmap` dataset (PREFIX.idx + PREFIX.bin)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if not idx.exists() or not bin_.exists():
        raise FairportError(f"binarized data not found: {idx} / {bin_}")
    with open(idx, "rb") as f:
        if f.read(9) != _MAGIC:
            raise FairportError(f"{idx} is not a fairseq mmap index (only --dataset-impl mmap is read)")
        struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        (n,) = struct.unpack("<Q", f.read(8))
        offset = f.tell()
    buf = np.memmap(idx, mode="r", order="C")
    sizes = np.frombuffer(buf, dtype=np.int32, count=n, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=offset + sizes.nbytes)
    data = np.memmap(bin_, mode="r", order="C")
    dtype = _DTYPES[code]
    return [np.frombuffer(data, dtype=dtype, count=int(s), offset=int(p)).astype(np.int64).tolist()
            for s, p in zip(sizes, pointers)]


@dataclass
class Inputs:
    src: list[list[int]]  # source ids, each ending in </s> (and starting with <s> for BART text)
    refs: list[list[int]] | None = None  # reference target ids (without a start token), ending in </s>
    src_text: list[str] | None = None
    ref_text: list[str] | None = None
    origin: str = "random"
    notes: list[str] = field(default_factory=list)


def from_text_file(path: Path, tokenizer, limit: int | None, max_positions: int, source_lang: str | None = None,
                   target_lang: str | None = None) -> Inputs:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FairportError(f"cannot read --data {path}: {e.strerror}") from None
    lines = [ln for ln in lines if ln.strip()][: limit or None]
    if not lines:
        raise FairportError(f"--data {path} has no lines")
    src_text = [ln.split("\t", 1)[0] for ln in lines]
    ref_text = [ln.split("\t", 1)[1] for ln in lines] if all("\t" in ln for ln in lines) else None
    src = [tokenizer.encode(s, max_positions, source_lang, target_lang).tolist() for s in src_text]
    refs = [tokenizer.encode_target(r, max_positions, target_lang) for r in ref_text] if ref_text is not None else None
    return Inputs(src, refs, src_text, ref_text, origin=f"text file {Path(path).name}")


def from_fairseq_data(folder: Path, split: str, src_lang: str | None, tgt_lang: str | None,
                      limit: int | None) -> Inputs:
    folder = Path(folder)
    if src_lang is None or tgt_lang is None:
        src_lang, tgt_lang = infer_language_pair(folder)
    if src_lang is None:
        raise FairportError(f"cannot tell the language pair of {folder}")
    base = folder / f"{split}.{src_lang}-{tgt_lang}"
    src = read_mmap_dataset(Path(f"{base}.{src_lang}"))
    refs = read_mmap_dataset(Path(f"{base}.{tgt_lang}")) if Path(f"{base}.{tgt_lang}.idx").exists() else None
    if limit:
        src = src[:limit]
        refs = refs[:limit] if refs else None
    return Inputs(src, refs, origin=f"fairseq data {folder.name}/{base.name}.*")


def random_inputs(src_vocab: int, tgt_vocab: int, n: int, seed: int, eos: int = 2, max_len: int = 20) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    src = []
    for _ in range(n):
        length = int(torch.randint(3, max_len + 1, (1,), generator=g))
        src.append(torch.randint(4, src_vocab, (length,), generator=g).tolist() + [eos])
    return Inputs(src, None, origin=f"{n} random valid id sequences (seed {seed})")
def random_batch(src_vocab: int, tgt_vocab: int, batch: int = 5, min_len: int = 2, max_len: int = 14,
                 pad: int = 1, eos: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid ids (specials excluded), unequal lengths. Sources end in </s>; decoder inputs start
    with </s> (fairseq's prev_output_tokens); `target` is the matching right-padded reference."""
    g = torch.Generator().manual_seed(seed)
    src, prev, tgt = [], [], []
    for _ in range(batch):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        m = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        s = torch.randint(4, src_vocab, (n,), generator=g).tolist()
        t = torch.randint(4, tgt_vocab, (m,), generator=g).tolist()
        src.append(s + [eos])
        prev.append([eos] + t)
        tgt.append(t + [eos])
    return {"src_tokens": pad_batch(src, pad, left=True), "prev_output_tokens": pad_batch(prev, pad, left=False),
            "target": pad_batch(tgt, pad, left=False)}
