"""Timing one call: a warm-up, then repeats; the best run, the median, and the rates derived from them."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int, warmup_s: float = 1.0):
    """Warm up for at least one call and `warmup_s` seconds (a fresh process's first fraction of a second
    runs slow here: page faults, thread start-up), then time `repeats` calls."""
    end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < end:
        fn()
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def summary(times: list[float], sentences: int, tokens: int, steps: int) -> dict:
    best = min(times)
    return {"min_s": best, "median_s": statistics.median(times), "runs": len(times),
            "sentences_per_s": sentences / best, "tokens_per_s": tokens / best, "ms_per_step": 1000 * best / steps}
