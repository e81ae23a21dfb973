"""Corpus throughput: a whole test set translated by each engine with its own best batching, as its users run it,
at the same beam and length rules: fairport's generate (length-sorted batches by token budget, `--max-tokens`),
fairseq's SequenceGenerator on fairseq-generate's batches (the same rule: length-sorted, at most MAX_TOKENS padded
source tokens a batch), CTranslate2's translate_batch over the whole list with `max_batch_size=MAX_TOKENS,
batch_type="tokens"` (its own sorting and batching). Each side in a process of its own (its peak RSS); the
outputs compared to fairseq's.

Sources: the folder's text pipeline on a text file (`--corpus-text`), else ids with a spread of lengths like a
test set's (`corpus_ids`). Sentences finish early or late as the model decides (no min_len): with a preset's
random weights few emit EOS, and every hypothesis runs to the limit (`--steps`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from fairport.reference.batching import pad_batch
from fairport.reference.hub import length_sorted_batches

CORPUS_SIDES = ("reference", "reference-compiled", "fairseq", "ctranslate2")


def corpus_ids(cfg, n: int, mean_len: int, seed: int = 0) -> list[list[int]]:
    """`n` sources of random ids ending in </s>, their lengths log-normal around `mean_len` (a test set's
    spread: many short sentences, a long tail), from 3 tokens to the model's source positions."""
    g = torch.Generator().manual_seed(seed)
    limit = cfg.max_source_positions - 2
    lengths = torch.exp(torch.randn(n, generator=g) * 0.5 + math.log(mean_len)).round().clamp(3, limit).long()
    return [torch.randint(4, cfg.src_vocab_size, (int(k) - 1,), generator=g).tolist() + [cfg.eos] for k in lengths]


def corpus_text(folder: Path, path: Path, n: int) -> list[list[int]]:
    """The first `n` lines of a text file through the folder's own tokenizer (as fairport generate encodes; the
    tokenizer alone, not the model)."""
    from fairport.reference.folder import ModelFolder
    from fairport.reference.tokenizer import Tokenizer

    opened = ModelFolder.open(folder)
    tokenizer = Tokenizer.from_folder(opened)
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()][:n]
    return [tokenizer.encode(ln, opened.config.max_source_positions).tolist() for ln in lines]


def run_corpus(side, job: dict) -> dict:
    """One side on the whole corpus at each thread count (job["threads"]; the fastest kept, as the step timings
    keep theirs), after a warm-up on its first source: its outputs, wall time, rates."""
    sources = torch.load(job["sources"], weights_only=True)
    c = job["corpus"]
    best: dict = {}
    by_threads = {}
    for threads in job["threads"]:
        side.set_threads(threads)
        side.corpus(sources[:1], c["dtype"], c["options"], c["max_tokens"], threads)  # warm-up
        t0 = time.perf_counter()
        outputs = side.corpus(sources, c["dtype"], c["options"], c["max_tokens"], threads)
        seconds = time.perf_counter() - t0
        by_threads[str(threads)] = seconds
        if not best or seconds < best["seconds"]:
            tokens = sum(map(len, outputs))
            best = {"seconds": seconds, "threads": threads, "sentences_per_s": len(sources) / seconds,
                    "tokens_per_s": tokens / seconds, "target_tokens": tokens, "outputs": outputs}
    return {**best, "seconds_by_threads": by_threads, "load_seconds": side.load_seconds}


def batched(sources: list[list[int]], max_tokens: int, pad: int, generate) -> list[list[int]]:
    """fairseq-generate's batching (length-sorted, at most `max_tokens` padded source tokens a batch), each batch
    left-padded and given to `generate`; the outputs in input order."""
    out: list = [None] * len(sources)
    for idx in length_sorted_batches([len(s) for s in sources], None, max_tokens):
        for i, tokens in zip(idx, generate(pad_batch([sources[i] for i in idx], pad, left=True))):
            out[i] = tokens
    return out


def compare_to_fairseq(results: dict) -> None:
    """Each side's exact-match rate against fairseq's outputs, its speed-up over fairseq and its time over
    CTranslate2's (same precision); the outputs themselves are dropped."""
    base = results.get("fairseq/float32", {})
    theirs = base.get("outputs")
    for key, r in results.items():
        if "seconds" not in r:
            continue
        side, dtype = key.split("/")
        peer = results.get(f"ctranslate2/{dtype}", {})
        if theirs is not None:
            r["exact_match_vs_fairseq"] = sum(a == b for a, b in zip(r["outputs"], theirs)) / max(len(theirs), 1)
        if "seconds" in base and side != "fairseq":
            r["speedup_vs_fairseq"] = base["seconds"] / r["seconds"]
        if "seconds" in peer and side != "ctranslate2":
            r["times_ctranslate2"] = r["seconds"] / peer["seconds"]
    for r in results.values():
        r.pop("outputs", None)
