"""The `fairport` command line: argparse, one `cmd_*` per verb; each verb's work and output live in its module.

Every bad value is refused before any work, in one line (`fairport: error: ...`) with a non-zero exit.
Imports of the verbs' modules are inside the `cmd_*` functions: `fairport --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

# PyTorch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when this is set (read
# once, at its first allocation, so before torch is imported): measured 10-30% faster decoding with the reference
# (fewer page faults on fresh logits buffers, fewer TLB misses on weights). The command line turns it on unless
# the environment says otherwise; library users may set it themselves (docs/benchmarks.md).
# MKL otherwise picks kernels by memory alignment, so the same fp32 product may round differently from one process
# to the next: verify promises the same report from run to run and on any number of processes. Strict
# reproducibility on this CPU costs nothing measurable (a 64x1024 by 1024x4096 product: 2.43 vs 2.38 ms).
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from fairport import __version__
from fairport.errors import FairportError

PRESETS = ("bart-large-cnn", "bart-base", "wmt19-en-de", "tiny")
DTYPES = ("float32", "bfloat16", "float16", "int8")  # reference.load.PRECISIONS (kept here for start-up time)
BENCH_SIDES = ("reference", "reference-unpacked", "reference-compiled", "fairseq", "transformers", "ctranslate2")


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other fairport error."""

    def error(self, message: str):
        print(f"fairport: error: {self.prog.removeprefix('fairport ')}: {message} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


# ---- value types: each refuses a bad value with a message argparse turns into one line ----------------

def _type(name: str, convert, check=lambda v: True, why: str = ""):
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {why or name}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {why or name}")
        return value

    parse.__name__ = name
    return parse


positive_int = _type("positive integer", int, lambda v: v > 0, "a positive integer")
count = _type("count", int, lambda v: v >= 0, "a whole number >= 0")
non_negative = _type("number", float, lambda v: v >= 0, "a number >= 0")
fraction = _type("fraction", float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def size(text: str) -> int:
    """2GB, 2GiB, 500MB, 100KB or a byte count."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), "B")
    try:
        value = float(t[: len(t) - len(unit)] if t.endswith(unit) else t) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GB, 500MB, 2GiB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size above zero")
    return int(value)


def device_name(text: str) -> str:
    """cpu, cuda, cuda:N, ...: a device torch knows (bench says "not measured" for one that is not here)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    return text


def device(text: str) -> str:
    """cpu, cuda, cuda:N, ...: a device torch knows, and that exists here."""
    import torch

    d = torch.device(device_name(text))
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def choices_list(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)} (choose from "
                                             f"{', '.join(allowed)})")
        return items

    parse.__name__ = what
    return parse


ints = _type("integers", lambda t: [int(x) for x in t.split(",") if x], lambda v: v and min(v) > 0,
             "a comma list of positive integers")


# ---- shared flags ---------------------------------------------------------------------------------

def _text_file_flags(parser, what: str) -> None:
    from fairport.converters.text import TEXT_FILES

    group = parser.add_argument_group(f"text pipeline files ({what})")
    for f in TEXT_FILES.values():
        group.add_argument(f.flag, dest=f.field, help=f.help)


def _search_options(group, *kinds: str):
    """fairseq's generation options as flags (GenerationOptions is their one table)."""
    from fairport.reference.generate import GenerationOptions

    for f in fields(GenerationOptions):
        if f.metadata["cli"] not in kinds:
            continue
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            group.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
            continue
        kind = {"beam": positive_int, "max_len_b": count, "min_len": count, "no_repeat_ngram_size": count,
                "lenpen": float, "max_len_a": non_negative, "temperature": _type("temperature", float, lambda v: v > 0,
                                                                                 "a number above 0"),
                "sampling_topk": int, "sampling_topp": float}[f.name]
        group.add_argument(flag, type=kind, help=f"{f.metadata['help']} (fairseq's default: {f.default})")
    return group


def _search_values(a: argparse.Namespace, *kinds: str) -> dict:
    """The generation options given on the command line, by GenerationOptions' names."""
    from fairport.reference.generate import GenerationOptions

    return {f.name: getattr(a, f.name) for f in fields(GenerationOptions)
            if f.metadata["cli"] in kinds and getattr(a, f.name) is not None}


def _distributed(a: argparse.Namespace, argv: list[str]) -> int | None:
    """--nproc N (and not already under torchrun): start N processes of this same command; else None."""
    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from fairport.distributed import launch

        rest = list(argv)
        i = next(i for i, x in enumerate(rest) if x == "--nproc" or x.startswith("--nproc="))
        del rest[i: i + (1 if "=" in rest[i] else 2)]
        return launch(a.nproc, rest, describe_death=_verify_progress(a) if a.command == "verify" else None)
    return None


def _verify_progress(a: argparse.Namespace):
    """What a verify rank that died was doing: its progress file in the run's shards folder."""
    from fairport.validation.verify.report import report_dir
    from fairport.validation.verify.shards import progress_of

    return lambda rank: progress_of(report_dir(a.dst, a.out) / "shards", rank)


# ---- verbs --------------------------------------------------------------------------------------------

def cmd_convert(a: argparse.Namespace) -> int:
    from fairport.converters.convert import convert, print_result
    from fairport.converters.text import TEXT_FILES

    r = convert(a.src, a.dst, force=a.force, dtype=a.dtype, max_shard_bytes=a.max_shard_size,
                generation_overrides=_search_values(a, "search"), src_dict=a.src_dict, tgt_dict=a.tgt_dict,
                lang_dict=a.lang_dict, bpe=a.bpe, tokenizer=a.tokenizer,
                **{name: getattr(a, name) for name in TEXT_FILES})
    print_result(r)
    return 0


def refuse_idle_flags(pairs: list[tuple[bool, str]]) -> None:
    """Flags that would do nothing in the combination given are refused (one line), not silently ignored."""
    for idle, why in pairs:
        if idle:
            raise FairportError(why)


def cmd_generate(a: argparse.Namespace) -> int:
    from fairport.corpus import generate_file

    if a.compile and a.dtype == "int8":
        raise FairportError("--compile runs float32/float16/bfloat16 layers, not --dtype int8: drop one of them")
    sampling = a.sampling or _folder_samples(a.dst)
    refuse_idle_flags([
        (a.seed is not None and not sampling, "--seed only seeds sampling (--sampling): beam search and greedy "
                                              "are deterministic; drop --seed or add --sampling"),
        ((a.sampling_topk is not None or a.sampling_topp is not None) and not sampling,
         "--sampling-topk/--sampling-topp choose what --sampling draws from: add --sampling, or drop them"),
        (a.no_pack and a.compile, "--no-pack does nothing with --compile (the compiled step lays out its weights "
                                  "itself): drop one of them"),
    ])
    return generate_file(a.dst, a.input, a.output, device=a.device, dtype=a.dtype, pack=not a.no_pack,
                         compile=a.compile, batch_size=a.batch_size or (None if a.max_tokens else 32),
                         max_tokens=a.max_tokens, seed=a.seed, quiet=a.quiet,
                         source_lang=a.source_lang, target_lang=a.target_lang, **_search_values(a, "search", "sample"))


def _folder_samples(dst: str) -> bool:
    """Whether the folder's generation defaults sample (fairseq's --sampling recorded in the checkpoint)."""
    from fairport.reference.folder import ModelFolder

    return bool(ModelFolder.open(dst).generation.get("sampling"))


def cmd_verify(a: argparse.Namespace) -> int:
    from pathlib import Path

    from fairport.converters.text import TEXT_FILES
    from fairport.validation.verify.report import print_summary, report_dir, write
    from fairport.validation.verify.run import VerifyOptions, verify

    refuse_idle_flags([
        (a.split is not None and not a.fairseq_data, f"--split {a.split} chooses a split of --fairseq-data, which "
                                                     f"was not given: add --fairseq-data DIR, or drop --split"),
        (a.exact_match is not None and not a.strict, "--exact-match is the rate --strict requires: add --strict, "
                                                     "or drop --exact-match"),
        (a.max_tie_rate is not None and a.strict, "--max-tie-rate bounds explained mismatches, which --strict does "
                                                  "not accept: drop one of them"),
    ])
    defaults = VerifyOptions()
    opts = VerifyOptions(
        data=a.data and Path(a.data), fairseq_data=a.fairseq_data and Path(a.fairseq_data),
        split=a.split or defaults.split, limit=a.limit, device=a.device, dtypes=tuple(a.dtypes),
        out=a.out and Path(a.out), seed=a.seed, batch_size=a.batch_size, logits_tol=a.logits_tol,
        exact_match=defaults.exact_match if a.exact_match is None else a.exact_match,
        max_tie_rate=defaults.max_tie_rate if a.max_tie_rate is None else a.max_tie_rate,
        strict=a.strict, text_files={k: Path(getattr(a, k)) for k in TEXT_FILES if getattr(a, k)},
        source_lang=a.source_lang, target_lang=a.target_lang, resume=a.resume, transformers="transformers" in a.sides,
        ctranslate2="ctranslate2" in a.sides,
        ctranslate2_model=a.ctranslate2_model and Path(a.ctranslate2_model), compile=a.compile)
    rep = verify(a.src, a.dst, opts)
    if rep is None:  # not rank 0: rank 0 writes the report
        return 0
    out = report_dir(a.dst, a.out)
    write(rep, out, a.src, a.dst)
    return print_summary(rep, out)


def cmd_card(a: argparse.Namespace) -> int:
    from fairport.publish import write_card

    path = write_card(a.dst, a.report, a.license, repo_id=a.repo_id, dataset=a.dataset_name, force=a.force)
    print(f"model card: {path}")
    return 0


def cmd_upload(a: argparse.Namespace) -> int:
    from fairport.publish import upload

    upload(a.dst, a.repo_id, private=a.private, revision=a.revision, commit_message=a.commit_message,
           create_pr=a.create_pr, dry_run=a.dry_run, allow_unverified=a.allow_unverified, license=a.license,
           report_dir=a.report, dataset=a.dataset_name, card_choice=a.card)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from pathlib import Path

    from fairport.validation.bench import bench, print_results

    if a.target not in PRESETS and not Path(a.target).is_dir():
        raise FairportError(f"bench: {a.target} is neither a converted folder nor a preset ({', '.join(PRESETS)})")
    if "ctranslate2" in a.sides:
        import shutil

        if shutil.which("ct2-fairseq-converter") is None:
            raise FairportError("--sides ctranslate2 needs CTranslate2: pip install 'fairport[ctranslate2]'")
    result = bench(a.target, a.sides, a.batch, a.beam, a.dtype, a.steps, a.repeats, a.device, Path(a.workdir),
                   a.src_len, say=lambda m: print(f"[bench] {m}", flush=True), warmup_s=a.warmup, procs=a.procs,
                   threads=a.threads)
    out = Path(a.out) if a.out else Path(a.workdir) / f"bench-{Path(a.target).name}.json"
    print_results(result, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fairport", description="Port fairseq checkpoints to a clean PyTorch reference and prove the "
                                            "port is right.")
    p.add_argument("--version", action="version", version=f"fairport {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{convert,generate,verify,card,upload,bench}")

    c = sub.add_parser("convert", help="fairseq checkpoint -> model folder")
    c.add_argument("src", help="checkpoint file, a release folder holding one beside its dictionaries, or an "
                               "ensemble as a.pt:b.pt")
    c.add_argument("dst", help="output folder (refused if it exists, unless --force)")
    c.add_argument("--force", action="store_true",
                   help="replace DST if it is a folder fairport wrote (or empty); anything else is refused")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight dtype in the folder (auto: as in the checkpoint)")
    c.add_argument("--src-dict", help="source dictionary (default: found beside the checkpoint)")
    c.add_argument("--tgt-dict", help="target dictionary (default: found beside the checkpoint)")
    c.add_argument("--lang-dict", help="many-to-many models: the language list file (--lang-dict), when it is "
                   "not where the checkpoint recorded it nor beside it")
    c.add_argument("--bpe", help="fairseq --bpe of the text pipeline (default: as the checkpoint records, "
                   "else from the files found): gpt2, fastbpe, subword_nmt, sentencepiece, none")
    c.add_argument("--tokenizer", help="fairseq --tokenizer (default: as the checkpoint records; Moses with "
                   "fastBPE codes otherwise): moses, space, none")
    c.add_argument("--max-shard-size", type=size, default="2GB", help="shard model.safetensors above this size")
    _text_file_flags(c, "default: as the checkpoint records them, or found beside it")
    _search_options(c.add_argument_group("generation defaults written to generation_config.json (fairseq names)"),
                    "search")
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="text in, text out with a converted folder (fairseq-exact search)")
    g.add_argument("dst", help="a folder written by `fairport convert`")
    g.add_argument("--input", default="-", help="one source per line (default: stdin)")
    g.add_argument("--output", default="-", help="one output per line, in input order (default: stdout)")
    g.add_argument("--batch-size", type=positive_int, help="inputs per batch (default 32; with --max-tokens, no bound "
                   "unless given)")
    g.add_argument("--max-tokens", type=positive_int, help="batch by token budget, as fairseq-generate's --max-tokens: "
                   "at most this many padded source tokens a batch (length-sorted; output in input order)")
    g.add_argument("--source-lang", help="many-to-many models (M2M-100, mBART-50): the source language")
    g.add_argument("--target-lang", help="many-to-many models: the target language")
    g.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N (default: cpu; under torchrun "
                                                               "with cuda, each rank takes cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=DTYPES, help="compute dtype (default float32, as fairseq computes, fp16 "
                   "folders included); int8: float32 with int8 linear layers (CPU; outputs move, `fairport verify "
                   "--dtypes int8` measures how much)")
    g.add_argument("--seed", type=int, help="seed for sampling")
    g.add_argument("--no-pack", action="store_true",
                   help="CPU: torch's default matrix products instead of oneDNN-packed weights (slower decoding)")
    g.add_argument("--compile", action="store_true",
                   help="decode with the compiled decoder step (reference/compiled.py: same tokens, faster on small "
                   "models and at batch 1, slower at large batches of large ones; compiling takes ~30 s on a tiny "
                   "model, 1-2 min on large ones, once per machine: kept in a cache for later processes)")
    g.add_argument("--nproc", type=positive_int, default=1, help="processes on this machine (torch.distributed; "
                   "or run under torchrun for several machines)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _search_options(g.add_argument_group("generation options (default: the folder's generation_config.json)"),
                    "search", "sample")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="parity report: the fairseq original against the port, same inputs")
    v.add_argument("src", help="the fairseq checkpoint (file, release folder, or a.pt:b.pt ensemble)")
    v.add_argument("dst", help="the folder written by `fairport convert`")
    inputs = v.add_mutually_exclusive_group()
    inputs.add_argument("--data", help="text file, one source per line (optional TAB + reference)")
    inputs.add_argument("--fairseq-data", help="binarized fairseq data folder (fairseq-preprocess output)")
    v.add_argument("--split", help="the split of --fairseq-data (default: test)")
    v.add_argument("--source-lang", help="many-to-many models: the direction to verify (source language)")
    v.add_argument("--target-lang", help="many-to-many models: the direction to verify (target language)")
    v.add_argument("--limit", type=positive_int, default=100, help="inputs to use (default 100)")
    v.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N (under torchrun with cuda, "
                                                               "each rank takes cuda:LOCAL_RANK)")
    v.add_argument("--dtypes", type=choices_list(DTYPES, "dtype"), default=["float32"],
                   help="comma list: float32,bfloat16,float16,int8 (the precision matrix)")
    v.add_argument("--out", help="report folder (default: DST/verify)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch-size", type=positive_int, default=16)
    v.add_argument("--logits-tol", type=non_negative, default=1e-4, help="fp32 logits threshold")
    v.add_argument("--max-tie-rate", type=fraction,
                   help="share of inputs whose top hypothesis may differ for an explained reason (a near-tie, a "
                        "batch-dependent original) before generation fails (default 0.02)")
    v.add_argument("--strict", action="store_true", help="require identical top hypotheses (--exact-match), "
                                                         "explained or not")
    v.add_argument("--exact-match", type=fraction, help="with --strict: the exact-match rate required (default 1)")
    v.add_argument("--nproc", type=positive_int, default=1, help="processes on this machine (torch.distributed; "
                   "or run under torchrun for several machines)")
    v.add_argument("--resume", action="store_true", help="keep the batches an interrupted run finished (OUT/shards)")
    v.add_argument("--sides", type=choices_list(("reference", "transformers", "ctranslate2"), "side"),
                   default=["reference", "transformers"], help="what is checked against the original: the port "
                   "(always), transformers (when the folder loads there), ctranslate2 (CTranslate2's own conversion "
                   "of SRC; pip install 'fairport[ctranslate2]')")
    v.add_argument("--ctranslate2-model", help="a ready CTranslate2 model folder to check (instead of converting SRC)")
    v.add_argument("--compile", action="store_true", help="the port generates with the compiled decoder step (what "
                   "`generate --compile` runs): its outputs are checked against the original's")
    _text_file_flags(v, "the original's, for the tokenizer check; default: those conversion read")
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("card", help="write DST/README.md: a model card built from the parity report")
    c.add_argument("dst")
    c.add_argument("--report", help="report folder (default: DST/verify)")
    c.add_argument("--license", help="license id for the card metadata (e.g. mit); upload keeps it")
    c.add_argument("--repo-id", help="the Hub repository the card's usage snippets load from (default: DST's name)")
    c.add_argument("--dataset-name", help="the name the card gives the verification data (default: its file name)")
    c.add_argument("--force", action="store_true", help="replace a README.md that is not fairport's unedited card")
    c.set_defaults(func=cmd_card)

    u = sub.add_parser("upload", help="push DST, with its model card, to the Hugging Face Hub")
    u.add_argument("dst")
    u.add_argument("repo_id", help="namespace/name")
    u.add_argument("--private", action="store_true")
    u.add_argument("--revision", default="main")
    u.add_argument("--commit-message")
    u.add_argument("--create-pr", action="store_true")
    u.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    u.add_argument("--allow-unverified", action="store_true",
                   help="upload without a passing parity report (the card says UNVERIFIED)")
    u.add_argument("--report", help="report folder (default: DST/verify)")
    u.add_argument("--license", help="license id (default: the one `fairport card` wrote, if any)")
    u.add_argument("--dataset-name", help="the name the card gives the verification data (default: its file name)")
    u.add_argument("--card", choices=["keep", "replace"], help="when DST/README.md is a card you wrote or edited: "
                   "keep (upload it as it is) or replace (upload a card built from the report; the local file is "
                   "never changed)")
    u.set_defaults(func=cmd_upload)

    b = sub.add_parser("bench", help="time reference / fairseq / transformers on the same inputs")
    b.add_argument("target", help=f"a converted folder, or a preset: {', '.join(PRESETS)}")
    b.add_argument("--sides", type=choices_list(BENCH_SIDES, "side"), default=["reference", "fairseq", "transformers"],
                   help="any of reference, reference-unpacked (without the oneDNN-packed weights), reference-compiled "
                        "(the compiled decoder step; its load time includes compiling), fairseq, "
                        "transformers, ctranslate2 (converted by its own ct2-fairseq-converter; pip install "
                        "fairport[ctranslate2])")
    b.add_argument("--batch", type=ints, default=[1, 8])
    b.add_argument("--beam", type=ints, default=[1, 5])
    b.add_argument("--dtype", type=choices_list(DTYPES, "dtype"), default=["float32"],
                   help="reference dtypes, comma list of float32,bfloat16,float16,int8 (fairseq is always the fp32 "
                        "baseline)")
    b.add_argument("--steps", type=positive_int, default=40, help="decoder steps per hypothesis (min_len = max_len_b)")
    b.add_argument("--src-len", type=positive_int, help="source length in tokens (default: the preset's)")
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--warmup", type=non_negative, default=1.0,
                   help="seconds of untimed runs per configuration and side before timing (at least one run)")
    b.add_argument("--threads", type=ints, help="thread counts each side is timed with; its fastest is compared "
                   "(default: 1 to the number of cores)")
    b.add_argument("--procs", type=ints, default=[], help="also measure the reference's throughput on a corpus with "
                   "this many processes (comma list, e.g. 1,2: torch.distributed, the machine's cores shared out)")
    b.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda (without a GPU: \"not measured\")")
    b.add_argument("--workdir", default="fairport-bench", help="where presets are built and converted")
    b.add_argument("--out", help="results JSON (a PNG plot is written beside it)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from fairport.distributed import Ranks, report_error

    try:
        launched = _distributed(args, argv) if hasattr(args, "nproc") else None
        return launched if launched is not None else args.func(args)
    except FairportError as e:
        if report_error(Ranks.from_env(), str(e)):
            print(f"fairport: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fairport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
