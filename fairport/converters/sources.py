"""What `fairport convert` reads: the checkpoint (or an ensemble's checkpoints) and the files named beside it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from fairport.converters.text import BPE_FILES, TEXT_FILES, TOKENIZERS
from fairport.errors import FairportError

# a release folder's checkpoint, by the names fairseq's releases and trainer use
CHECKPOINT_NAMES = ("model.pt", "checkpoint_best.pt", "checkpoint_last.pt", "checkpoint.pt")


@dataclass(frozen=True)
class Sources:
    """One checkpoint and what the user named about it (None: found beside the checkpoint, or as it records)."""

    checkpoint: Path
    folder: Path  # where dictionaries and BPE files are looked for
    src_dict: Path | None = None
    tgt_dict: Path | None = None
    encoder_json: Path | None = None  # the text files of TEXT_FILES (converters/text.py)
    vocab_bpe: Path | None = None
    bpecodes: Path | None = None
    sentencepiece_model: Path | None = None
    lang_dict: Path | None = None  # many-to-many: the language list file, when not where the checkpoint says
    bpe: str | None = None  # --bpe / --tokenizer given to convert (None: as the checkpoint says)
    tokenizer: str | None = None

    @property
    def explicit_files(self) -> set[str]:
        """The text files named on the command line."""
        return {name for name in TEXT_FILES if getattr(self, name) is not None}


def _file(path, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FairportError(f"{what} not found: {path}")
    return path


def find_sources(src: str | Path, **named) -> Sources:
    """The checkpoint in SRC (a file, or a release folder holding one) with the files and choices `named`
    (Sources' field names: src_dict, bpecodes, bpe, ...), each checked now."""
    src = Path(src)
    if src.is_dir() and (src / "config.json").is_file() and (src / "provenance.json").is_file():
        raise FairportError(f"{src} is a fairport model folder (already converted); convert takes the fairseq "
                            f"checkpoint it came from (its provenance.json names it)")
    if src.is_dir():
        found = [src / n for n in CHECKPOINT_NAMES if (src / n).is_file()]
        if not found:
            pts = sorted(src.glob("*.pt"))
            if len(pts) > 1:
                raise FairportError(f"{src} holds several checkpoints ({', '.join(p.name for p in pts)}); name the "
                                    f"one to convert, or an ensemble as {pts[0]}:{pts[1]}")
            if not pts:
                raise FairportError(f"no fairseq checkpoint (*.pt) in {src}")
            found = pts
        checkpoint, folder = found[0], src
    elif src.is_file():
        checkpoint, folder = src, src.parent
    else:
        raise FairportError(f"source not found: {src}")
    unknown = set(named) - {f.name for f in fields(Sources)}
    if unknown:
        raise TypeError(f"unknown source options {sorted(unknown)}")
    for name, allowed in (("bpe", BPE_FILES), ("tokenizer", TOKENIZERS)):
        value = named.get(name)
        if value and value != "none" and value not in allowed:
            raise FairportError(f"--{name} must be one of {', '.join([*allowed, 'none'])}, not {value!r}")
    files = {name: _file(named.get(name), "file") for name in (*TEXT_FILES, "lang_dict")}
    dicts = {name: _file(named.get(name), "dictionary") for name in ("src_dict", "tgt_dict")}
    return Sources(checkpoint, folder, **dicts, **files, bpe=named.get("bpe"), tokenizer=named.get("tokenizer"))


def ensemble_members(src: str | Path) -> list[Path]:
    """fairseq's `a.pt:b.pt` syntax: the members. A single checkpoint or release folder: itself. (A folder of
    several *.pt files without a model.pt is refused by find_sources: name them as a.pt:b.pt.)"""
    spec = str(src)
    if ":" in spec and not Path(spec).exists():
        return [Path(p) for p in spec.split(":") if p]
    return [Path(spec)]
