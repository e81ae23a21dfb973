"""Logits parity between the fairseq original and the converted folder, on one batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fairport.reference import load
from fairport.validation import original
from fairport.validation.inputs import random_batch


@dataclass
class LogitsParity:
    max_abs: float
    mean_abs: float
    positions: int
    head_max_abs: dict[str, float]

    def ok(self, tol: float = 1e-4) -> bool:
        return self.max_abs <= tol and all(v <= tol for v in self.head_max_abs.values())


def logits_parity(checkpoint: Path, data_dir: Path, folder: Path, batch: dict | None = None,
                  seed: int = 0) -> LogitsParity:
    model = load(folder, dtype=torch.float32)
    cfg = model.config
    batch = batch or random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=6, seed=seed)
    reqs = [{"kind": "logits"}] + [{"kind": "predict", "head": h} for h in cfg.classification_heads]
    ref = original.run([checkpoint], data_dir, batch, reqs)
    with torch.no_grad():
        mine = model(batch["src_tokens"], batch["prev_output_tokens"])
        heads = {h: (model.predict(h, batch["src_tokens"]) - ref[f"predict.{h}"]).abs().max().item()
                 for h in cfg.classification_heads}
    diff = (mine - ref["logits"]).abs()[batch["prev_output_tokens"].ne(cfg.pad)]
    return LogitsParity(diff.max().item(), diff.mean().item(), int(diff.shape[0]), heads)
