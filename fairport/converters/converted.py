"""What the converter derives from a checkpoint before anything is written: the data the converter's steps
(convert.py) fill and the writer (write.py) writes. Its own module, so that convert -> write -> converted has no
cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fairport.converters.multilingual import Multilingual
from fairport.reference.config import ModelConfig
from fairport.reference.dictionary import Dictionary


@dataclass
class Dictionaries:
    """The task's source and target dictionaries as fairseq builds them (task additions included)."""

    src: Dictionary
    tgt: Dictionary
    src_path: Path
    tgt_path: Path
    additions: list[str]  # symbols the task appended (language tokens, <mask>)
    multilingual: Multilingual | None = None  # a many-to-many task's languages and framing


@dataclass
class Converted:
    """Everything the converter derived from one checkpoint, before anything is written."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    dicts: Dictionaries
    options: dict  # the checkpoint's options, filled from its arch preset
    generation: dict  # the generation settings the checkpoint carries (cfg.generation), if any
    dropped: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not kept
    notes: list[str] = field(default_factory=list)
    text: dict | None = None  # the text pipeline (converters/text.py); None: ids only
    text_files: dict[str, Path] = field(default_factory=dict)
    symbols: dict[str, int] = field(default_factory=dict)  # the task's source_suffix / generation_eos ids

    @property
    def inputs(self) -> dict[str, Path]:
        """Every file read besides the checkpoint, by role (provenance.json "inputs")."""
        d = self.dicts
        lang_dict = {"lang_dict": d.multilingual.lang_dict} if d.multilingual and d.multilingual.lang_dict else {}
        return {"src_dict": d.src_path, "tgt_dict": d.tgt_path, **self.text_files, **lang_dict}
