"""CTranslate2's own conversion against the original (validation/verify/ctranslate2.py): teacher-forced
log-probs, and generation with every mismatch explained (its search cannot be traced: the outputs' scores
decide)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fairport.validation.verify.batch import Batch, Delta, Outputs
from fairport.validation.verify.explain import engine_generation
from fairport.validation.verify.report import num

NAME = "ctranslate2"


@dataclass
class Result(Outputs):
    log_probs: Delta  # |its teacher-forced log-prob - the original's| over the target tokens


def measure(run, batch: Batch) -> Result | None:
    s = run.setup
    if s.ct2 is None:
        return None
    cfg = s.folder.config
    out = Result({}, {}, None)
    for key, options in s.settings.items():
        out.top[key], out.seconds[key] = s.ct2.generate(batch.src, options, cfg.pad, s.ct2.eos, s.forced,
                                                        cfg.max_target_positions)
    lp = torch.log_softmax(batch.logits, dim=-1)
    theirs = lp.gather(-1, batch.tgt.unsqueeze(-1)).squeeze(-1)
    mine = s.ct2.score(batch.src, batch.targets, cfg.pad, s.ct2.eos)
    deltas = [abs(a - float(b)) for row, lps in enumerate(mine)
              for a, b in zip(lps, theirs[row, : len(batch.targets[row])])]
    out.log_probs = Delta(sum(deltas), len(deltas), max(deltas, default=0.0))
    return out


def report(run) -> None:
    s = run.setup
    if s.ct2 is None:
        return
    parts = [r.log_probs for r in run.results_of(NAME)]
    values = sum(p.values for p in parts)
    lp = {"max_abs": max(p.max for p in parts), "mean_abs": sum(p.sum for p in parts) / max(values, 1),
          "values": values}
    tol = 2 * s.opts.logits_tol  # a log-probability moves at most twice as far as the logits do
    run.report.add("ctranslate2: teacher-forced log-probs vs original", lp["max_abs"] <= tol, lp["max_abs"], tol,
                   f"mean |Δ| {lp['mean_abs']:.2e} over {lp['values']} target tokens")
    divergent = f"its log-probs check failed (|Δ| {num(lp['max_abs'])} > {num(tol)})" if lp["max_abs"] > tol else None
    run.report.sections[NAME] = {
        "model": s.ct2.folder.name, "load_seconds": s.ct2.load_seconds, "log_probs": lp,
        **engine_generation(run, NAME, s.ct2, min(lp["max_abs"], tol), divergent, False)}
