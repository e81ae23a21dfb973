"""verify's checks, one module each. A check module has

    NAME                      its key in a batch's record (and usually its report section)
    Result                    the typed result of one batch (checks with a per-batch part)
    measure(run, batch)       that batch's Result (on every rank, in batch order; None: nothing on this batch)
    report(run)               its checks and report section, from every batch's results (rank 0, in CHECKS order)

`run` is the VerifyRun (validation/verify/run.py): `run.setup` (fixed), the gathered records, the report. A new
check is one new module and one line in CHECKS. Report order matters: logits first (its measured |Δ| bounds
the near-ties the generation checks accept), environment last (it reads the NLL's target)."""

from fairport.validation.verify.checks import (
    ctranslate2_engine,
    environment,
    generation,
    layers,
    logits,
    precision,
    quality,
    speed,
    tokenizer,
    transformers_engine,
)

CHECKS = [logits, layers, generation, transformers_engine, ctranslate2_engine, tokenizer, quality, precision, speed,
          environment]
MEASURED = [c for c in CHECKS if hasattr(c, "measure")]
