"""The port in every other dtype asked for (--dtypes): its logits against the fp32 original's, its beam outputs,
their BLEU cost."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fairport.validation.verify.batch import Batch, Delta, Top, top
from fairport.validation.verify.explain import on_device
from fairport.validation.verify.quality import bleu, references
from fairport.validation.verify.setup import DTYPE_TOL

NAME = "precision"


@dataclass
class Row:
    logits: Delta
    beam: list[Top]


@dataclass
class Result:
    rows: dict[str, Row]  # dtype -> the port in that dtype on this batch


def measure(run, batch: Batch) -> Result | None:
    s = run.setup
    if not s.precision_models:
        return None
    out = Result({})
    for name, model in s.precision_models.items():
        member = model.members[0] if hasattr(model, "members") else model
        with torch.no_grad():
            d = Delta.of(member(batch.src.to(s.device), batch.prev.to(s.device)), batch.logits, batch.keep)
        hyps = model.generate(batch.src.to(s.device), prefix_tokens=on_device(batch.prefix, s.device),
                              **s.settings["beam"])
        out.rows[name] = Row(d, [top(h) for h in hyps])
    return out


def report(run) -> None:
    s = run.setup
    max_ref = max(rec.original.max_ref_logit for rec in run.records())
    theirs = run.outputs("original", "beam")
    refs = references(s)
    entries = []
    for name in s.opts.dtypes:
        if name == "float32":
            d = run.report.sections["logits"]["reference"]
            mine = run.outputs("reference", "beam")
            stats = {"max": d["max_abs"], "mean": d["mean_abs"]}
        else:
            parts = [r.rows[name] for r in run.results_of(NAME)]
            stats = {"max": max(p.logits.max for p in parts),
                     "mean": sum(p.logits.sum for p in parts) / max(sum(p.logits.values for p in parts), 1)}
            mine = run.per_input([r.checks[NAME].rows[name].beam for r in run.records()])
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(mine, theirs)) / max(len(theirs), 1)
        score_d = [abs(a["score"] - b["score"]) for a, b in zip(mine, theirs)]
        tol = s.opts.logits_tol if DTYPE_TOL[name] is None else DTYPE_TOL[name] * max_ref
        entry = {"dtype": name, "logits_max_abs": stats["max"], "logits_mean_abs": stats["mean"], "tolerance": tol,
                 "beam_exact_match": same, "score_mean_abs_delta": sum(score_d) / max(len(score_d), 1),
                 "score_max_abs_delta": max(score_d, default=0.0)}
        if name == "int8":  # what the folder gives int8 runs: its stored int8 model, or one quantized at load
            entry["int8_weights"] = "stored (convert --int8)" if s.folder.int8_file() else "quantized at load"
        if refs:
            entry["bleu"] = bleu([s.text(h["tokens"]) for h in mine], refs)
            base = bleu([s.text(h["tokens"]) for h in theirs], refs)
            if entry["bleu"] is not None and base is not None:
                entry["bleu_delta_vs_original"] = round(entry["bleu"] - base, 4)
        entries.append(entry)
        run.report.add(f"precision {name}: logits vs fp32 original", stats["max"] <= tol, stats["max"], tol,
                       f"beam exact match {same:.1%}")
    run.report.sections[NAME] = entries
