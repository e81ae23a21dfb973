"""What a verify run is, fixed before its first batch: the options, the port and the engines it checks, the
task's framing and direction, the inputs and their batches. `open_setup` builds it; nothing changes it after."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fairport.converters.checkpoint import load_checkpoint
from fairport.converters.sources import ensemble_members, find_sources
from fairport.distributed import Ranks
from fairport.errors import FairportError
from fairport.options import report_dir
from fairport.reference import load
from fairport.reference.batching import pad_batch
from fairport.reference.folder import ModelFolder
from fairport.reference.hub import length_sorted_batches
from fairport.reference.tokenizer import Framing
from fairport.validation.original.protocol import direction_overrides
from fairport.validation.verify import ctranslate2 as ct2
from fairport.validation.verify import inputs as verify_inputs
from fairport.validation.verify.report import Report
from fairport.validation.verify.transformers_side import TransformersSide

# logits tolerance per dtype, relative to the largest |logit| of the fp32 original (fp32: absolute);
# int8 = float32 model with int8 linear layers (dynamic quantization) and int8 token embeddings
DTYPE_TOL = {"float32": None, "float16": 2e-2, "bfloat16": 1e-1, "int8": 1e-1}
# the folder's generation options verify uses (sampling is not compared: its draws differ by design)
SEARCH_KEYS = ("beam", "lenpen", "max_len_a", "max_len_b", "min_len", "no_repeat_ngram_size", "unkpen", "eos")


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

    def check(self) -> None:
        for name in self.dtypes:
            if name not in DTYPE_TOL:
                raise FairportError(f"--dtypes: unknown dtype {name!r} (choose from {', '.join(DTYPE_TOL)})")


@dataclass(frozen=True)
class Setup:
    """Every rank builds the same one (the batches are identical whatever the number of processes)."""

    src: Path
    folder: ModelFolder
    opts: VerifyOptions
    ranks: Ranks
    device: str
    checkpoints: tuple[Path, ...]  # the original: one checkpoint, or an ensemble's members
    port: object  # the reference model (an Ensemble for several checkpoints)
    first_member: object  # logits and layer checks use an ensemble's first member
    precision_models: dict  # dtype -> the port in that dtype (the other dtypes asked for)
    hf: TransformersSide | None  # the transformers side, when the folder loads there
    ct2: ct2.CTranslate2Side | None  # the CTranslate2 side, when asked for
    tokenizer: object  # the folder's text pipeline (None: ids only)
    framing: Framing
    source_lang: str | None
    target_lang: str | None
    overrides: dict  # fairseq options for loading the original (a many-to-many model's direction)
    forced: int | None  # the token the task forces first in generation
    settings: dict  # "greedy"/"beam" -> generation options
    inputs: verify_inputs.Inputs
    batches: tuple[list[int], ...]  # input indices, length-sorted
    costs: tuple[int, ...]  # each batch's source tokens: how ranks share the batches
    mine: tuple[int, ...]  # this rank's batches

    @property
    def src_dir(self) -> Path:
        """The original's data folder (the checkpoint's)."""
        return self.checkpoints[0].parent

    @property
    def out(self) -> Path:
        return report_dir(self.folder.path, self.opts.out)

    def src_batch(self, b: int) -> torch.Tensor:
        return pad_batch([self.inputs.src[i] for i in self.batches[b]], self.folder.config.pad, left=True)

    def batch_of(self, i: int) -> int:
        return next(b for b, idx in enumerate(self.batches) if i in idx)

    def prefix(self, rows: int) -> torch.Tensor | None:
        return None if self.forced is None else torch.full((rows, 1), self.forced, dtype=torch.long)

    def text(self, ids, source: bool = False) -> str:
        """Ids as a person reads them: the folder's text, or the ids themselves without a text pipeline."""
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, self.target_lang, source=source)

    def say(self, msg: str) -> None:
        if self.opts.progress and self.ranks.main:
            print(f"[verify] {msg}", flush=True)


def open_setup(src: Path, folder: ModelFolder, opts: VerifyOptions, ranks: Ranks, device: str,
               report: Report) -> Setup:
    """The port and the engines, the direction, the inputs (what setup decides is noted in `report`)."""
    checkpoints = tuple(find_sources(m).checkpoint for m in ensemble_members(src))
    for p in checkpoints:  # a clear error for a missing/truncated/unsafe source before fairseq sees it
        load_checkpoint(p)
    torch.manual_seed(opts.seed)
    if opts.compile and opts.progress and ranks.main:
        print("the port's compiled decoder step (compiled once per machine, then loaded from a cache) ...",
              file=sys.stderr)
    port = load(folder, device=device, dtype=torch.float32, compile=opts.compile)
    if opts.compile:
        report.note("the port generates with the compiled decoder step (reference/compiled.py)")
    if len(checkpoints) > 1:
        report.note("ensemble: logits and layer checks use the first member")
    try:
        tokenizer = port.tokenizer
        framing = tokenizer.framing
    except FairportError:  # no text pipeline: no BART hub framing either, the ids are the dataset's
        tokenizer, framing = None, Framing.from_folder(folder)
        framing.bart = False
    src_lang, tgt_lang, overrides, forced, settings = direction(folder, port, framing, opts, report)
    inputs = read_inputs(folder, opts, tokenizer, framing, src_lang, tgt_lang)
    batches = length_sorted_batches([len(s) for s in inputs.src], opts.batch_size)
    costs = [sum(len(inputs.src[i]) for i in b) for b in batches]
    setup = Setup(
        src=src, folder=folder, opts=opts, ranks=ranks, device=device, checkpoints=checkpoints, port=port,
        first_member=port.members[0] if hasattr(port, "members") else port,
        precision_models={d: load(folder, device=device, dtype=d) for d in opts.dtypes if d != "float32"},
        hf=transformers_side(folder, opts, device, report),
        ct2=ctranslate2_side(folder, opts, ranks, device, checkpoints[0], report),
        tokenizer=tokenizer, framing=framing, source_lang=src_lang, target_lang=tgt_lang, overrides=overrides,
        forced=forced, settings=settings, inputs=inputs, batches=tuple(batches), costs=tuple(costs),
        mine=tuple(ranks.deal(costs)))
    setup.say(f"{len(inputs.src)} inputs from {inputs.origin}: {len(batches)} batches"
              + (f" over {ranks.world} processes" if ranks.world > 1 else ""))
    return setup


def transformers_side(folder: ModelFolder, opts: VerifyOptions, device: str, report: Report):
    if not (folder.transformers and opts.transformers):
        return None
    try:
        return TransformersSide(folder, device)
    except FairportError as e:  # transformers missing or failing is reported, not fatal
        report.note(f"transformers side skipped: {e}")
        return None


def ctranslate2_side(folder: ModelFolder, opts: VerifyOptions, ranks: Ranks, device: str, checkpoint: Path,
                     report: Report):
    """CTranslate2's own conversion of SRC (rank 0 converts, into OUT/ctranslate2), or the folder given."""
    if not (opts.ctranslate2 or opts.ctranslate2_model):
        return None
    model = opts.ctranslate2_model
    if model is None:
        model = report_dir(folder.path, opts.out) / "ctranslate2"
        if ranks.main:
            if opts.progress:
                print("[verify] ct2-fairseq-converter: CTranslate2's own conversion of the checkpoint ...", flush=True)
            ct2.convert(checkpoint, model)
            framed = ct2.frame_for_task(model, folder)
            if framed:
                report.note(f"ctranslate2: its config.json set for this task's framing ({framed}), as its users "
                            f"must (docs/verify.md)")
        ranks.barrier()
    return ct2.CTranslate2Side(Path(model), device, torch.get_num_threads())


def direction(folder: ModelFolder, port, framing: Framing, opts: VerifyOptions, report: Report):
    """A many-to-many model's direction, the token generation starts with, and the search settings."""
    src_lang, tgt_lang = framing.default_direction()
    src_lang, tgt_lang = opts.source_lang or src_lang, opts.target_lang or tgt_lang
    overrides = {}
    if framing.multi:
        if not (opts.source_lang and opts.target_lang):
            report.note(f"many-to-many model: verified {src_lang}-{tgt_lang} (choose with "
                        f"--source-lang/--target-lang)")
        framing.check_direction(src_lang, tgt_lang)
        overrides = direction_overrides(folder, src_lang, tgt_lang)
    gen = {k: v for k, v in port.generation_defaults().items() if k in SEARCH_KEYS and v is not None}
    settings = {"greedy": {**gen, "beam": 1}, "beam": gen}
    return src_lang, tgt_lang, overrides, framing.forced_prefix(tgt_lang), settings


def read_inputs(folder: ModelFolder, opts: VerifyOptions, tokenizer, framing: Framing, src_lang, tgt_lang):
    """Text, binarized data or random ids, framed as the task frames them."""
    cfg = folder.config
    if opts.data:
        if tokenizer is None:
            raise FairportError("--data is text, but the folder has no text pipeline; use --fairseq-data (or convert "
                                "with the BPE files)")
        return verify_inputs.from_text_file(opts.data, tokenizer, opts.limit, cfg.max_source_positions, src_lang,
                                            tgt_lang)
    if opts.fairseq_data:
        inputs = verify_inputs.from_fairseq_data(opts.fairseq_data, opts.split, src_lang, tgt_lang, opts.limit)
    else:
        inputs = verify_inputs.random_inputs(cfg.src_vocab_size, cfg.tgt_vocab_size, opts.limit or 32, opts.seed,
                                             cfg.eos)
    # binarized/random ids (each ending in </s>) framed as the task's dataset frames them
    inputs.src = [framing.task_source(s[:-1], src_lang, tgt_lang) for s in inputs.src]
    if inputs.refs:
        inputs.refs = [framing.task_target(r[:-1], tgt_lang) for r in inputs.refs]
    return inputs
