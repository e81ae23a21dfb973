"""`fairport bench DST_or_PRESET`: time the reference, fairseq, transformers and CTranslate2 on the same inputs
in the same run, checking that the reference's outputs equal fairseq's while it is timed.

Presets build fairseq models at the published shapes with random weights (presets.py) and convert
them with fairport, the conversion measured (build.py). Random weights rarely emit EOS, so every hypothesis runs
exactly `--steps` decoder steps (min_len = max_len_b = steps): equal work on each side, and ms/step is exact
(config.py). Each side runs in its own process, one precision at a time (its own peak RSS), with a warm-up and
`--repeats` timed runs (sides.py); rows compared and printed by results.py, the machine's floors by roofline.py,
the multi-process corpus throughput by throughput.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.validation.bench.build import convert_ctranslate2, preset
from fairport.validation.bench.config import configurations, side_configs, side_dtypes
from fairport.validation.bench.corpus import CORPUS_SIDES, compare_to_fairseq, corpus_ids, corpus_text
from fairport.validation.bench.results import compare, print_results
from fairport.validation.bench.roofline import cpu_model, floors, roofline, step_weight_bytes
from fairport.validation.bench.sides import run_side
from fairport.validation.bench.throughput import THROUGHPUT_SENTENCES, throughput

__all__ = ["bench", "print_results"]


def bench(target: str, sides: list[str], batches: list[int], beams: list[int], dtypes: list[str], steps: int,
          repeats: int, device: str, workdir: Path, src_len: int | None = None, say=print,
          warmup_s: float = 1.0, procs: list[int] = (), threads: list[int] | None = None, corpus: int = 0,
          corpus_text: Path | None = None, max_tokens: int = 4096) -> dict:
    from fairport.reference.folder import ModelFolder
    from fairport.validation.bench.presets import PRESETS

    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"device": device, "status": "not measured: no CUDA device on this machine"}
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"target": target, "device": device, "steps": steps, "cpu": cpu_model(), "cores": os.cpu_count(),
                    "environment": {k: os.environ.get(k) for k in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS")}}
    gen: dict = {}
    if target in PRESETS:
        checkpoint, folder, result["conversion"] = preset(target, workdir, say, int8="int8" in dtypes)
        gen, src_len = PRESETS[target]["gen"], src_len or PRESETS[target]["src_len"]
    else:
        folder, src_len = Path(target), src_len or 32
        checkpoint = ModelFolder.open(folder).checkpoint
        if "fairseq" in sides and not (checkpoint and checkpoint.is_file()):
            raise FairportError(f"{folder}: the source checkpoint in provenance.json is not available; "
                                f"bench the reference alone with --sides reference")
    opened = ModelFolder.open(folder)
    cfg = opened.config
    if "transformers" in sides and not opened.transformers:
        say("transformers: no compatible architecture for this folder; side skipped")
        sides = [s for s in sides if s != "transformers"]
    sources = corpus_sources(folder, cfg, corpus, corpus_text, src_len, max_tokens) if corpus else None
    configs = configurations(dtypes, batches, beams, steps, gen)
    result["roofline"] = roofline(cfg.decoder_embed_dim, cfg.decoder_ffn_dim,
                                  sorted({b * k for b in batches for k in beams}), dtypes, device)
    result["step_weights_mb_fp32"] = step_weight_bytes(cfg) / 2**20
    result["threads"] = threads = threads or list(range(1, (os.cpu_count() or 1) + 1))
    ct2: dict = {}
    if "ctranslate2" in sides:
        result["ctranslate2_conversion"] = {}
        for dtype in sorted({"float32", "int8"} & set(dtypes)):
            say(f"ct2-fairseq-converter --quantization {dtype} ...")
            ct2[dtype], result["ctranslate2_conversion"][dtype] = convert_ctranslate2(checkpoint, workdir, dtype)
    with tempfile.TemporaryDirectory(prefix="fairport-bench-") as tmp:
        tmp = Path(tmp)
        torch.save(random_sources(cfg, batches, src_len), tmp / "inputs.pt")
        job = {"folder": str(folder), "checkpoint": str(checkpoint), "data": str(checkpoint.parent),
               "inputs": str(tmp / "inputs.pt"), "repeats": repeats, "warmup_s": warmup_s, "device": device,
               "pad": cfg.pad, "eos": cfg.eos, "threads": threads, "ctranslate2": {d: str(f) for d, f in ct2.items()}}
        runs: dict = {}
        for side in sides:
            for dtype in side_dtypes(side, dtypes):  # each precision in a process of its own: its own peak memory
                mine = side_configs(side, dtype, configs)
                say(f"timing {side} ({dtype}) on {len(mine)} configurations at {threads} thread(s) ...")
                out = run_side(side, job, mine, tmp, timeout=7200)
                runs.setdefault(side, {"peak_rss_mb": {}, "load_seconds": {}})
                runs[side]["peak_rss_mb"][dtype] = out.pop("peak_rss_mb")
                runs[side]["load_seconds"].update(out.pop("load_seconds"))
                runs[side].update(out)
        if corpus:
            result["corpus"] = time_corpus(job, sources, corpus_text, sides, dtypes,
                                           {**gen, "beam": beams[-1], "max_len_a": 0, "max_len_b": steps},
                                           max_tokens, tmp, say)
    result["runs"] = compare(runs, configs)
    if procs:
        say(f"throughput of the reference on {THROUGHPUT_SENTENCES} sentences with {', '.join(map(str, procs))} "
            f"process(es) ...")
        result["throughput"] = [throughput(folder, n, dtypes[0], max(batches), beams[-1], steps, src_len, device, gen)
                                for n in procs]
    floors(result, cfg, dtypes)
    return result


def corpus_sources(folder: Path, cfg, n: int, text: Path | None, src_len: int, max_tokens: int) -> list:
    """The corpus (before any timing: a --max-tokens below its longest source is refused first)."""
    sources = corpus_text(folder, text, n) if text else corpus_ids(cfg, n, src_len)
    longest = max(map(len, sources))
    if longest > max_tokens:
        raise FairportError(f"the corpus's longest source has {longest} tokens, more than --max-tokens {max_tokens}: "
                            f"raise --max-tokens")
    return sources


def time_corpus(job: dict, sources: list, text: Path | None, sides: list[str], dtypes: list[str], options: dict,
                max_tokens: int, tmp: Path, say) -> dict:
    """Every corpus side (corpus.py) in each of its precisions, in a process of its own, on the same sources."""
    torch.save(sources, tmp / "corpus.pt")
    runs: dict = {}
    for side in [s for s in sides if s in CORPUS_SIDES]:
        for dtype in side_dtypes(side, dtypes):
            say(f"corpus: {side} ({dtype}) translates {len(sources)} sentences, batches of <= {max_tokens} tokens ...")
            out = run_side(side, {**job, "sources": str(tmp / "corpus.pt"), "corpus": {
                "dtype": dtype, "options": options, "max_tokens": max_tokens}}, [], tmp, timeout=7200)
            runs[f"{side}/{dtype}"] = out
    compare_to_fairseq(runs)
    return {"sentences": len(sources), "source": f"text: {text}" if text else "random ids, log-normal lengths",
            "source_tokens": sum(map(len, sources)), "options": options, "max_tokens": max_tokens, "sides": runs}


def random_sources(cfg, batches: list[int], src_len: int) -> dict:
    """One batch of random sources per batch size ("src.B"), each `src_len` tokens ending in </s>."""
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for b in batches:
        src = torch.randint(4, cfg.src_vocab_size, (b, src_len - 1), generator=g)
        inputs[f"src.{b}"] = torch.cat([src, torch.full((b, 1), cfg.eos)], dim=1)
    return inputs
