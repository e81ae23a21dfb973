"""transformers as deployed (validation/verify/transformers_side.py): generate() with the folder's generation
config on every input, every mismatch explained (the logits check measures its default load's logits)."""

from __future__ import annotations

from fairport.validation.verify.batch import Batch, Outputs
from fairport.validation.verify.explain import engine_generation
from fairport.validation.verify.report import num

NAME = "transformers"
Result = Outputs


def measure(run, batch: Batch) -> Outputs | None:
    s = run.setup
    if s.hf is None:
        return None
    out = Outputs({}, {})
    for key, options in s.settings.items():
        out.top[key], out.seconds[key] = s.hf.generate(batch.src, options, s.forced,
                                                       s.folder.config.max_target_positions)
    return out


def report(run) -> None:
    s = run.setup
    if s.hf is None:
        return
    tol = s.opts.logits_tol
    delta = run.report.sections["logits"]["transformers"]["max_abs"]
    divergent = f"its logits check failed (|Δ| {num(delta)} > {num(tol)})" if delta > tol else None
    eps = 2 * min(delta, tol)  # a log-probability moves at most twice as far as the logits do
    forced_first = s.hf.forced is not None or s.forced is not None
    run.report.sections[NAME] = {
        **run.report.sections.get(NAME, {}), "load": "AutoModelForSeq2SeqLM.from_pretrained(folder)",
        "dtype": str(next(s.hf.model.parameters()).dtype).replace("torch.", ""), "load_seconds": s.hf.load_seconds,
        "rules_not_expressed": s.hf.rules, **engine_generation(run, NAME, s.hf, eps, divergent, forced_first)}
