"""`fairport verify SRC DST`: the fairseq original and the port on the same inputs, as a pipeline of stages.

    verify(src, dst, opts) -> Report
        open_port          the port (and the engines, and the other dtypes asked for), the task's framing
        choose_direction   a many-to-many model's direction; the token generation starts with
        read_inputs        text, binarized data or random ids, framed as the task frames them; length-sorted
                           batches, dealt out to the ranks (fairport/distributed.py)
        run_batches        per batch, on each rank: both sides generate (greedy, beam), score teacher-forced,
                           and the port runs in each dtype; finished batches kept in OUT/shards; rank 0 gathers
        logits_and_nll     checks: logits |Δ|, teacher-forced NLL
        layer_curve        check: the first module whose output differs (first batch)
        generation         checks: every top-hypothesis mismatch explained (verify/explain.py, mismatch.py)
        transformers_side  transformers as deployed: default load, generate(), every mismatch explained
        ctranslate2_side   CTranslate2's own conversion: log-probs, generation (with --sides ...,ctranslate2)
        tokenizer_ids      check: the folder's tokenizer, and transformers' AutoTokenizer, give the original's ids
        quality, precision_matrix, speed, environment

Each stage reads and adds to one `VerifyRun` and adds its checks and its report section. The per-batch results
are the same whatever the number of processes, so a run under torchrun gives the single-process report.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from fairport import __version__
from fairport.converters.checkpoint import load_checkpoint
from fairport.converters.sources import ensemble_members, find_sources
from fairport.distributed import LAUNCHED, Ranks, restart_count
from fairport.errors import FairportError
from fairport.reference import load
from fairport.reference.batching import pad_batch
from fairport.reference.folder import ModelFolder, sha256
from fairport.reference.hub import length_sorted_batches
from fairport.reference.tokenizer import Framing
from fairport.util import first_line, peak_rss_mb
from fairport.validation.original.protocol import (
    Generate,
    Layers,
    Logits,
    Memory,
    Original,
    direction_overrides,
    hub_request,
)
from fairport.validation.verify import ctranslate2 as ct2
from fairport.validation.verify import inputs as verify_inputs
from fairport.validation.verify.explain import engine_generation, explain, explain_all, on_device, outputs_of, tally
from fairport.validation.verify.report import Report, check_report_dir, num, report_dir
from fairport.validation.verify.shards import Shards
from fairport.validation.verify.transformers_side import TransformersSide

# logits tolerance per dtype, relative to the largest |logit| of the fp32 original (fp32: absolute);
# int8 = float32 model with int8 linear layers (dynamic quantization)
DTYPE_TOL = {"float32": None, "float16": 2e-2, "bfloat16": 1e-1, "int8": 1e-1}
NGRAM_DEVIATION = ("fairseq 0.12's Python no-repeat-ngram fallback compares the padded tail of its token "
                   "buffer and never blocks (fairseq issues #5206, #4709); the original side here blocks as "
                   "fairseq 0.10.2 and its CUDA kernel do, which is what fairport implements.")
TASK_ARGS_DEVIATION = ("fairseq 0.12's translation_from_pretrained_bart reads `self.args` in build_generator and "
                       "build_dataset_for_inference, which 0.12 no longer sets (AttributeError; fairseq issues "
                       "#3169, #4479); the original side here gives the task its own cfg as `args` (the fix of "
                       "fairseq PR #4487), so the generator ends with the target language token as in the "
                       "fairseq versions mBART was released with.")
# the folder's generation options verify uses (sampling is not compared: its draws differ by design)
SEARCH_KEYS = ("beam", "lenpen", "max_len_a", "max_len_b", "min_len", "no_repeat_ngram_size", "unkpen", "eos")
FAULT = "FAIRPORT_TEST_FAULT"  # tests: "RANK:BATCH" raises on that batch, "RANK:BATCH:exit" ends the process


@dataclass
class VerifyOptions:
    data: Path | None = None  # a text file: one source per line, optionally TAB and a reference
    fairseq_data: Path | None = None  # a binarized fairseq data folder (fairseq-preprocess output)
    split: str = "test"
    limit: int | None = 100
    device: str = "cpu"
    dtypes: tuple[str, ...] = ("float32",)
    out: Path | None = None  # the report folder (report.report_dir: default DST/verify); shards go to OUT/shards
    seed: int = 0
    batch_size: int = 16
    logits_tol: float = 1e-4
    layer_tol: float = 1e-4
    score_tol: float = 1e-4
    nll_tol: float = 1e-4
    max_tie_rate: float = 0.02  # explained mismatches (near-ties, batch effects) allowed per setting
    strict: bool = False  # every top hypothesis identical (the exact_match rate), no explanation accepted
    exact_match: float = 1.0  # with strict: the rate required
    text_files: dict[str, Path] = field(default_factory=dict)  # the original's BPE files (TEXT_FILES fields)
    source_lang: str | None = None  # many-to-many models: the direction to verify
    target_lang: str | None = None
    resume: bool = False  # keep the finished batches of an interrupted run with the same inputs and options
    transformers: bool = True  # verify transformers on the folder too, as deployed (verify/transformers_side.py)
    ctranslate2: bool = False  # verify CTranslate2's conversion of SRC too (verify/ctranslate2.py)
    ctranslate2_model: Path | None = None  # ... or this ready CTranslate2 model folder
    compile: bool = False  # the port generates with the compiled decoder step (reference/compiled.py)
    progress: bool = True


@dataclass
class VerifyRun:
    """What the stages share."""

    src: Path
    folder: ModelFolder
    opts: VerifyOptions
    ranks: Ranks
    device: str
    report: Report = field(default_factory=Report)
    checkpoints: list[Path] = field(default_factory=list)
    src_dir: Path | None = None  # the original's data folder (the checkpoint's)
    port: object = None
    first_member: object = None  # logits and layer checks use an ensemble's first member
    hf: object = None  # the transformers side (TransformersSide), when the folder loads there
    ct2: object = None  # the CTranslate2 side, when asked for
    precision_models: dict = field(default_factory=dict)  # dtype -> the port in that dtype
    tokenizer: object = None
    framing: Framing | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    overrides: dict = field(default_factory=dict)  # fairseq options for loading the original
    forced: int | None = None  # the token the task forces first in generation
    inputs: verify_inputs.Inputs | None = None
    batches: list[list[int]] = field(default_factory=list)  # input indices, length-sorted (every rank alike)
    costs: list[int] = field(default_factory=list)  # each batch's source tokens: how ranks share the batches
    mine: list[int] = field(default_factory=list)  # this rank's batches
    settings: dict = field(default_factory=dict)  # "greedy"/"beam" -> generation options
    original: Original | None = None
    results: dict[int, dict] = field(default_factory=dict)  # batch -> its results (rank 0: every batch)
    delta: float = 0.0  # the largest fp32 |logit difference|, reference vs original
    shards: Shards | None = None
    traces: dict = field(default_factory=dict)  # (batch, setting) -> both searches traced there (explanations)
    rank_memory: list = field(default_factory=list)  # each rank's peak RSS (MB): its fairseq worker, itself

    def fairseq(self) -> Original:
        """The original, started on first use (a rank whose batches were all resumed may never need it)."""
        if self.original is None:
            self.original = Original(self.checkpoints, self.src_dir, self.device, self.overrides)
        return self.original

    def say(self, msg: str) -> None:
        if self.opts.progress and self.ranks.main:
            print(f"[verify] {msg}", flush=True)

    def src_batch(self, b: int) -> torch.Tensor:
        return pad_batch([self.inputs.src[i] for i in self.batches[b]], self.folder.config.pad, left=True)

    def prefix(self, rows: int) -> torch.Tensor | None:
        return None if self.forced is None else torch.full((rows, 1), self.forced, dtype=torch.long)

    def text(self, ids, source: bool = False) -> str:
        """Ids as a person reads them: the folder's text, or the ids themselves without a text pipeline."""
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, self.target_lang, source=source)

    def batches_in_order(self) -> list[dict]:
        """Every batch's results in batch order (rank 0, after the gather)."""
        return [self.results[b] for b in sorted(k for k in self.results if isinstance(k, int))]

    def per_input(self, key: str) -> list:
        """One value per input, in input order, from the per-batch results (`key`: "greedy.original", ...)."""
        out: list = [None] * len(self.inputs.src)
        for res in self.results.values():
            section, side = key.split(".")
            for i, v in zip(res["inputs"], res[section][side]):
                out[i] = v
        return out


# ---- stages -----------------------------------------------------------------------------------------

def open_port(run: VerifyRun) -> None:
    members = ensemble_members(run.src)
    run.checkpoints = [find_sources(m).checkpoint for m in members]
    run.src_dir = run.checkpoints[0].parent
    for p in run.checkpoints:  # a clear error for a missing/truncated/unsafe source before fairseq sees it
        load_checkpoint(p)
    torch.manual_seed(run.opts.seed)
    if run.opts.compile and run.opts.progress and run.ranks.main:
        print("the port's compiled decoder step (compiled once per machine, ~30 s on a tiny model, 1-2 min on large "
              "ones, then loaded from a cache) ...", file=sys.stderr)
    run.port = load(run.folder.path, device=run.device, dtype=torch.float32, compile=run.opts.compile)
    if run.opts.compile:
        run.report.note("the port generates with the compiled decoder step (reference/compiled.py)")
    run.first_member = run.port.members[0] if hasattr(run.port, "members") else run.port
    if len(run.checkpoints) > 1:
        run.report.note("ensemble: logits and layer checks use the first member")
    try:
        run.tokenizer = run.port.tokenizer
        run.framing = run.tokenizer.framing
    except FairportError:  # no text pipeline: no BART hub framing either, the ids are the dataset's
        run.framing = Framing.from_folder(run.folder)
        run.framing.bart = False
    run.precision_models = {d: load(run.folder.path, device=run.device, dtype=d) for d in run.opts.dtypes
                            if d != "float32"}
    if run.opts.ctranslate2 or run.opts.ctranslate2_model:
        open_ctranslate2(run)
    if run.folder.transformers and run.opts.transformers:
        try:
            run.hf = TransformersSide(run.folder, run.device)
        except FairportError as e:  # transformers missing or failing is reported, not fatal
            run.report.note(f"transformers side skipped: {e}")


def open_ctranslate2(run: VerifyRun) -> None:
    """CTranslate2's own conversion of SRC (rank 0 converts, into OUT/ctranslate2), or the folder given."""
    folder = run.opts.ctranslate2_model
    if folder is None:
        folder = report_dir(run.folder.path, run.opts.out) / "ctranslate2"
        if run.ranks.main:
            run.say("ct2-fairseq-converter: CTranslate2's own conversion of the checkpoint ...")
            ct2.convert(run.checkpoints[0], folder)
            framed = ct2.frame_for_task(folder, run.folder)
            if framed:
                run.report.note(f"ctranslate2: its config.json set for this task's framing ({framed}), as its "
                                f"users must (docs/verify.md)")
        run.ranks.barrier()
    run.ct2 = ct2.CTranslate2Side(Path(folder), run.device, torch.get_num_threads())


def choose_direction(run: VerifyRun) -> None:
    src_lang, tgt_lang = run.framing.default_direction()
    run.source_lang, run.target_lang = run.opts.source_lang or src_lang, run.opts.target_lang or tgt_lang
    if run.framing.multi:
        if not (run.opts.source_lang and run.opts.target_lang):
            run.report.note(f"many-to-many model: verified {run.source_lang}-{run.target_lang} (choose with "
                            f"--source-lang/--target-lang)")
        run.framing.check_direction(run.source_lang, run.target_lang)
        run.overrides = direction_overrides(run.folder, run.source_lang, run.target_lang)
    run.forced = run.framing.forced_prefix(run.target_lang)
    gen = {k: v for k, v in run.port.generation_defaults().items() if k in SEARCH_KEYS and v is not None}
    run.settings = {"greedy": {**gen, "beam": 1}, "beam": gen}


def read_inputs(run: VerifyRun) -> None:
    o, cfg = run.opts, run.folder.config
    if o.data:
        if run.tokenizer is None:
            raise FairportError("--data is text, but the folder has no text pipeline; use --fairseq-data (or convert "
                                "with the BPE files)")
        inputs = verify_inputs.from_text_file(o.data, run.tokenizer, o.limit, cfg.max_source_positions,
                                              run.source_lang, run.target_lang)
    else:
        if o.fairseq_data:
            inputs = verify_inputs.from_fairseq_data(o.fairseq_data, o.split, run.source_lang, run.target_lang, o.limit)
        else:
            inputs = verify_inputs.random_inputs(cfg.src_vocab_size, cfg.tgt_vocab_size, o.limit or 32, o.seed, cfg.eos)
        # binarized/random ids (each ending in </s>) framed as the task's dataset frames them
        inputs.src = [run.framing.task_source(s[:-1], run.source_lang, run.target_lang) for s in inputs.src]
        if inputs.refs:
            inputs.refs = [run.framing.task_target(r[:-1], run.target_lang) for r in inputs.refs]
    run.inputs = inputs
    run.batches = length_sorted_batches([len(s) for s in inputs.src], o.batch_size)
    run.costs = [sum(len(inputs.src[i]) for i in b) for b in run.batches]
    run.mine = run.ranks.deal(run.costs)
    run.say(f"{len(inputs.src)} inputs from {inputs.origin}: {len(run.batches)} batches"
            + (f" over {run.ranks.world} processes" if run.ranks.world > 1 else ""))


def run_batches(run: VerifyRun) -> None:
    """Every batch of this rank, both sides (kept in OUT/shards as it finishes); rank 0 then holds them all."""
    shards = Shards(report_dir(run.folder.path, run.opts.out) / "shards", Shards.key_of(
        run.inputs.src, run.inputs.refs, run.settings, run.opts.dtypes, run.opts.batch_size, run.device,
        [str(p) for p in run.checkpoints], [p.stat().st_size for p in run.checkpoints], run.folder.provenance,
        run.forced, run.overrides, str(run.ct2.folder) if run.ct2 else None))
    # a run torchrun restarted (--max-restarts) resumes from its kept batches by itself
    restarts = restart_count()
    resume = run.opts.resume or restarts > 0
    if run.ranks.main:  # an earlier report stays until this run's is complete (report.write)
        shards.prepare(resume)
    run.ranks.barrier()
    todo = [b for b in run.mine if not (resume and shards.path(b).exists())]
    if len(todo) < len(run.mine):
        how = f"torchrun restart {restarts}" if restarts and not run.opts.resume else "--resume"
        who = f"rank {run.ranks.rank}: " if run.ranks.world > 1 else ""
        if run.opts.progress:  # every rank says what it kept
            print(f"[verify] {who}{how}: {len(run.mine) - len(todo)} finished batches kept", flush=True)
    with _stopped_by_torchrun(run, shards):
        _run_my_batches(run, shards, todo)


@contextlib.contextmanager
def _stopped_by_torchrun(run: VerifyRun, shards: Shards):
    """Under plain torchrun, when a rank dies, the others are stopped (SIGTERM) or see their collectives fail:
    rank 0 then ends with one line naming the rank that died and its batch (its progress file, its process gone),
    not a traceback. Best effort: in some runs here rank 0 ended without a word (torchrun stopped it within
    ~60 ms, cause not isolated), and torchrun's own summary is then the only word. (The --nproc launcher names a
    dead rank itself, always.)"""
    if run.ranks.world == 1 or os.environ.get(LAUNCHED) or not run.ranks.main:
        yield
        return

    def why() -> str:
        dead = shards.dead_ranks() or "a rank ended early (torchrun's summary below names it)"
        return f"{dead}; the batches finished before are kept in {shards.folder}: rerun with --resume"

    def stopped(signum, frame):
        raise FairportError(f"torchrun stopped the run: {why()}")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    except RuntimeError as e:  # a collective failed because a peer is gone
        raise FairportError(f"{why()} ({first_line(e)[:120]})") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_my_batches(run: VerifyRun, shards: Shards, todo: list[int]) -> None:
    failure = None
    if todo:
        warm_up(run, todo[0])
    for n, b in enumerate(todo):
        shards.progress(run.ranks.rank, b, run.batches[b])
        try:
            _fault(run, b)
            shards.save(b, compute_batch(run, b))
        except Exception as e:
            failure = {"rank": run.ranks.rank, "batch": b, "inputs": run.batches[b], "error": first_line(e),
                       "hint": f"the batches finished before are kept in {shards.folder}: rerun with --resume"}
            break
        run.say(f"batch {n + 1}/{len(todo)} done" if run.ranks.world == 1 else
                f"rank 0: batch {n + 1}/{len(todo)} done")
    shards.progress(run.ranks.rank, None)
    run.ranks.check(failure)
    mine = {b: shards.load(b) for b in run.mine}
    mine["memory"] = {"original": run.original(Memory()) if run.original else None, "verify": peak_rss_mb()}
    gathered = run.ranks.gather(mine)
    run.shards = shards
    if run.ranks.main:
        run.rank_memory = [g.pop("memory") for g in gathered]
        for g in gathered:
            run.results.update(g)


def _fault(run: VerifyRun, b: int) -> None:
    """Tests' fault injection (FAIRPORT_TEST_FAULT="RANK:BATCH[:exit]"), on a run's first attempt only (a run
    torchrun restarts goes through)."""
    spec = os.environ.get(FAULT, "").split(":")
    if len(spec) >= 2 and int(spec[0]) == run.ranks.rank and int(spec[1]) == b and restart_count() == 0:
        if spec[2:] == ["exit"]:
            os._exit(3)
        raise RuntimeError(f"injected fault ({FAULT})")


def warm_up(run: VerifyRun, b: int) -> None:
    """One untimed generation on each side before anything is timed."""
    src = run.src_batch(b)[:1]
    run.fairseq()(Generate(src, run.settings["beam"], prefix=run.prefix(1), force_bos=run.framing.bart))
    run.port.generate(src.to(run.device), prefix_tokens=on_device(run.prefix(1), run.device), **run.settings["beam"])


def _nll(logits: torch.Tensor, target: torch.Tensor, pad: int) -> list:
    lp = torch.log_softmax(logits.float(), dim=-1)
    mask = target.ne(pad)
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask]
    return [float(nll.double().sum()), int(mask.sum())]


def _delta(mine: torch.Tensor, theirs: torch.Tensor, keep: torch.Tensor) -> dict:
    d = (mine.float().cpu() - theirs).abs()[keep]
    return {"sum": float(d.double().sum()), "values": d.numel(), "max": float(d.max())}


def compute_batch(run: VerifyRun, b: int) -> dict:
    """One batch, both sides: generation (greedy, beam; timed), teacher-forced logits and NLL, the per-layer
    outputs (first batch), the port in every other dtype asked for."""
    cfg, dev = run.folder.config, run.device
    idx = run.batches[b]
    src = run.src_batch(b)
    res: dict = {"inputs": idx, "seconds": {}}
    for key, options in run.settings.items():
        o = run.fairseq()(Generate(src, options, prefix=run.prefix(len(idx)), force_bos=run.framing.bart))
        t0 = time.perf_counter()
        p = run.port.generate(src.to(dev), prefix_tokens=on_device(run.prefix(len(idx)), dev), **options)
        res["seconds"][key] = {"original": o["seconds"], "reference": time.perf_counter() - t0}
        res[key] = {"original": [top(h) for h in o["hypotheses"]], "reference": [top(h) for h in p]}
    targets = [run.inputs.refs[i] for i in idx] if run.inputs.refs else [h["tokens"] for h in res["greedy"]["original"]]
    start = run.settings["beam"].get("eos", cfg.eos)  # fairseq moves the target's last token (its EOS) to the front
    prev = pad_batch([[start] + t[:-1] for t in targets], cfg.pad, left=False)
    tgt = pad_batch(targets, cfg.pad, left=False)
    theirs = run.fairseq()(Layers(src, prev) if b == 0 else Logits(src, prev))
    ref = theirs["logits"].float()
    keep = prev.ne(cfg.pad)
    res |= {"max_ref_logit": float(ref.abs()[keep].max()), "logits": {}, "nll": {"original": _nll(ref, tgt, cfg.pad)}}
    hooks = layer_outputs(run.first_member) if b == 0 else contextlib.nullcontext({})
    with torch.no_grad(), hooks as mine_layers:
        logits = run.first_member(src.to(dev), prev.to(dev))
    res["logits"]["reference"] = _delta(logits, ref, keep)
    res["nll"]["reference"] = _nll(logits.cpu(), tgt, cfg.pad)
    if b == 0:
        res["layers"] = layer_curve_of(mine_layers, theirs["layers"], src.ne(cfg.pad), keep, run.opts.layer_tol)
    if run.hf is not None:
        logits = run.hf.logits(src, prev)
        res["logits"]["transformers"] = _delta(logits, ref, keep)
        res["nll"]["transformers"] = _nll(logits, tgt, cfg.pad)
        res["transformers"] = {"seconds": {}}
        for key, options in run.settings.items():
            res["transformers"][key], res["transformers"]["seconds"][key] = run.hf.generate(
                src, options, run.forced, cfg.max_target_positions)
    if run.ct2 is not None:
        res["ctranslate2"] = ctranslate2_batch(run, src, tgt, torch.log_softmax(ref, dim=-1), targets)
    res["precision"] = {}
    for name, model in run.precision_models.items():
        member = model.members[0] if hasattr(model, "members") else model
        with torch.no_grad():
            d = _delta(member(src.to(dev), prev.to(dev)), ref, keep)
        hyps = model.generate(src.to(dev), prefix_tokens=on_device(run.prefix(len(idx)), dev), **run.settings["beam"])
        res["precision"][name] = {**d, "beam": [top(h) for h in hyps]}
    return res


def ctranslate2_batch(run: VerifyRun, src, tgt, ref_lp, targets) -> dict:
    """CTranslate2 on one batch: generation in each setting (timed), teacher-forced log-probs of the targets."""
    cfg = run.folder.config
    out: dict = {"seconds": {}}
    for key, options in run.settings.items():
        out[key], out["seconds"][key] = run.ct2.generate(src, options, cfg.pad, run.ct2.eos, run.forced,
                                                         cfg.max_target_positions)
    theirs = ref_lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    mine = run.ct2.score(src, targets, cfg.pad, run.ct2.eos)
    deltas = [abs(a - float(b)) for row, lp in enumerate(mine) for a, b in zip(lp, theirs[row, : len(targets[row])])]
    out["log_probs"] = {"sum": sum(deltas), "values": len(deltas), "max": max(deltas, default=0.0)}
    return out


def top(hyps: list[dict]) -> dict:
    """The best hypothesis, as plain numbers (what the report and the shards keep)."""
    return {"tokens": hyps[0]["tokens"].tolist(), "score": float(hyps[0]["score"])}


@contextlib.contextmanager
def layer_outputs(model):
    """Collect every stage's output (B, T, C) by name while the model runs, with forward hooks: encoder.embed,
    encoder.layers.{i}, encoder.layer_norm, decoder.embed, decoder.layers.{i}, decoder.layer_norm,
    decoder.logits (the names the original's worker gives fairseq's intermediate outputs)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name, pre=False):
        if pre:  # the first layer's input is the embedding stage's output
            return lambda module, args: out.__setitem__(name, args[0])
        return lambda module, args, result: out.__setitem__(name, result)

    for side in ("encoder", "decoder"):
        stack = getattr(model, side)
        if len(stack.layers):
            hooks.append(stack.layers[0].register_forward_pre_hook(keep(f"{side}.embed", pre=True)))
        for i, layer in enumerate(stack.layers):
            hooks.append(layer.register_forward_hook(keep(f"{side}.layers.{i}")))
        if stack.layer_norm is not None:
            hooks.append(stack.layer_norm.register_forward_hook(keep(f"{side}.layer_norm")))
    hooks.append(model.decoder.output_projection.register_forward_hook(keep("decoder.logits")))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


def layer_curve_of(mine: dict, theirs: dict, src_keep, tgt_keep, tol: float) -> list[dict]:
    curve = []
    for name, m in mine.items():
        if name not in theirs:
            continue
        keep = src_keep if name.startswith("encoder") else tgt_keep
        t = theirs[name].float()
        delta = float((m.cpu().float() - t).abs()[keep].max())
        scale = max(1.0, float(t.abs()[keep].max()))
        curve.append({"module": name, "max_abs": delta, "tolerance": tol * scale, "ok": delta <= tol * scale})
    return curve


def logits_and_nll(run: VerifyRun) -> None:
    o = run.opts
    stats, nll = {}, {}
    for res in run.batches_in_order():  # combined in batch order: the same sums for any number of processes
        for side, d in res["logits"].items():
            s = stats.setdefault(side, {"sum": 0.0, "values": 0, "max_abs": 0.0})
            s["sum"] += d["sum"]
            s["values"] += d["values"]
            s["max_abs"] = max(s["max_abs"], d["max"])
        for side, (total, count) in res["nll"].items():
            acc = nll.setdefault(side, [0.0, 0])
            acc[0] += total
            acc[1] += count
    logits = {side: {"max_abs": s["max_abs"], "mean_abs": s["sum"] / max(s["values"], 1), "values": s["values"]}
              for side, s in stats.items()}
    for side, s in logits.items():
        run.report.add(f"logits: {side} vs original (fp32)", s["max_abs"] <= o.logits_tol, s["max_abs"], o.logits_tol,
                       f"mean |Δ| {s['mean_abs']:.2e} over {s['values']} logit values")
    # the numerical noise a near-tie may be explained by: the measured |Δ|, and never more than a port passing the
    # logits check may have (a port that fails it cannot explain its mismatches away as ties)
    run.delta = min(logits["reference"]["max_abs"], o.logits_tol)
    target = "references" if run.inputs.refs else "the original's greedy outputs"
    per_token = {side: total / max(count, 1) for side, (total, count) in nll.items()}
    run.report.sections["logits"] = logits
    run.report.sections["nll"] = {"target": target, **{side: {"nll": v, "ppl": math.exp(v), "tokens": nll[side][1]}
                                                         for side, v in per_token.items()}}
    d = abs(per_token["reference"] - per_token["original"])
    run.report.add("teacher-forced NLL: reference vs original", d <= o.nll_tol, d, o.nll_tol, f"on {target}")


def layer_curve(run: VerifyRun) -> None:
    curve = run.results[0]["layers"]
    first_bad = next((r["module"] for r in curve if not r["ok"]), None)
    run.report.sections["layers"] = {"curve": curve, "first_divergent": first_bad,
                                     "batch_inputs": len(run.batches[0])}
    run.report.add("per-layer outputs match", first_bad is None, first_bad or "none diverge",
                   f"{run.opts.layer_tol} x scale",
                   f"first module whose output differs: {first_bad}" if first_bad else "")


def generation(run: VerifyRun) -> None:
    """Exact match per setting; every mismatch explained (verify/mismatch.py) or a divergence."""
    o, section = run.opts, {}
    logits = run.report.sections["logits"]["reference"]["max_abs"]
    divergent = f"the logits check failed (|Δ| {num(logits)} > {num(o.logits_tol)})" if logits > o.logits_tol else None
    found = [0]
    for key, options in run.settings.items():
        theirs, mine = outputs_of(run, "original", key), outputs_of(run, "reference", key)
        same = [a["tokens"] == b["tokens"] for a, b in zip(theirs, mine)]
        score_d = max((abs(a["score"] - b["score"]) for a, b, s in zip(theirs, mine, same) if s), default=0.0)
        mismatches = []
        for i, why in explain_all(run, f"the port's {key}", [i for i, s in enumerate(same) if not s],
                                  lambda i, key=key, options=options: explain(run, key, options, i), divergent, found):
            src = run.inputs.src_text[i] if run.inputs.src_text else run.text(run.inputs.src[i], source=True)
            mismatches.append({"input": i, "source": src, "original": run.text(theirs[i]["tokens"]),
                               "port": run.text(mine[i]["tokens"]), **why})
        counts, rate, _ = tally(run, f"generation ({key})", mismatches, len(same))
        section[key] = {"options": options, "exact_match": rate, "max_score_abs": score_d, "counts": counts,
                        "mismatches": mismatches,
                        "outputs": [{"original": a["tokens"], "port": b["tokens"], "original_score": a["score"],
                                     "port_score": b["score"]} for a, b in zip(theirs, mine)]}
        run.report.add(f"generation ({key}): score |Δ| on matches", score_d <= o.score_tol, score_d, o.score_tol)
    run.report.sections["generation"] = section


def transformers_side(run: VerifyRun) -> None:
    """transformers as deployed (verify/transformers_side.py): its default load's logits (logits_and_nll checks
    them), and generate() with the folder's generation config on every input, every mismatch explained."""
    if run.hf is None:
        return
    o = run.opts
    delta = run.report.sections["logits"]["transformers"]["max_abs"]
    divergent = f"its logits check failed (|Δ| {num(delta)} > {num(o.logits_tol)})" if delta > o.logits_tol else None
    eps = 2 * min(delta, o.logits_tol)  # a log-probability moves at most twice as far as the logits do
    forced_first = run.hf.forced is not None or run.forced is not None
    section = {**run.report.sections.get("transformers", {}),
               "load": "AutoModelForSeq2SeqLM.from_pretrained(folder)", "dtype": str(next(
        run.hf.model.parameters()).dtype).replace("torch.", ""), "load_seconds": run.hf.load_seconds,
        "rules_not_expressed": run.hf.rules, **engine_generation(run, "transformers", run.hf, eps, divergent,
                                                                forced_first)}
    run.report.sections["transformers"] = section


def ctranslate2_side(run: VerifyRun) -> None:
    """CTranslate2's conversion against the original: teacher-forced log-probs, and generation with every
    mismatch explained (verify/ctranslate2.py; its search cannot be traced, so the outputs' scores decide)."""
    if run.ct2 is None:
        return
    o, batches = run.opts, run.batches_in_order()
    parts = [res["ctranslate2"] for res in batches]
    lp = {"max_abs": max(p["log_probs"]["max"] for p in parts),
          "mean_abs": sum(p["log_probs"]["sum"] for p in parts) / max(sum(p["log_probs"]["values"] for p in parts), 1),
          "values": sum(p["log_probs"]["values"] for p in parts)}
    tol = 2 * o.logits_tol  # a log-probability moves at most twice as far as the logits do
    run.report.add("ctranslate2: teacher-forced log-probs vs original", lp["max_abs"] <= tol, lp["max_abs"], tol,
                   f"mean |Δ| {lp['mean_abs']:.2e} over {lp['values']} target tokens")
    divergent = f"its log-probs check failed (|Δ| {num(lp['max_abs'])} > {num(tol)})" if lp["max_abs"] > tol else None
    run.report.sections["ctranslate2"] = {
        "model": run.ct2.folder.name, "load_seconds": run.ct2.load_seconds, "log_probs": lp,
        **engine_generation(run, "ctranslate2", run.ct2, min(lp["max_abs"], tol), divergent, False)}


def tokenizer_ids(run: VerifyRun) -> None:
    if run.tokenizer is None or not run.inputs.src_text:
        return
    sentences = run.inputs.src_text[:200]
    req = hub_request(run.folder, "encode", sentences, files=run.opts.text_files)
    if req is None:
        run.report.note("tokenizer check skipped: the original's BPE files were not found (pass them with the "
                        "flags convert takes, e.g. --bpecodes)")
        return
    theirs = run.fairseq()(req)
    ours = [run.tokenizer.encode(s, run.folder.config.max_source_positions, run.source_lang, run.target_lang).tolist()
            for s in sentences]
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    run.report.sections["tokenizer"] = {"sentences": len(ours), "mismatches": bad[:50]}
    run.report.add("tokenizer: ids equal the original's encoder", not bad, len(bad), 0,
                   f"{len(bad)} of {len(ours)} sentences differ")
    if run.hf is not None:
        transformers_tokenizer(run, sentences, theirs)


def transformers_tokenizer(run: VerifyRun, sentences: list[str], theirs: list[list[int]]) -> None:
    """`AutoTokenizer.from_pretrained(DST)` (the card's line) against fairseq's encoder on the same sentences. A
    sentence it encodes otherwise is explained when fairport's encoder, given the text after the tokenizer's own
    normalisation step, gives its ids (FSMTTokenizer: Moses punctuation normalisation, which fairseq does not
    apply); anything else fails."""
    section = run.report.sections.setdefault("transformers", {})
    if not run.folder.file("tokenizer_config.json").exists():
        section["tokenizer"] = None
        run.report.note("transformers tokenizer not checked: the folder has no transformers tokenizer files")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.folder.path)
    normalise = getattr(tok, "moses_pipeline", None)
    rule = ("FSMTTokenizer normalises punctuation (Moses) before tokenizing; fairseq's pipeline does not: pass "
            "fairseq's text through fairport's tokenizer for fairseq's ids")
    explained, unexplained = [], []
    for i, (s, want) in enumerate(zip(sentences, theirs)):
        ids = tok(s)["input_ids"]
        if ids == want:
            continue
        if normalise is not None and run.tokenizer.encode(
                normalise(s, lang=tok.src_lang), run.folder.config.max_source_positions, run.source_lang,
                run.target_lang).tolist() == ids:
            explained.append(i)
        else:
            unexplained.append(i)
    section["tokenizer"] = {"class": type(tok).__name__, "sentences": len(sentences),
                            "mismatches": (explained + unexplained)[:50], "explained": len(explained),
                            "rule": rule if explained else None, "unexplained": unexplained[:50]}
    detail = f"{len(explained) + len(unexplained)} of {len(sentences)} sentences differ" + (
        f" ({len(explained)} by the rule: {rule})" if explained else "")
    run.report.add("transformers tokenizer: AutoTokenizer ids equal fairseq's, or a named rule", not unexplained,
                   len(unexplained), 0, detail)


def _bleu(hyps: list[str], refs: list[str]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    return round(float(sacrebleu.corpus_bleu(hyps, [refs]).score), 4)


def _rouge_l(hyps: list[str], refs: list[str]) -> float | None:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return round(100 * sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / max(len(hyps), 1), 4)


def _refs(run: VerifyRun) -> list[str] | None:
    if run.tokenizer is None or not (run.inputs.ref_text or run.inputs.refs):
        return None
    return run.inputs.ref_text or [run.text(r) for r in run.inputs.refs]


def quality(run: VerifyRun) -> None:
    if run.tokenizer is None:
        return
    hyp_o = [run.text(h["tokens"]) for h in run.per_input("beam.original")]
    hyp_m = [run.text(h["tokens"]) for h in run.per_input("beam.reference")]
    q: dict = {}
    refs = _refs(run)
    if refs:
        q["bleu"] = {"original": _bleu(hyp_o, refs), "reference": _bleu(hyp_m, refs)}
        q["rougeL"] = {"original": _rouge_l(hyp_o, refs), "reference": _rouge_l(hyp_m, refs)}
    q["bleu_between_sides"] = _bleu(hyp_m, hyp_o)
    run.report.sections["quality"] = q


def precision_matrix(run: VerifyRun) -> None:
    max_ref = max(res["max_ref_logit"] for res in run.batches_in_order())
    theirs = run.per_input("beam.original")
    refs = _refs(run)
    entries = []
    for name in run.opts.dtypes:
        if name == "float32":
            d = run.report.sections["logits"]["reference"]
            mine = run.per_input("beam.reference")
            stats = {"max": d["max_abs"], "mean": d["mean_abs"]}
        else:
            parts = [res["precision"][name] for res in run.batches_in_order()]
            stats = {"max": max(p["max"] for p in parts),
                     "mean": sum(p["sum"] for p in parts) / max(sum(p["values"] for p in parts), 1)}
            mine = [None] * len(theirs)
            for res in run.results.values():
                if isinstance(res, dict) and "precision" in res:
                    for i, h in zip(res["inputs"], res["precision"][name]["beam"]):
                        mine[i] = h
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(mine, theirs)) / max(len(theirs), 1)
        score_d = [abs(a["score"] - b["score"]) for a, b in zip(mine, theirs)]
        tol = run.opts.logits_tol if DTYPE_TOL[name] is None else DTYPE_TOL[name] * max_ref
        entry = {"dtype": name, "logits_max_abs": stats["max"], "logits_mean_abs": stats["mean"], "tolerance": tol,
                 "beam_exact_match": same, "score_mean_abs_delta": sum(score_d) / max(len(score_d), 1),
                 "score_max_abs_delta": max(score_d, default=0.0)}
        if refs:
            entry["bleu"] = _bleu([run.text(h["tokens"]) for h in mine], refs)
            base = _bleu([run.text(h["tokens"]) for h in theirs], refs)
            if entry["bleu"] is not None and base is not None:
                entry["bleu_delta_vs_original"] = round(entry["bleu"] - base, 4)
        entries.append(entry)
        run.report.add(f"precision {name}: logits vs fp32 original", stats["max"] <= tol, stats["max"], tol,
                       f"beam exact match {same:.1%}")
    run.report.sections["precision"] = entries


def speed(run: VerifyRun) -> None:
    n = len(run.inputs.src)
    section: dict = {}
    for key in run.settings:
        tokens = {side: sum(len(h["tokens"]) for h in run.per_input(f"{key}.{side}"))
                  for side in ("original", "reference")}
        sec = {side: sum(res["seconds"][key][side] for res in run.batches_in_order()) for side in tokens}
        section[key] = {side: {"seconds": sec[side], "sentences_per_s": n / max(sec[side], 1e-9),
                               "tokens_per_s": tokens[side] / max(sec[side], 1e-9)} for side in tokens}
        section[key]["ratio_reference_to_original"] = sec["original"] / max(sec["reference"], 1e-9)
    ranks = run.ranks.world
    section["per_rank"] = []
    for r in range(ranks):
        share = Ranks(r, ranks).deal(run.costs)
        section["per_rank"].append({"rank": r, "inputs": sum(len(run.batches[b]) for b in share), **{
            f"{side}_seconds": sum(run.results[b]["seconds"][k][side] for b in share for k in run.settings)
            for side in ("original", "reference")}})
    # all processes together: every input generated in every setting, over the busiest rank's time
    section["processes"] = ranks
    section["throughput_sentences_per_s"] = {
        side: n * len(run.settings) / max(max(r[f"{side}_seconds"] for r in section["per_rank"]), 1e-9)
        for side in ("original", "reference")}
    mem = run.rank_memory[0]
    section["peak_rss_mb"] = {"original (fairseq worker)": mem["original"],
                              "verify (reference and harness)": mem["verify"]}
    if run.device.startswith("cuda") and torch.cuda.is_available():
        section["peak_cuda_mb"] = {"reference": torch.cuda.max_memory_allocated() / 2**20}
    run.report.sections["speed"] = section


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "fairport": __version__}
    for pkg in ("ve-fairseq", "fairseq", "transformers", "sacrebleu", "sacremoses", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def environment(run: VerifyRun) -> None:
    deviations = [NGRAM_DEVIATION]
    if run.folder.meta.get("task") == "translation_from_pretrained_bart":
        deviations.append(TASK_ARGS_DEVIATION)
    run.report.sections["environment"] = {
        "versions": _versions(), "device": run.device, "machine": platform.machine(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "processes": run.ranks.world, "seed": run.opts.seed,
        "source_sha256": {p.name: sha256(p) for p in run.checkpoints},
        "output_sha256": run.folder.provenance.get("files", {}), "known_deviations": deviations}
    run.report.sections["inputs"] = {"origin": run.inputs.origin, "count": len(run.inputs.src),
                                     "teacher_forcing_target": run.report.sections["nll"]["target"],
                                     "batches": len(run.batches), "batch_size": run.opts.batch_size}


EVERY_RANK = [open_port, choose_direction, read_inputs, run_batches]
RANK_ZERO = [logits_and_nll, layer_curve, generation, transformers_side, ctranslate2_side, tokenizer_ids, quality,
             precision_matrix, speed, environment]


def verify(src: str | Path, dst: str | Path, opts: VerifyOptions, ranks: Ranks | None = None) -> Report | None:
    """The report on rank 0 (None on the other ranks). Raises FairportError for bad inputs and failed ranks."""
    ranks = ranks or Ranks.from_env()
    for name in opts.dtypes:
        if name not in DTYPE_TOL:
            raise FairportError(f"--dtypes: unknown dtype {name!r} (choose from {', '.join(DTYPE_TOL)})")
    check_report_dir(report_dir(dst, opts.out))
    device = ranks.start(opts.device)
    run = VerifyRun(Path(src), ModelFolder.open(dst), opts, ranks, device)
    try:
        for stage in EVERY_RANK:
            stage(run)
        if ranks.main:
            for stage in RANK_ZERO:
                stage(run)
        ranks.barrier()  # every rank's batches are in the report (report.write removes the shards once it is written)
        return run.report if ranks.main else None
    finally:
        if run.original is not None:
            run.original.close()
