"""The model folder `fairport convert` writes, read in one place (converters/write.py writes it).

    config.json              transformers' fields when one of its architectures reproduces the model, and
                             "fairport": {"model": ModelConfig fields, "weight_names", "text", "multilingual", ...}
    generation_config.json   transformers' names, and "fairseq": fairseq's generation options
    provenance.json          the source checkpoint and its sha256, the inputs read, notes, dropped tensors, and
                             the sha256 of every file written
    model.safetensors        or model-0000N-of-0000M.safetensors with model.safetensors.index.json
    model.int8.safetensors   with convert --int8: the int8 model (int8 weights, a float32 scale per row)
    dict.src.txt, dict.tgt.txt, tokenizer files; ensemble/model{N}/ for an ensemble's later members
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fairport.errors import FairportError
from fairport.reference.config import ModelConfig
from fairport.util import first_line

CONFIG, GENERATION, PROVENANCE = "config.json", "generation_config.json", "provenance.json"
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
INT8 = "model.int8.safetensors"  # convert --int8: the int8 model's weights and scales (fast.int8_tensors)
CARD = "README.md"  # the model card `fairport card` writes; its last line marks it as fairport's, unedited
CARD_MARK = "<!-- fairport card sha256: "

# folders written before config.json carried `fairport.text` named their pipeline in one word
LEGACY_TEXT = {"gpt2": {"tokenizer": None, "bpe": "gpt2", "bart": True},
               "fastbpe": {"tokenizer": "moses", "bpe": "fastbpe", "bart": False}}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def signed_card(text: str) -> str:
    """A card as `fairport card` writes it: its text, then a line with the text's sha256 (how upload and
    convert --force tell fairport's card from one a person edited)."""
    text = text if text.endswith("\n") else text + "\n"
    return f"{text}{CARD_MARK}{hashlib.sha256(text.encode()).hexdigest()} -->\n"


def card_is_fairports(path: Path) -> bool:
    """Whether `path` is a card fairport wrote and nobody changed since."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, _, mark = text.rstrip("\n").rpartition("\n")
    return mark.startswith(CARD_MARK) and signed_card(body + "\n") == text


def damaged(path: Path, what: str) -> FairportError:
    """The one-line error for a folder file that is cut short, changed or missing: what, and the fix."""
    return FairportError(f"{path} {what}: the model folder is damaged or incomplete (a failed copy or download?); "
                         f"copy it again, or convert again (fairport convert SRC {path.parent} --force)")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f"is not valid JSON ({first_line(e)})") from None


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    config: ModelConfig
    meta: dict  # config.json's "fairport" section
    generation: dict  # generation_config.json's "fairseq" section: fairseq's option names
    provenance: dict
    dtype: str  # the stored weights' dtype (config.json's fairport.stored_dtype; older folders: its torch_dtype)

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FairportError(f"{path} is not a fairport model folder (no {CONFIG}; make one with fairport convert)")
        config = _json(path / CONFIG)
        try:
            meta = config["fairport"]
            model = ModelConfig.from_dict(meta["model"])
        except (KeyError, ValueError, TypeError) as e:
            raise FairportError(f"{path / CONFIG} is not a fairport config ({e})") from None
        return cls(path, model, meta, _json(path / GENERATION).get("fairseq", {}), _json(path / PROVENANCE),
                   str(meta.get("stored_dtype") or config.get("torch_dtype", "float32")))

    @property
    def text(self) -> dict | None:
        """The text pipeline (tokenizer, BPE, BART framing), or None: the folder takes token ids only."""
        spec = self.meta.get("text") or LEGACY_TEXT.get(self.meta.get("tokenizer") or "")
        if spec and spec.get("tokenizer") == "moses" and "moses_source_lang" not in spec:
            # legacy folders: Moses ran in the task's languages
            spec = {"moses_source_lang": self.meta.get("source_lang"),
                    "moses_target_lang": self.meta.get("target_lang"), **spec}
        return spec

    @property
    def weight_names(self) -> str:
        """How the weights are named: "fairport" (the reference's) or a transformers family."""
        return self.meta.get("weight_names", "fairport")

    @property
    def transformers(self) -> str | None:
        """The transformers architecture that loads this folder (bart, mbart, fsmt, m2m_100), if any."""
        return self.meta.get("transformers")

    @property
    def inputs(self) -> dict[str, str]:
        """The files conversion read besides the checkpoint (dictionaries, BPE files, a language list)."""
        return self.provenance.get("inputs", {})

    @property
    def notes(self) -> list[str]:
        return self.provenance.get("notes", [])

    @property
    def checkpoint(self) -> Path | None:
        recorded = self.provenance.get("source", {}).get("checkpoint")
        return Path(recorded) if recorded else None

    def members(self) -> list[ModelFolder]:
        """This folder and, for an ensemble, its other members (ensemble/model{N})."""
        return [self] + [ModelFolder.open(self.path / sub) for sub in self.meta.get("ensemble") or []]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def transformers_rules(self) -> list[str]:
        """The fairseq search rules generation_config.json says transformers cannot express (converters/hf.py)."""
        return _json(self.path / GENERATION).get("fairseq_rules_not_expressed", [])

    def recorded_sha256(self, path: Path) -> str | None:
        """The sha256 provenance.json recorded for one of the folder's files when it was written (None: not
        recorded, e.g. a folder written before provenance listed its files)."""
        return self.provenance.get("files", {}).get(path.relative_to(self.path).as_posix())

    def int8_file(self) -> Path | None:
        """The int8 weights convert --int8 stored (None: the folder has none; int8 runs quantize its float ones).
        One that provenance lists but is gone is named, with the fix."""
        path = self.path / INT8
        if path.is_file():
            return path
        if INT8 in self.provenance.get("files", {}):
            raise damaged(path, "is missing (provenance.json lists it)")
        return None

    def weight_files(self) -> list[Path]:
        """The safetensors files, each checked to exist (a missing shard is named, with the fix)."""
        if (self.path / INDEX).exists():
            try:
                files = [self.path / f for f in sorted(set(_json(self.path / INDEX)["weight_map"].values()))]
            except (KeyError, TypeError, AttributeError):
                raise damaged(self.path / INDEX, "has no weight_map") from None
        elif (self.path / SINGLE).exists():
            files = [self.path / SINGLE]
        else:
            raise damaged(self.path / SINGLE, f"is missing (and there is no {INDEX})")
        for f in files:
            if not f.is_file():
                raise damaged(f, f"is missing (a shard {INDEX} lists)")
        return files
