"""The `fairport` command line: one `cmd_*` per verb, each handed its options as a dataclass (options.py holds
the tables argparse is built from); each verb's work and output live in its module.

Every bad value is refused before any work, in one line (`fairport: error: ...`) with a non-zero exit.
Imports of the verbs' modules are inside the `cmd_*` functions: `fairport --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# PyTorch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when this is set (read
# once, at its first allocation, so before torch is imported): faster decoding with the reference (fewer page
# faults on fresh logits buffers, fewer TLB misses on weights; docs/benchmarks.md). The command line turns it on
# unless the environment says otherwise; library users may set it themselves.
# MKL otherwise picks kernels by memory alignment, so the same fp32 product may round differently from one process
# to the next: verify promises the same report from run to run and on any number of processes (docs/verify.md).
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from fairport import __version__
from fairport.errors import FairportError
from fairport.options import (
    PRESETS,
    VERBS,
    BenchArgs,
    CardArgs,
    ConvertArgs,
    GenerateArgs,
    UploadArgs,
    VerifyArgs,
    add_options,
    parse,
    report_dir,
)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other fairport error."""

    def error(self, message: str):
        print(f"fairport: error: {self.prog.removeprefix('fairport ')}: {message} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


def refuse_idle_flags(pairs: list[tuple[bool, str]]) -> None:
    """Flags that would do nothing in the combination given are refused (one line), not silently ignored."""
    for idle, why in pairs:
        if idle:
            raise FairportError(why)


def _distributed(command: str, a, argv: list[str]) -> int | None:
    """--nproc N (and not already under torchrun): start N processes of this same command; else None."""
    if getattr(a, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        from fairport.distributed import launch

        rest = list(argv)
        i = next(i for i, x in enumerate(rest) if x == "--nproc" or x.startswith("--nproc="))
        del rest[i: i + (1 if "=" in rest[i] else 2)]
        return launch(a.nproc, rest, describe_death=_verify_progress(a) if command == "verify" else None)
    return None


def _verify_progress(a: VerifyArgs):
    """What a verify rank that died was doing: its progress file in the run's shards folder."""
    from fairport.validation.verify.shards import progress_of

    return lambda rank: progress_of(report_dir(a.dst, a.out) / "shards", rank)


# ---- verbs --------------------------------------------------------------------------------------------

def cmd_convert(a: ConvertArgs) -> int:
    from fairport.converters.convert import convert, print_result

    r = convert(a.src, a.dst, force=a.force, dtype=a.dtype, max_shard_bytes=a.max_shard_size,
                generation_overrides=a.search, src_dict=a.src_dict, tgt_dict=a.tgt_dict, lang_dict=a.lang_dict,
                bpe=a.bpe, tokenizer=a.tokenizer, int8=a.int8, **a.text_files)
    print_result(r)
    return 0


def cmd_generate(a: GenerateArgs) -> int:
    from fairport.corpus import generate_file

    if a.compile and a.dtype == "int8":
        raise FairportError("--compile runs float32/float16/bfloat16 layers, not --dtype int8: drop one of them")
    sampling = a.search.get("sampling") or _folder_samples(a.dst)
    refuse_idle_flags([
        (a.seed is not None and not sampling, "--seed only seeds sampling (--sampling): beam search and greedy "
                                              "are deterministic; drop --seed or add --sampling"),
        (("sampling_topk" in a.search or "sampling_topp" in a.search) and not sampling,
         "--sampling-topk/--sampling-topp choose what --sampling draws from: add --sampling, or drop them"),
        (a.no_pack and a.compile, "--no-pack does nothing with --compile (the compiled step lays out its weights "
                                  "itself): drop one of them"),
    ])
    return generate_file(a.dst, a.input, a.output, device=a.device, dtype=a.dtype, pack=not a.no_pack,
                         compile=a.compile, batch_size=a.batch_size or (None if a.max_tokens else 32),
                         max_tokens=a.max_tokens, seed=a.seed, quiet=a.quiet,
                         source_lang=a.source_lang, target_lang=a.target_lang, **a.search)


def _folder_samples(dst: str) -> bool:
    """Whether the folder's generation defaults sample (fairseq's --sampling recorded in the checkpoint)."""
    from fairport.reference.folder import ModelFolder

    return bool(ModelFolder.open(dst).generation.get("sampling"))


def cmd_verify(a: VerifyArgs) -> int:
    from fairport.validation.verify.report import print_summary, write
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
        strict=a.strict, text_files={k: Path(v) for k, v in a.text_files.items()},
        source_lang=a.source_lang, target_lang=a.target_lang, resume=a.resume, transformers="transformers" in a.sides,
        ctranslate2="ctranslate2" in a.sides,
        ctranslate2_model=a.ctranslate2_model and Path(a.ctranslate2_model), compile=a.compile)
    rep = verify(a.src, a.dst, opts)
    if rep is None:  # not rank 0: rank 0 writes the report
        return 0
    out = report_dir(a.dst, a.out)
    write(rep, out, a.src, a.dst)
    return print_summary(rep, out)


def cmd_card(a: CardArgs) -> int:
    from fairport.publish import write_card

    path = write_card(a.dst, a.report, a.license, repo_id=a.repo_id, dataset=a.dataset_name, force=a.force)
    print(f"model card: {path}")
    return 0


def cmd_upload(a: UploadArgs) -> int:
    from fairport.publish import upload

    upload(a.dst, a.repo_id, private=a.private, revision=a.revision, commit_message=a.commit_message,
           create_pr=a.create_pr, dry_run=a.dry_run, allow_unverified=a.allow_unverified, license=a.license,
           report_dir=a.report, dataset=a.dataset_name, card_choice=a.card)
    return 0


def cmd_bench(a: BenchArgs) -> int:
    from fairport.validation.bench import bench, print_results

    refuse_idle_flags([
        (a.corpus_text is not None and not a.corpus, "--corpus-text is the text --corpus N translates: add --corpus "
                                                     "N, or drop --corpus-text"),
        (a.corpus_text is not None and not Path(a.corpus_text).is_file(), f"--corpus-text {a.corpus_text}: no such "
                                                                          f"file"),
    ])
    if a.target not in PRESETS and not Path(a.target).is_dir():
        raise FairportError(f"bench: {a.target} is neither a converted folder nor a preset ({', '.join(PRESETS)})")
    if "ctranslate2" in a.sides:
        import shutil

        if shutil.which("ct2-fairseq-converter") is None:
            raise FairportError("--sides ctranslate2 needs CTranslate2: pip install 'fairport[ctranslate2]'")
    result = bench(a.target, a.sides, a.batch, a.beam, a.dtype, a.steps, a.repeats, a.device, Path(a.workdir),
                   a.src_len, say=lambda m: print(f"[bench] {m}", flush=True), warmup_s=a.warmup, procs=a.procs,
                   threads=a.threads, corpus=a.corpus, corpus_text=a.corpus_text and Path(a.corpus_text),
                   max_tokens=a.max_tokens)
    out = Path(a.out) if a.out else Path(a.workdir) / f"bench-{Path(a.target).name}.json"
    print_results(result, out)
    return 0


COMMANDS = {"convert": cmd_convert, "generate": cmd_generate, "verify": cmd_verify, "card": cmd_card,
            "upload": cmd_upload, "bench": cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per verb, built from its table in options.py."""
    p = Parser(prog="fairport", description="Port fairseq checkpoints to a clean PyTorch reference and prove the "
                                            "port is right.")
    p.add_argument("--version", action="version", version=f"fairport {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(VERBS) + "}")
    for name, table in VERBS.items():
        add_options(sub.add_parser(name, help=table.__doc__.strip()), table)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    namespace = build_parser().parse_args(argv)
    args = parse(VERBS[namespace.command], namespace)
    from fairport.distributed import LAUNCHED, PEER_LOST, PeerLost, Ranks, report_error

    try:
        launched = _distributed(namespace.command, args, argv)
        return launched if launched is not None else COMMANDS[namespace.command](args)
    except PeerLost as e:
        if os.environ.get(LAUNCHED):  # the launcher names the rank that is gone
            return PEER_LOST
        if report_error(Ranks.from_env(), str(e)):
            print(f"fairport: error: {e}", file=sys.stderr)
        return 1
    except FairportError as e:
        if report_error(Ranks.from_env(), str(e)):
            print(f"fairport: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fairport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
