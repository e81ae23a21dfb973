"""`fairport bench DST_or_PRESET`: time the reference, fairseq and transformers on the same inputs in the
same run, checking that the reference's outputs equal fairseq's while it is timed.

Presets build fairseq models at the published shapes with random weights (fixtures.BENCH_PRESETS), convert
them with fairport (peak RSS and wall time of the conversion recorded next to a plain read+write of the
same bytes), then time every side. Random weights rarely emit EOS, so every hypothesis runs exactly
`--steps` decoder steps (min_len = max_len_b = steps): equal work on each side, and ms/step is exact.
Each side runs in its own process (peak RSS per side), with a warm-up and `--repeats` timed runs.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.reference.batching import pad_batch
from fairport.reference.load import PRECISIONS


def side_dtypes(side: str, dtypes: list[str]) -> list[str]:
    """The precisions a side is timed in: fairseq is the fp32 baseline of every one; int8 is the reference's and
    CTranslate2's; CTranslate2 on the CPU is timed in float32 and int8."""
    if side == "fairseq":
        return ["float32"]
    if side == "ctranslate2":
        return [d for d in dtypes if d in ("float32", "int8")]
    if side in ("transformers", "reference-unpacked", "reference-compiled"):
        return [d for d in dtypes if d != "int8"]
    return list(dtypes)


def convert_ctranslate2(checkpoint: Path, workdir: Path, dtype: str) -> tuple[Path, dict]:
    """CTranslate2's own conversion of the fairseq checkpoint (verify/ctranslate2.py), timed and sized."""
    from fairport.validation.verify.ctranslate2 import convert

    t0 = time.perf_counter()
    out = convert(checkpoint, workdir / f"ct2-{checkpoint.parent.name}-{dtype}", quantization=dtype)
    size = sum(f.stat().st_size for f in out.iterdir())
    return out, {"seconds": time.perf_counter() - t0, "model_mb": size / 2**20}


def _timed(fn, repeats: int, warmup_s: float = 1.0):
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


def _summary(times: list[float], sentences: int, tokens: int, steps: int) -> dict:
    best = min(times)
    return {"min_s": best, "median_s": statistics.median(times), "runs": len(times),
            "sentences_per_s": sentences / best, "tokens_per_s": tokens / best, "ms_per_step": 1000 * best / steps}


# ---- side workers (each in its own process) -------------------------------------------------------

def _time_configs(job: dict, prepare, tokens_of, set_threads=torch.set_num_threads) -> dict:
    """Time every configuration of a side at every thread count (job["threads"]): `prepare(cfg, src, threads)`
    gives the call that generates for one batch, `tokens_of(output, cfg)` each sentence's top hypothesis (taken
    out of the timed calls). Each configuration's result is its fastest thread count's; all are reported."""
    inputs = torch.load(job["inputs"], weights_only=True)
    results: dict = {}
    for threads in job["threads"]:
        set_threads(threads)
        for cfg in job["configs"]:
            src = inputs[f"src.{cfg['batch']}"].to(job["device"])
            out, times = _timed(prepare(cfg, src, threads), job["repeats"], job.get("warmup_s", 1.0))
            toks = tokens_of(out, cfg)
            r = {**_summary(times, src.size(0), sum(map(len, toks)), cfg["steps"]), "tokens": toks, "threads": threads}
            best = results.get(cfg["key"])
            by_threads = {**(best or {}).get("ms_per_step_by_threads", {}), str(threads): r["ms_per_step"]}
            if best is None or r["min_s"] < best["min_s"]:
                best = r
            results[cfg["key"]] = {**best, "ms_per_step_by_threads": by_threads}
    return results


def _loaded(cache: dict, key, load) -> object:
    """A model per key, loaded once; the first load's wall time per dtype goes to cache["load_seconds"]."""
    if key not in cache:
        t0 = time.perf_counter()
        cache[key] = load()
        cache.setdefault("load_seconds", {}).setdefault(str(key[0] if isinstance(key, tuple) else key),
                                                        time.perf_counter() - t0)
    return cache[key]


def _reference_worker(job: dict, pack: bool = True, compile: bool = False) -> dict:
    from fairport.reference import load

    models: dict = {}

    def prepare(cfg, src, threads):  # with compile, the load time includes compiling the step
        key = cfg["dtype"]
        if compile:  # inductor's code runs on the threads there were when it was compiled: once per count
            key = (cfg["dtype"], threads)
            for old in [k for k in models if isinstance(k, tuple) and k != key]:
                del models[old]  # one compiled model at a time: the side's peak memory is one model's
        model = _loaded(models, key, lambda: load(job["folder"], device=job["device"], dtype=cfg["dtype"],
                                                  pack=pack, compile=compile))
        return functools.partial(model.generate, src, **cfg["options"])

    results = _time_configs(job, prepare, lambda hyps, cfg: [h[0]["tokens"].tolist() for h in hyps])
    return {**results, "load_seconds": models.get("load_seconds", {})}


def _transformers_worker(job: dict) -> dict:
    import transformers
    from transformers import AutoModelForSeq2SeqLM

    transformers.logging.set_verbosity_error()
    models: dict = {}

    def prepare(cfg, src, threads):
        m = _loaded(models, cfg["dtype"], lambda: AutoModelForSeq2SeqLM.from_pretrained(
            job["folder"], dtype=PRECISIONS[cfg["dtype"]]).eval().to(job["device"]))
        o = cfg["options"]
        return functools.partial(torch.no_grad()(m.generate), input_ids=src, attention_mask=src.ne(job["pad"]),
                                 num_beams=o["beam"], do_sample=False, min_new_tokens=o["min_len"],
                                 max_new_tokens=o["max_len_b"] + 1, length_penalty=o.get("lenpen", 1.0),
                                 early_stopping=True, no_repeat_ngram_size=o.get("no_repeat_ngram_size", 0) or 0)

    def tokens_of(out, cfg):  # after its start token; its last step picks a token where fairseq's must end
        return [row.tolist()[1:][: cfg["steps"] - 1] + [job["eos"]] for row in out]

    results = _time_configs(job, prepare, tokens_of)
    return {**results, "load_seconds": models.get("load_seconds", {})}


def _fairseq_worker(job: dict) -> dict:
    from fairseq import checkpoint_utils

    from fairport.validation.original.worker import _fix_ngram_blocking, reset_beam_size, sequence_generator

    _fix_ngram_blocking()
    t0 = time.perf_counter()
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([job["checkpoint"]],
                                                                       arg_overrides={"data": job["data"]})
    for m in models:
        m.eval().float().to(job["device"])
    load_seconds = time.perf_counter() - t0

    def prepare(cfg, src, threads):
        reset_beam_size(models)
        sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(job["pad"]).sum(1)}}
        return functools.partial(torch.no_grad()(sequence_generator(models, task, cfg["options"]).generate), models,
                                 sample)

    results = _time_configs(job, prepare, lambda hyps, cfg: [h[0]["tokens"].tolist() for h in hyps])
    return {**results, "load_seconds": {"float32": load_seconds}}


def _ctranslate2_worker(job: dict) -> dict:
    """CTranslate2 on its own conversion of the checkpoint (ct2-fairseq-converter; fp32, and int8 with
    --quantization int8): the same sources as tokens of its vocabulary (fairseq's dictionary, in order), each
    hypothesis held to the same number of decoder steps as the others (min = max decoding length)."""
    import ctranslate2

    from fairport.validation.verify.ctranslate2 import vocabularies

    models: dict = {}
    vocab = {d: vocabularies(Path(f)) for d, f in job["ctranslate2"].items()}  # (source, target) per precision

    def prepare(cfg, src, threads):
        folder = job["ctranslate2"][cfg["dtype"]]
        for key in [k for k in models if isinstance(k, tuple) and k != (cfg["dtype"], threads)]:
            del models[key]  # one Translator in the process at a time: its memory is one model's, as deployed
        translator = _loaded(models, (cfg["dtype"], threads), lambda: ctranslate2.Translator(
            folder, device=job["device"], compute_type="int8" if cfg["dtype"] == "int8" else "float32",
            inter_threads=1, intra_threads=threads))
        o = cfg["options"]
        source = vocab[cfg["dtype"]][0]
        tokens = [[source[i] for i in row.tolist() if i not in (job["pad"], job["eos"])] for row in src]
        return functools.partial(translator.translate_batch, tokens, beam_size=o["beam"],
                                 length_penalty=o.get("lenpen", 1.0),
                                 no_repeat_ngram_size=o.get("no_repeat_ngram_size", 0),
                                 min_decoding_length=cfg["steps"], max_decoding_length=cfg["steps"])

    def tokens_of(out, cfg):  # its last step picks a token where the others must end: compare what precedes
        index = {t: i for i, t in enumerate(vocab[cfg["dtype"]][1])}
        return [[index[t] for t in r.hypotheses[0][: cfg["steps"] - 1]] + [job["eos"]] for r in out]

    results = _time_configs(job, prepare, tokens_of, set_threads=lambda t: None)
    return {**results, "load_seconds": models.get("load_seconds", {})}


WORKERS = {"reference": _reference_worker, "reference-unpacked": lambda job: _reference_worker(job, pack=False),
           "reference-compiled": lambda job: _reference_worker(job, compile=True),
           "fairseq": _fairseq_worker, "transformers": _transformers_worker, "ctranslate2": _ctranslate2_worker}


def _run_side(side: str, job: dict, tmp: Path, timeout: float) -> dict:
    job_path = tmp / f"{side}.json"
    job_path.write_text(json.dumps({**job, "side": side, "out": str(tmp / f"{side}.out.json")}))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if side == "fairseq":
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # fairseq 0.12 under torch >= 2.6, on its own side only
    proc = subprocess.run([sys.executable, "-m", "fairport.validation.bench", "--worker", str(job_path)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if lines and lines[-1].startswith("fairport: error: "):  # a FairportError in the worker: its one line
            raise FairportError(f"bench side {side}: {lines[-1].removeprefix('fairport: error: ')}")
        raise FairportError(f"bench side {side} failed:\n" + "\n".join(lines[-12:]))
    return json.loads((tmp / f"{side}.out.json").read_text())


def worker_main(job_path: str) -> None:
    from fairport.util import peak_rss_mb

    job = json.loads(Path(job_path).read_text())
    results = WORKERS[job["side"]](job)  # each side sets its thread counts (job["threads"]) as it times
    results["peak_rss_mb"] = peak_rss_mb()  # this process's own peak (VmHWM), not ru_maxrss (see peak_rss_mb)
    Path(job["out"]).write_text(json.dumps(results))


# ---- roofline ---------------------------------------------------------------------------------------

def roofline(dim: int, ffn: int, rows: list[int], dtypes: list[str], device: str) -> dict:
    """This machine's limits at the model's shapes: memory read bandwidth (a 256 MB reduction), and for each
    dtype the matmul GFLOP/s and weight-read GB/s (256 MB matrix times one row) of torch's default path
    (`F.linear`, what fairseq and transformers use) and of the reference's packed oneDNN path (CPU); for
    int8, of the int8 product (weight bytes counted at one byte a value)."""
    from fairport.reference.fast import PACKABLE_DTYPES, Int8Linear, int8_available, onednn_available, pack_linear

    block = torch.randn(64 << 20, device=device)  # 256 MB
    _, times = _timed(block.sum, 10, warmup_s=0.2)
    out = {"memory_read_gbps": block.numel() * 4 / min(times) / 1e9, "matmul_gflops": {}, "weight_read_gbps": {}}
    del block
    for name in dtypes:
        dt = PRECISIONS[name]  # int8: float32 activations
        paths = {"torch": lambda lin: lin}
        if name == "int8":
            paths = {"int8": Int8Linear} if device == "cpu" and int8_available() else {}
        elif device == "cpu" and dt in PACKABLE_DTYPES and onednn_available():
            paths["packed"] = functools.partial(pack_linear, min_numel=0)
        for path, make in paths.items():
            lin = make(_linear(ffn, dim, dt, device))
            if lin is None:  # this oneDNN cannot pack this dtype on this processor (bf16 without AVX-512 BF16/BW)
                continue
            for r in rows:
                x = torch.randn(r, dim, dtype=dt, device=device)
                _, times = _timed(functools.partial(lin, x), 20, warmup_s=0.2)
                out["matmul_gflops"][f"{path}:{name}:{r}x{dim}x{ffn}"] = 2 * r * dim * ffn / min(times) / 1e9
            rows_256mb = (256 << 20) // (dim * torch.finfo(dt).bits // 8)
            big = make(_linear(rows_256mb, dim, dt, device))
            v = torch.randn(1, dim, dtype=dt, device=device)
            _, times = _timed(functools.partial(big, v), 10, warmup_s=0.2)
            value_bytes = 1 if path == "int8" else torch.finfo(dt).bits // 8
            out["weight_read_gbps"][f"{path}:{name}"] = rows_256mb * dim * value_bytes / min(times) / 1e9
            del big
    return out


def _linear(rows: int, cols: int, dtype, device):
    """A bias-free (rows, cols) linear layer of random weights, for timing products."""
    from torch import nn

    lin = nn.Linear(cols, rows, bias=False, device="meta")
    lin.weight = nn.Parameter(torch.randn(rows, cols, dtype=dtype, device=device), requires_grad=False)
    return lin


def step_weight_bytes(cfg, bytes_per_value: int = 4, matrix_bytes_per_value: int | None = None) -> int:
    """Bytes of weights one incremental decoder step reads: every decoder matrix and vector except the
    token/position tables (a row each) and the cross-attention k/v projections (once per source).
    `matrix_bytes_per_value`: the linear layers' matrices at another width (int8: 1)."""
    model = _meta_model(cfg)
    total = 0
    for name, p in model.decoder.named_parameters(remove_duplicate=False):
        if name.startswith(("embed_tokens", "embed_positions")) or ".encoder_attn.k_proj." in name \
                or ".encoder_attn.v_proj." in name:
            continue
        width = matrix_bytes_per_value if matrix_bytes_per_value and p.dim() == 2 else bytes_per_value
        total += p.numel() * width
    return total


def _convert_measured(src: Path, dst: Path) -> dict:
    code = ("import json, sys, time\nfrom fairport.converters.convert import convert\n"
            "from fairport.util import peak_rss_mb\n"
            f"t0 = time.time(); convert({str(src)!r}, {str(dst)!r}, force=True)\n"
            "print(json.dumps({'seconds': time.time() - t0, 'peak_rss_mb': peak_rss_mb()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FairportError("conversion failed:\n" + proc.stderr[-1500:])
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    ckpt = next(Path(src).glob("*.pt"))
    size = ckpt.stat().st_size
    t0 = time.time()
    with open(ckpt, "rb") as f, open(dst.parent / ".copy-test", "wb") as g:
        while chunk := f.read(1 << 24):
            g.write(chunk)
    plain = time.time() - t0
    (dst.parent / ".copy-test").unlink()
    return {**stats, "checkpoint_mb": size / 2**20, "rss_over_file": stats["peak_rss_mb"] / (size / 2**20),
            "plain_read_write_seconds": plain}


def cpu_model() -> str:
    """The CPU's model name (packed-weight and int8 gains depend on it: a result is one CPU's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- main --------------------------------------------------------------------------------------------

def bench(target: str, sides: list[str], batches: list[int], beams: list[int], dtypes: list[str], steps: int,
          repeats: int, device: str, workdir: Path, src_len: int | None = None, say=print,
          warmup_s: float = 1.0, procs: list[int] = (), threads: list[int] | None = None) -> dict:
    from fairport.reference.folder import ModelFolder
    from fairport.validation.original.fixtures import BENCH_PRESETS

    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"device": device, "status": "not measured: no CUDA device on this machine"}
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"target": target, "device": device, "steps": steps, "cpu": cpu_model(), "cores": os.cpu_count(),
                    "environment": {k: os.environ.get(k) for k in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS")}}
    preset_gen: dict = {}
    if target in BENCH_PRESETS:
        spec = BENCH_PRESETS[target]
        src_dir = workdir / target
        if not (src_dir / "model.pt").exists():
            say(f"fairseq builds {target} at its published size (random weights) ...")
            proc = subprocess.run([sys.executable, "-m", "fairport.validation.original.fixtures", str(workdir), target,
                                   "--bench"], capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode != 0:
                raise FairportError("building the preset failed:\n" + proc.stderr[-1500:])
        folder = workdir / f"{target}-port"
        say(f"fairport convert {src_dir} {folder} ...")
        result["conversion"] = _convert_measured(src_dir, folder)
        checkpoint = src_dir / "model.pt"
        preset_gen = spec["gen"]
        src_len = src_len or spec["src_len"]
    else:
        folder = Path(target)
        checkpoint = ModelFolder.open(folder).checkpoint
        if "fairseq" in sides and not (checkpoint and checkpoint.is_file()):
            raise FairportError(f"{folder}: the source checkpoint in provenance.json is not available; "
                                f"bench the reference alone with --sides reference")
        src_len = src_len or 32
    opened = ModelFolder.open(folder)
    cfg = opened.config
    if "transformers" in sides and not opened.transformers:
        say("transformers: no compatible architecture for this folder; side skipped")
        sides = [s for s in sides if s != "transformers"]
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for b in batches:
        src = torch.randint(4, cfg.src_vocab_size, (b, src_len - 1), generator=g)
        inputs[f"src.{b}"] = torch.cat([src, torch.full((b, 1), cfg.eos)], dim=1)
    configs = []
    for dtype in dtypes:
        for b in batches:
            for beam in beams:
                o = {**preset_gen, "beam": beam, "max_len_b": steps, "min_len": steps, "max_len_a": 0}
                configs.append({"key": f"{dtype}/b{b}/beam{beam}", "dtype": dtype, "batch": b, "beam": beam,
                                "options": o, "steps": steps + 1})
    result["roofline"] = roofline(cfg.decoder_embed_dim, cfg.decoder_ffn_dim,
                                  sorted({b * k for b in batches for k in beams}), dtypes, device)
    step_bytes = step_weight_bytes(cfg)
    result["step_weights_mb_fp32"] = step_bytes / 2**20
    threads = threads or list(range(1, (os.cpu_count() or 1) + 1))
    result["threads"] = threads
    if "ctranslate2" in sides:
        result["ctranslate2_conversion"] = {}
        folders = {}
        for dtype in sorted({"float32", "int8"} & set(dtypes)):
            say(f"ct2-fairseq-converter --quantization {dtype} ...")
            folders[dtype], result["ctranslate2_conversion"][dtype] = convert_ctranslate2(checkpoint, workdir, dtype)
    with tempfile.TemporaryDirectory(prefix="fairport-bench-") as tmp:
        tmp = Path(tmp)
        torch.save(inputs, tmp / "inputs.pt")
        job = {"folder": str(folder), "checkpoint": str(checkpoint), "data": str(checkpoint.parent),
               "inputs": str(tmp / "inputs.pt"), "repeats": repeats, "warmup_s": warmup_s, "device": device,
               "pad": cfg.pad, "eos": cfg.eos, "threads": threads,
               "ctranslate2": {d: str(f) for d, f in folders.items()} if "ctranslate2" in sides else {}}
        runs: dict = {}
        for side in sides:
            for dtype in side_dtypes(side, dtypes):  # each precision in a process of its own: its own peak memory
                if side == "fairseq":  # fairseq is the fp32 baseline for every dtype the port is timed in
                    side_configs = _unique([{**c, "dtype": "float32", "key": c["key"].replace(c["dtype"], "float32", 1)}
                                            for c in configs])
                else:
                    side_configs = [c for c in configs if c["dtype"] == dtype]
                say(f"timing {side} ({dtype}) on {len(side_configs)} configurations at {threads} thread(s) ...")
                out = _run_side(side, {**job, "configs": side_configs}, tmp, timeout=7200)
                runs.setdefault(side, {"peak_rss_mb": {}, "load_seconds": {}})
                runs[side]["peak_rss_mb"][dtype] = out.pop("peak_rss_mb")
                runs[side]["load_seconds"].update(out.pop("load_seconds"))
                runs[side].update(out)
    result["runs"] = _compare(runs, configs)
    if procs:
        say(f"throughput of the reference on {THROUGHPUT_SENTENCES} sentences with {', '.join(map(str, procs))} "
            f"process(es) ...")
        result["throughput"] = [throughput(folder, n, dtypes[0], max(batches), beams[-1], steps, src_len, device,
                                           preset_gen) for n in procs]
    # the fp32 floor of one decoder step at batch 1: its weights read once at the memory's bandwidth
    result["batch1_bound_ms_per_step"] = step_bytes / (result["roofline"]["memory_read_gbps"] * 1e9) * 1000
    if "int8" in dtypes:  # the same step with its matrices at one byte a value
        int8_bytes = step_weight_bytes(cfg, matrix_bytes_per_value=1)
        result["batch1_int8_bound_ms_per_step"] = int8_bytes / (result["roofline"]["memory_read_gbps"] * 1e9) * 1000
    # how far each side's batch-1 greedy step is from its floor (1.0 = at the floor)
    bounds = {"float32": result["batch1_bound_ms_per_step"], "int8": result.get("batch1_int8_bound_ms_per_step")}
    for row in result["runs"]:
        if row["batch"] == 1 and row["beam"] == 1 and bounds.get(row["dtype"]):
            for side, r in row["sides"].items():
                if side != "fairseq" or row["dtype"] == "float32":  # fairseq's row is its fp32 run
                    r["over_batch1_bound"] = r["ms_per_step"] / bounds[row["dtype"]]
    return result


THROUGHPUT_SENTENCES = 64


def throughput(folder: Path, nproc: int, dtype: str, batch: int, beam: int, steps: int, src_len: int,
               device: str, gen: dict) -> dict:
    """The reference generating a corpus (THROUGHPUT_SENTENCES random sources, every hypothesis `steps` long)
    on `nproc` processes of this machine through torch.distributed, the cores shared out (cores // nproc
    threads each): sentences per second of the whole, from the first rank's start to the last rank's end."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    with tempfile.TemporaryDirectory(prefix="fairport-throughput-") as tmp:
        job = {"folder": str(folder), "dtype": dtype, "batch": batch, "beam": beam, "steps": steps,
               "src_len": src_len, "device": device, "gen": gen, "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(nproc), "-m", "fairport.validation.bench", "--throughput-worker",
                               str(Path(tmp) / "job.json")],
                              capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            raise FairportError(f"throughput with {nproc} processes failed:\n" + proc.stderr[-1500:])
        out = json.loads((Path(tmp) / "out.json").read_text())
    return {"processes": nproc, "threads_per_process": threads, "sentences": THROUGHPUT_SENTENCES, "batch": batch,
            "beam": beam, "dtype": dtype, **out}


def throughput_worker(job_path: str) -> None:
    from fairport.distributed import Ranks
    from fairport.reference import load
    from fairport.reference.hub import length_sorted_batches

    job = json.loads(Path(job_path).read_text())
    ranks = Ranks.from_env()
    device = ranks.start(job["device"])
    model = load(job["folder"], device=device, dtype=job["dtype"])
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(2, job["src_len"] // 2), job["src_len"] + 1, (THROUGHPUT_SENTENCES,), generator=g)
    sources = [torch.randint(4, cfg.src_vocab_size, (int(n) - 1,), generator=g).tolist() + [cfg.eos] for n in lengths]
    batches = length_sorted_batches([len(s) for s in sources], job["batch"])
    mine = [batches[b] for b in ranks.deal([sum(len(sources[i]) for i in b) for b in batches])]
    options = {**job["gen"], "beam": job["beam"], "max_len_b": job["steps"], "min_len": job["steps"], "max_len_a": 0}

    def run(idx):
        model.generate(pad_batch([sources[i] for i in idx], cfg.pad, left=True).to(device), **options)

    run(mine[0][:1])  # warm-up
    ranks.barrier()
    t0 = time.perf_counter()
    for idx in mine:
        run(idx)
    seconds = time.perf_counter() - t0
    ranks.barrier()
    wall = time.perf_counter() - t0
    per_rank = ranks.gather({"rank": ranks.rank, "sentences": sum(map(len, mine)), "seconds": seconds})
    if ranks.main:
        Path(job["out"]).write_text(json.dumps({"seconds": wall, "sentences_per_s": THROUGHPUT_SENTENCES / wall,
                                                "per_rank": per_rank}))
    ranks.stop()


def _unique(configs):
    seen, out = set(), []
    for c in configs:
        if c["key"] not in seen:
            seen.add(c["key"])
            out.append(c)
    return out


def _meta_model(cfg):
    from fairport.reference.model import EncoderDecoder

    with torch.device("meta"):
        return EncoderDecoder(cfg)


def _compare(runs: dict, configs: list[dict]) -> list[dict]:
    rows = []
    for c in configs:
        base_key = c["key"].replace(c["dtype"], "float32")
        base = runs.get("fairseq", {}).get(base_key)
        row = {"key": c["key"], "dtype": c["dtype"], "batch": c["batch"], "beam": c["beam"], "sides": {}}
        for side, res in runs.items():
            r = res.get(c["key"] if side != "fairseq" else base_key)
            if r is None:
                continue
            entry = {k: v for k, v in r.items() if k != "tokens"}
            if base is not None:
                entry["speedup_vs_fairseq_fp32"] = base["min_s"] / r["min_s"]
                entry["outputs_equal_fairseq"] = r["tokens"] == base["tokens"]
                same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
                entry["exact_match_rate"] = same / len(base["tokens"])
            row["sides"][side] = entry
        peer = runs.get("ctranslate2", {}).get(c["key"])  # the engine users pick, same precision
        for side, entry in row["sides"].items():
            if peer is not None and side != "ctranslate2":
                entry["times_ctranslate2"] = entry["min_s"] / peer["min_s"]
        rows.append(row)
    for side, res in runs.items():  # each side's process, per precision: its own peak memory and load time
        for row in rows:
            if side in row["sides"]:
                dtype = "float32" if side == "fairseq" else row["dtype"]
                row["sides"][side]["peak_rss_mb"] = res["peak_rss_mb"].get(dtype)
                row["sides"][side]["load_seconds"] = res["load_seconds"].get(dtype)
    return rows


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result.get("runs", [])
    if not rows:
        return
    sides = sorted({s for r in rows for s in r["sides"]})
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 3.6))
    w = 0.8 / max(len(sides), 1)
    for i, side in enumerate(sides):
        ax.bar([j + i * w for j in range(len(rows))], [r["sides"].get(side, {}).get("ms_per_step", 0) for r in rows],
               w, label=side)
    if result.get("batch1_bound_ms_per_step"):
        ax.axhline(result["batch1_bound_ms_per_step"], ls="--", color="k", lw=1,
                   label="fp32 floor, batch 1 (step weights at memory bandwidth)")
    ax.set_xticks([j + w * (len(sides) - 1) / 2 for j in range(len(rows))], [r["key"] for r in rows], rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel("ms per decoder step")
    ax.set_title(f"fairport bench: {result['target']} ({result['device']}, {result['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            worker_main(sys.argv[2])
        except FairportError as e:  # one line, which the parent passes on
            raise SystemExit(f"fairport: error: {e}") from None
    elif len(sys.argv) == 3 and sys.argv[1] == "--throughput-worker":
        throughput_worker(sys.argv[2])
    else:
        raise SystemExit("use `fairport bench`")


def print_results(result: dict, out: Path) -> None:
    """Write the results (JSON and a plot) and print the table `fairport bench` shows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    if "runs" not in result:
        print(f"{result['device']}: {result['status']}")
        return
    print(f"{result['cpu']}, {result['cores']} cores")
    print(f"{'config':<24}{'side':<20}{'ms/step':>9}{'sent/s':>9}{'tok/s':>9}{'vs fairseq':>11}{'x CT2':>7}"
          f"  same output")
    for row in result["runs"]:
        for side, r in row["sides"].items():
            sp = r.get("speedup_vs_fairseq_fp32")
            same = r.get("outputs_equal_fairseq")
            same = "-" if same is None else "True" if same else f"False ({r['exact_match_rate']:.0%} of sentences)"
            ct2 = r.get("times_ctranslate2")  # this side's time over CTranslate2's (issue 15's targets)
            print(f"{row['key']:<24}{side:<20}{r['ms_per_step']:>9.2f}{r['sentences_per_s']:>9.2f}"
                  f"{r['tokens_per_s']:>9.1f}{(f'{sp:.2f}x' if sp else '-'):>11}{(f'{ct2:.2f}' if ct2 else '-'):>7}"
                  f"  {same}")
    over = {(row["dtype"], side): r["over_batch1_bound"] for row in result["runs"]
            for side, r in row["sides"].items() if "over_batch1_bound" in r}

    def over_text(dtype):
        return ", ".join(f"{side} {x:.2f}x" for (d, side), x in over.items() if d == dtype) or "-"

    if result.get("batch1_bound_ms_per_step"):
        print(f"fp32 floor at batch 1: {result['batch1_bound_ms_per_step']:.2f} ms/step (the step's "
              f"{result['step_weights_mb_fp32']:.0f} MB of weights at {result['roofline']['memory_read_gbps']:.0f} "
              f"GB/s memory read); greedy batch-1 step over it: {over_text('float32')}")
    if result.get("batch1_int8_bound_ms_per_step"):
        print(f"int8 floor at batch 1: {result['batch1_int8_bound_ms_per_step']:.2f} ms/step (its matrices at one "
              f"byte a value); greedy batch-1 step over it: {over_text('int8')}")
    if "conversion" in result:
        c = result["conversion"]
        print(f"conversion: {c['seconds']:.1f}s, peak RSS {c['peak_rss_mb']:.0f} MB = {c['rss_over_file']:.2f}x the "
              f"{c['checkpoint_mb']:.0f} MB checkpoint (plain read+write: {c['plain_read_write_seconds']:.1f}s)")
    for t in result.get("throughput", []):
        print(f"throughput, {t['processes']} process(es) x {t['threads_per_process']} thread(s): "
              f"{t['sentences_per_s']:.2f} sentences/s ({t['sentences']} sentences, batch {t['batch']}, beam "
              f"{t['beam']}, {t['dtype']}; per rank: " + ", ".join(f"{r['sentences']} in {r['seconds']:.1f}s"
                                                                  for r in t["per_rank"]) + ")")
    print(f"results: {out} (+ {out.with_suffix('.png').name})")
