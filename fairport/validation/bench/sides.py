"""The engines bench times, one class each, every one in a process of its own (its own peak memory): the
reference (packed, unpacked, compiled), fairseq (through the original's worker: the same SequenceGenerator
verify runs), transformers' generate() and CTranslate2's translate_batch.

A side's `prepare(cfg, src, threads)` gives the call that generates one batch; `tokens_of(out, cfg)` each
sentence's top hypothesis (taken out of the timed calls). `time_side` times every configuration at every thread
count and keeps each configuration's fastest."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.reference.load import PRECISIONS
from fairport.validation.bench.config import Config
from fairport.validation.bench.corpus import batched, run_corpus
from fairport.validation.bench.timing import summary, timed


class Side:
    """Models loaded once per key; the first load's wall time per dtype in `load_seconds`."""

    def __init__(self, job: dict):
        self.job = job
        self.models: dict = {}
        self.load_seconds: dict[str, float] = {}

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def loaded(self, key, load, only: bool = False):
        """The model for `key`, loaded on first use (`only`: the others are dropped first, so the process
        holds one model at a time, as deployed)."""
        if only:
            for old in [k for k in self.models if k != key]:
                del self.models[old]
        if key not in self.models:
            t0 = time.perf_counter()
            self.models[key] = load()
            self.load_seconds.setdefault(str(key[0] if isinstance(key, tuple) else key), time.perf_counter() - t0)
        return self.models[key]

    def prepare(self, cfg: Config, src: torch.Tensor, threads: int):
        raise NotImplementedError

    def tokens_of(self, out, cfg: Config) -> list[list[int]]:
        return [h[0]["tokens"].tolist() for h in out]

    def corpus(self, sources: list[list[int]], dtype: str, options: dict, max_tokens: int,
               threads: int) -> list[list[int]]:
        """Every source's top hypothesis, the side batching as its users do (corpus.py)."""
        raise FairportError(f"{type(self).__name__}: no corpus mode")


class Reference(Side):
    def __init__(self, job: dict, pack: bool = True, compile: bool = False):
        super().__init__(job)
        self.pack, self.compile = pack, compile

    def model(self, dtype: str, threads: int):  # with compile, the load time includes compiling the step
        from fairport.reference import load

        # inductor's code runs on the threads there were when it was compiled: a compiled model per count
        key = (dtype, threads) if self.compile else dtype
        return self.loaded(key, lambda: load(self.job["folder"], device=self.job["device"], dtype=dtype,
                                             pack=self.pack, compile=self.compile), only=self.compile)

    def prepare(self, cfg, src, threads):
        return functools.partial(self.model(cfg.dtype, threads).generate, src, **cfg.options)

    def corpus(self, sources, dtype, options, max_tokens, threads):  # `fairport generate --max-tokens`
        model = self.model(dtype, threads)
        return batched(sources, max_tokens, self.job["pad"], lambda src: [
            h[0]["tokens"].tolist() for h in model.generate(src.to(self.job["device"]), **options)])


class Transformers(Side):
    def prepare(self, cfg, src, threads):
        import transformers
        from transformers import AutoModelForSeq2SeqLM

        transformers.logging.set_verbosity_error()
        m = self.loaded(cfg.dtype, lambda: AutoModelForSeq2SeqLM.from_pretrained(
            self.job["folder"], dtype=PRECISIONS[cfg.dtype]).eval().to(self.job["device"]))
        o = cfg.options
        return functools.partial(torch.no_grad()(m.generate), input_ids=src, attention_mask=src.ne(self.job["pad"]),
                                 num_beams=o["beam"], do_sample=False, min_new_tokens=o["min_len"],
                                 max_new_tokens=o["max_len_b"] + 1, length_penalty=o.get("lenpen", 1.0),
                                 early_stopping=True, no_repeat_ngram_size=o.get("no_repeat_ngram_size", 0) or 0)

    def tokens_of(self, out, cfg):  # after its start token; its last step picks a token where fairseq's must end
        return [row.tolist()[1:][: cfg.steps - 1] + [self.job["eos"]] for row in out]


class Fairseq(Side):
    """fairseq as verify runs it: the original's worker state (its loading, overrides, task fixes and fixed n-gram
    blocking) and its Generate handler (the task's inference step over SequenceGenerator), called in this process
    (bench's side process is already fairseq's own)."""

    def __init__(self, job: dict):
        from fairport.validation.original.worker import State

        super().__init__(job)
        self.state = State({"checkpoints": [job["checkpoint"]], "data": job["data"], "device": job["device"],
                            "overrides": {}})
        t0 = time.perf_counter()
        self.state.loaded  # noqa: B018 (loads the models)
        self.load_seconds["float32"] = time.perf_counter() - t0

    def generate(self, src: torch.Tensor, options: dict):
        from fairport.validation.original.protocol import Generate
        from fairport.validation.original.worker import generate

        return generate(self.state, Generate(src, options)).hypotheses

    def prepare(self, cfg, src, threads):
        return functools.partial(self.generate, src, cfg.options)

    def corpus(self, sources, dtype, options, max_tokens, threads):  # fairseq-generate --max-tokens
        return batched(sources, max_tokens, self.job["pad"],
                       lambda src: self.tokens_of(self.generate(src.to(self.job["device"]), options), None))


class CTranslate2(Side):
    """CTranslate2 on its own conversion of the checkpoint (ct2-fairseq-converter; fp32, and int8 with
    --quantization int8): the same sources as tokens of its vocabulary (fairseq's dictionary, in order), each
    hypothesis held to the same number of decoder steps as the others (min = max decoding length)."""

    def __init__(self, job: dict):
        from fairport.validation.verify.ctranslate2 import vocabularies

        super().__init__(job)
        self.vocab = {d: vocabularies(Path(f)) for d, f in job["ctranslate2"].items()}  # (source, target)

    def set_threads(self, threads: int) -> None:  # a Translator has its own threads (intra_threads)
        pass

    def translator(self, dtype: str, threads: int):
        """One Translator in the process at a time: its memory is one model's, as deployed."""
        import ctranslate2

        job = self.job
        return self.loaded((dtype, threads), lambda: ctranslate2.Translator(
            job["ctranslate2"][dtype], device=job["device"], compute_type="int8" if dtype == "int8" else "float32",
            inter_threads=1, intra_threads=threads), only=True)

    def source_tokens(self, dtype: str, rows) -> list[list[str]]:
        """fairseq ids -> CTranslate2's source tokens (without padding and the </s> it adds itself)."""
        source, skip = self.vocab[dtype][0], (self.job["pad"], self.job["eos"])
        return [[source[i] for i in row if i not in skip] for row in rows]

    def prepare(self, cfg, src, threads):
        o = cfg.options
        tokens = self.source_tokens(cfg.dtype, src.tolist())
        return functools.partial(self.translator(cfg.dtype, threads).translate_batch, tokens, beam_size=o["beam"],
                                 length_penalty=o.get("lenpen", 1.0),
                                 no_repeat_ngram_size=o.get("no_repeat_ngram_size", 0),
                                 min_decoding_length=cfg.steps, max_decoding_length=cfg.steps)

    def tokens_of(self, out, cfg):  # its last step picks a token where the others must end: compare what precedes
        index = {t: i for i, t in enumerate(self.vocab[cfg.dtype][1])}
        return [[index[t] for t in r.hypotheses[0][: cfg.steps - 1]] + [self.job["eos"]] for r in out]

    def corpus(self, sources, dtype, options, max_tokens, threads):  # translate_batch, token-budget batches
        eos, index = self.job["eos"], {t: i for i, t in enumerate(self.vocab[dtype][1])}
        out = self.translator(dtype, threads).translate_batch(
            self.source_tokens(dtype, sources), max_batch_size=max_tokens, batch_type="tokens",
            beam_size=options["beam"], length_penalty=options.get("lenpen", 1.0),
            max_decoding_length=options["max_len_b"], no_repeat_ngram_size=options.get("no_repeat_ngram_size", 0),
            return_end_token=True)
        hyps = [[index[t] for t in r.hypotheses[0]] for r in out]  # at the limit fairseq forces </s>: added
        return [h if h and h[-1] == eos else h + [eos] for h in hyps]


SIDES = {"reference": Reference, "reference-unpacked": functools.partial(Reference, pack=False),
         "reference-compiled": functools.partial(Reference, compile=True), "fairseq": Fairseq,
         "transformers": Transformers, "ctranslate2": CTranslate2}


def time_side(side: Side, job: dict) -> dict:
    """Every configuration at every thread count (job["threads"]); each configuration's result is its fastest
    thread count's, with all counts' ms/step."""
    inputs = torch.load(job["inputs"], weights_only=True)
    results: dict = {}
    for threads in job["threads"]:
        side.set_threads(threads)
        for cfg in (Config(**c) for c in job["configs"]):
            src = inputs[f"src.{cfg.batch}"].to(job["device"])
            out, times = timed(side.prepare(cfg, src, threads), job["repeats"], job.get("warmup_s", 1.0))
            toks = side.tokens_of(out, cfg)
            r = {**summary(times, src.size(0), sum(map(len, toks)), cfg.steps), "tokens": toks, "threads": threads}
            best = results.get(cfg.key)
            by_threads = {**(best or {}).get("ms_per_step_by_threads", {}), str(threads): r["ms_per_step"]}
            if best is None or r["min_s"] < best["min_s"]:
                best = r
            results[cfg.key] = {**best, "ms_per_step_by_threads": by_threads}
    return results


def run_side(name: str, job: dict, configs: list[Config], tmp: Path, timeout: float) -> dict:
    """Side `name` on `configs` in a process of its own: its results, peak RSS and load times."""
    job_path = tmp / f"{name}.json"
    job_path.write_text(json.dumps({**job, "side": name, "configs": [asdict(c) for c in configs],
                                    "out": str(tmp / f"{name}.out.json")}))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if name == "fairseq":
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # fairseq 0.12 under torch >= 2.6, on its own side only
    proc = subprocess.run([sys.executable, "-m", "fairport.validation.bench", "--worker", str(job_path)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if lines and lines[-1].startswith("fairport: error: "):  # a FairportError in the worker: its one line
            raise FairportError(f"bench side {name}: {lines[-1].removeprefix('fairport: error: ')}")
        raise FairportError(f"bench side {name} failed:\n" + "\n".join(lines[-12:]))
    return json.loads((tmp / f"{name}.out.json").read_text())


def worker_main(job_path: str) -> None:
    from fairport.util import peak_rss_mb

    job = json.loads(Path(job_path).read_text())
    side = SIDES[job["side"]](job)
    # each side sets its thread counts (job["threads"]) as it times
    results = run_corpus(side, job) if job.get("corpus") else time_side(side, job)
    results["load_seconds"] = dict(side.load_seconds)
    results["peak_rss_mb"] = peak_rss_mb()  # this process's own peak (VmHWM), not ru_maxrss (see peak_rss_mb)
    Path(job["out"]).write_text(json.dumps(results))
