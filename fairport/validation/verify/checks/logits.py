"""Teacher-forced logits and NLL, every side against the original's (fp32): the port, and transformers as
deployed (its default load)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fairport.validation.verify.batch import Batch, Delta, nll

NAME = "logits"


@dataclass
class Result:
    logits: dict[str, Delta]  # side -> |logit - original's logit|
    nll: dict[str, list[float]]  # side -> [summed NLL, tokens]


def measure(run, batch: Batch) -> Result:
    s = run.setup
    pad = s.folder.config.pad
    with torch.no_grad():
        logits = s.first_member(batch.src.to(s.device), batch.prev.to(s.device))
    out = Result({"reference": Delta.of(logits, batch.logits, batch.keep)},
                 {"reference": nll(logits.cpu(), batch.tgt, pad)})
    if s.hf is not None:
        logits = s.hf.logits(batch.src, batch.prev)
        out.logits["transformers"] = Delta.of(logits, batch.logits, batch.keep)
        out.nll["transformers"] = nll(logits, batch.tgt, pad)
    return out


def report(run) -> None:
    o = run.setup.opts
    stats: dict[str, list] = {}
    totals = {"original": [0.0, 0]}
    for rec in run.records():  # combined in batch order: the same sums for any number of processes
        totals["original"] = [a + b for a, b in zip(totals["original"], rec.original.nll)]
        res = rec.checks[NAME]
        for side, d in res.logits.items():
            acc = stats.setdefault(side, [0.0, 0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + d.sum, acc[1] + d.values, max(acc[2], d.max)
        for side, (total, count) in res.nll.items():
            acc = totals.setdefault(side, [0.0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count
    logits = {side: {"max_abs": mx, "mean_abs": total / max(n, 1), "values": n}
              for side, (total, n, mx) in stats.items()}
    for side, v in logits.items():
        run.report.add(f"logits: {side} vs original (fp32)", v["max_abs"] <= o.logits_tol, v["max_abs"], o.logits_tol,
                       f"mean |Δ| {v['mean_abs']:.2e} over {v['values']} logit values")
    # the numerical noise a near-tie may be explained by: the measured |Δ|, and never more than a port passing the
    # logits check may have (a port that fails it cannot explain its mismatches away as ties)
    run.delta = min(logits["reference"]["max_abs"], o.logits_tol)
    target = "references" if run.setup.inputs.refs else "the original's greedy outputs"
    per_token = {side: total / max(count, 1) for side, (total, count) in totals.items()}
    run.report.sections["logits"] = logits
    run.report.sections["nll"] = {"target": target, **{side: {"nll": v, "ppl": math.exp(v), "tokens": totals[side][1]}
                                                         for side, v in per_token.items()}}
    d = abs(per_token["reference"] - per_token["original"])
    run.report.add("teacher-forced NLL: reference vs original", d <= o.nll_tol, d, o.nll_tol, f"on {target}")
