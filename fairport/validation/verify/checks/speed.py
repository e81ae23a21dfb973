"""Generation time of both sides (summed over the batches, each timed where it ran), per rank and together,
and each process's peak resident memory."""

from __future__ import annotations

import torch

from fairport.distributed import Ranks

NAME = "speed"
SIDES = ("original", "reference")


def report(run) -> None:
    s = run.setup
    n, records = len(s.inputs.src), run.records()

    def seconds(rec, key: str, side: str) -> float:
        return (rec.original.outputs if side == "original" else rec.checks["generation"]).seconds[key]

    section: dict = {}
    for key in s.settings:
        tokens = {side: sum(len(h["tokens"]) for h in run.outputs(side, key)) for side in SIDES}
        sec = {side: sum(seconds(rec, key, side) for rec in records) for side in SIDES}
        section[key] = {side: {"seconds": sec[side], "sentences_per_s": n / max(sec[side], 1e-9),
                               "tokens_per_s": tokens[side] / max(sec[side], 1e-9)} for side in SIDES}
        section[key]["ratio_reference_to_original"] = sec["original"] / max(sec["reference"], 1e-9)
    ranks = s.ranks.world
    section["per_rank"] = []
    for r in range(ranks):
        share = Ranks(r, ranks).deal(list(s.costs))
        section["per_rank"].append({"rank": r, "inputs": sum(len(s.batches[b]) for b in share), **{
            f"{side}_seconds": sum(seconds(run.results[b], k, side) for b in share for k in s.settings)
            for side in SIDES}})
    # all processes together: every input generated in every setting, over the busiest rank's time
    section["processes"] = ranks
    section["throughput_sentences_per_s"] = {
        side: n * len(s.settings) / max(max(r[f"{side}_seconds"] for r in section["per_rank"]), 1e-9)
        for side in SIDES}
    mem = run.rank_memory[0]
    section["peak_rss_mb"] = {"original (fairseq worker)": mem["original"],
                              "verify (reference and harness)": mem["verify"]}
    if s.device.startswith("cuda") and torch.cuda.is_available():
        section["peak_cuda_mb"] = {"reference": torch.cuda.max_memory_allocated() / 2**20}
    run.report.sections[NAME] = section
