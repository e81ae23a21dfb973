"""The port's generations against the original's in each setting (greedy, beam): exact match, score |Δ| on the
matches, and every mismatch explained (validation/verify/explain.py) or a divergence."""

from __future__ import annotations

import time

from fairport.validation.verify.batch import Batch, Outputs, top
from fairport.validation.verify.explain import explain, explain_all, on_device, tally
from fairport.validation.verify.report import num

NAME = "generation"
Result = Outputs


def measure(run, batch: Batch) -> Outputs:
    s = run.setup
    out = Outputs({}, {})
    for key, options in s.settings.items():
        t0 = time.perf_counter()
        hyps = s.port.generate(batch.src.to(s.device), prefix_tokens=on_device(batch.prefix, s.device), **options)
        out.seconds[key] = time.perf_counter() - t0
        out.top[key] = [top(h) for h in hyps]
    return out


def report(run) -> None:
    s, section = run.setup, {}
    o = s.opts
    logits = run.report.sections["logits"]["reference"]["max_abs"]
    divergent = f"the logits check failed (|Δ| {num(logits)} > {num(o.logits_tol)})" if logits > o.logits_tol else None
    found = [0]
    for key, options in s.settings.items():
        theirs, mine = run.outputs("original", key), run.outputs("reference", key)
        same = [a["tokens"] == b["tokens"] for a, b in zip(theirs, mine)]
        score_d = max((abs(a["score"] - b["score"]) for a, b, ok in zip(theirs, mine, same) if ok), default=0.0)
        mismatches = []
        for i, why in explain_all(run, f"the port's {key}", [i for i, ok in enumerate(same) if not ok],
                                  lambda i, key=key, options=options: explain(run, key, options, i), divergent, found):
            src = s.inputs.src_text[i] if s.inputs.src_text else s.text(s.inputs.src[i], source=True)
            mismatches.append({"input": i, "source": src, "original": s.text(theirs[i]["tokens"]),
                               "port": s.text(mine[i]["tokens"]), **why})
        counts, rate, _ = tally(run, f"generation ({key})", mismatches, len(same))
        section[key] = {"options": options, "exact_match": rate, "max_score_abs": score_d, "counts": counts,
                        "mismatches": mismatches,
                        "outputs": [{"original": a["tokens"], "port": b["tokens"], "original_score": a["score"],
                                     "port_score": b["score"]} for a, b in zip(theirs, mine)]}
        run.report.add(f"generation ({key}): score |Δ| on matches", score_d <= o.score_tol, score_d, o.score_tol)
    run.report.sections["generation"] = section
