"""The `fairport` command line."""

from __future__ import annotations

import argparse
import sys

from fairport import __version__
from fairport.errors import FairportError


def _size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for u, n in units.items():
        if text.upper().endswith(u):
            return int(float(text[:-2]) * n)
    return int(text)


def cmd_convert(a: argparse.Namespace) -> int:
    from fairport.converters.convert import convert

    gen = {"beam": a.beam, "lenpen": a.lenpen, "max_len_a": a.max_len_a, "max_len_b": a.max_len_b,
           "min_len": a.min_len, "no_repeat_ngram_size": a.no_repeat_ngram_size}
    r = convert(a.src, a.dst, force=a.force, dtype=a.dtype, max_shard_bytes=_size(a.max_shard_size),
                generation_overrides=gen, src_dict=a.src_dict, tgt_dict=a.tgt_dict,
                encoder_json=a.gpt2_encoder_json, vocab_bpe=a.gpt2_vocab_bpe, bpecodes=a.bpecodes,
                sentencepiece_model=a.sentencepiece_model, bpe=a.bpe, tokenizer=a.tokenizer, lang_dict=a.lang_dict)
    c = r["config"]
    print(f"converted {c.arch} ({c.family}: {c.encoder_layers}+{c.decoder_layers} layers, "
          f"d{c.encoder_embed_dim}, {c.src_vocab_size}/{c.tgt_vocab_size} ids, {r['dtype']}) -> {r['dst']}")
    if r["family"]:
        print(f"transformers: loads as {r['family']} (AutoModelForSeq2SeqLM)")
    else:
        reasons = "; ".join(f"{f}: needs {', '.join(u)}" for f, u in r["unmet"].items())
        print(f"transformers: no architecture reproduces this model exactly ({reasons}); "
              f"the folder is for fairport's reference model only")
    t = r["text"]
    if t is None:
        print("text: none, the folder takes token ids only (see the note below for the flags that add text)")
    else:
        parts = [p for p in (t.get("tokenizer"), t.get("bpe")) if p] or ["whitespace-separated symbols"]
        print(f"text: {' + '.join(parts)}{' (BART hub framing)' if t.get('bart') else ''}")
    if r["members"] > 1:
        print(f"ensemble of {r['members']}: {', '.join(r['member_checkpoints'])}")
    for note in r["notes"]:
        print(f"note: {note}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fairport.reference import load

    model = load(a.dst, device=a.device, dtype=a.dtype, pack=not a.no_pack)
    model.tokenizer.framing.check_direction(a.source_lang, a.target_lang)  # fail early: no tokenizer, no direction
    if a.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(a.input, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise FairportError(f"cannot read --input {a.input}: {e.strerror}") from None
    gen = {k: v for k, v in {"beam": a.beam, "lenpen": a.lenpen, "max_len_a": a.max_len_a, "max_len_b": a.max_len_b,
                             "min_len": a.min_len, "no_repeat_ngram_size": a.no_repeat_ngram_size,
                             "sampling": a.sampling or None, "sampling_topk": a.sampling_topk,
                             "sampling_topp": a.sampling_topp, "temperature": a.temperature}.items()
           if v is not None}
    with tqdm(total=len(lines), unit="sent", desc="generate", disable=a.quiet, file=sys.stderr) as bar:
        outputs = model.sample(lines, batch_size=a.batch_size, seed=a.seed, progress=bar, source_lang=a.source_lang,
                               target_lang=a.target_lang, **gen)
    text = "".join(o + "\n" for o in outputs)
    if a.output == "-":
        sys.stdout.write(text)
    else:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from pathlib import Path

    from fairport.validation import report as report_writer
    from fairport.validation.verify import VerifyOptions, verify

    if a.data and a.fairseq_data:
        raise FairportError("give --data or --fairseq-data, not both")
    opts = VerifyOptions(
        data=Path(a.data) if a.data else None, fairseq_data=Path(a.fairseq_data) if a.fairseq_data else None,
        split=a.split, limit=a.limit, device=a.device, dtypes=tuple(x for x in a.dtypes.split(",") if x),
        seed=a.seed, batch_size=a.batch_size, logits_tol=a.logits_tol, exact_match=a.exact_match,
        gpt2_encoder_json=a.gpt2_encoder_json, gpt2_vocab_bpe=a.gpt2_vocab_bpe, bpecodes=a.bpecodes,
        sentencepiece_model=a.sentencepiece_model, source_lang=a.source_lang, target_lang=a.target_lang)
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FairportError("--device cuda: no CUDA device is available here")
    out = Path(a.out) if a.out else Path(a.dst) / "verify"
    rep = verify(a.src, a.dst, opts)
    report_writer.write(rep, out, a.src, a.dst)
    print(f"report: {out / 'report.md'} (and report.json)")
    for c in rep.checks:
        if c.passed:
            print(f"  pass  {c.name}")
    failed = [c for c in rep.checks if not c.passed]
    for c in failed:
        print(f"  FAIL  {c.name}: {c.value} (threshold {c.threshold}) {c.detail}")
    print("verify: PASS" if not failed else f"verify: FAIL ({len(failed)} checks failed)")
    return 0 if not failed else 1


def cmd_card(a: argparse.Namespace) -> int:
    from fairport.publish import write_card

    path = write_card(a.dst, a.report, a.license, repo_id=a.repo_id)
    print(f"model card: {path}")
    return 0


def cmd_upload(a: argparse.Namespace) -> int:
    from fairport.publish import upload

    upload(a.dst, a.repo_id, private=a.private, revision=a.revision, commit_message=a.commit_message,
           create_pr=a.create_pr, dry_run=a.dry_run, allow_unverified=a.allow_unverified, license=a.license,
           report_dir=a.report)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fairport.reference.load import PRECISIONS
    from fairport.validation.bench import bench, plot

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    sides = [x for x in a.sides.split(",") if x]
    unknown = set(sides) - {"reference", "reference-unpacked", "fairseq", "transformers"}
    if unknown:
        raise FairportError(f"--sides: unknown side(s) {sorted(unknown)}")
    dtypes = [x for x in a.dtype.split(",") if x]
    unknown = set(dtypes) - set(PRECISIONS)
    if unknown:
        raise FairportError(f"--dtype: unknown dtype(s) {sorted(unknown)} (choose from {', '.join(PRECISIONS)})")
    workdir = Path(a.workdir)
    result = bench(a.target, sides, ints(a.batch), ints(a.beam), dtypes, a.steps,
                   a.repeats, a.device, workdir, a.src_len, say=lambda m: print(f"[bench] {m}", flush=True),
                   warmup_s=a.warmup)
    out = Path(a.out) if a.out else workdir / f"bench-{Path(a.target).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    if "runs" not in result:
        print(f"{result['device']}: {result['status']}")
        return 0
    print(f"{'config':<24}{'side':<14}{'ms/step':>9}{'sent/s':>9}{'tok/s':>9}{'vs fairseq':>11}  same output")
    for row in result["runs"]:
        for side, r in row["sides"].items():
            sp = r.get("speedup_vs_fairseq_fp32")
            same = r.get("outputs_equal_fairseq")
            same = "-" if same is None else "True" if same else f"False ({r['exact_match_rate']:.0%} of sentences)"
            print(f"{row['key']:<24}{side:<14}{r['ms_per_step']:>9.2f}{r['sentences_per_s']:>9.2f}"
                  f"{r['tokens_per_s']:>9.1f}{(f'{sp:.2f}x' if sp else '-'):>11}  {same}")
    over = {(row["dtype"], side): r["over_batch1_bound"] for row in result["runs"]
            for side, r in row["sides"].items() if "over_batch1_bound" in r}
    over_text = lambda dtype: ", ".join(f"{side} {x:.2f}x" for (d, side), x in over.items() if d == dtype)  # noqa: E731
    if result.get("batch1_bound_ms_per_step"):
        print(f"fp32 floor at batch 1: {result['batch1_bound_ms_per_step']:.2f} ms/step (the step's "
              f"{result['step_weights_mb_fp32']:.0f} MB of weights at {result['roofline']['memory_read_gbps']:.0f} GB/s "
              f"memory read); greedy batch-1 step over it: {over_text('float32') or '-'}")
    if result.get("batch1_int8_bound_ms_per_step"):
        print(f"int8 floor at batch 1: {result['batch1_int8_bound_ms_per_step']:.2f} ms/step (its matrices at one "
              f"byte a value); greedy batch-1 step over it: {over_text('int8') or '-'}")
    if "conversion" in result:
        c = result["conversion"]
        print(f"conversion: {c['seconds']:.1f}s, peak RSS {c['peak_rss_mb']:.0f} MB = {c['rss_over_file']:.2f}x the "
              f"{c['checkpoint_mb']:.0f} MB checkpoint (plain read+write: {c['plain_read_write_seconds']:.1f}s)")
    print(f"results: {out} (+ {out.with_suffix('.png').name})")
    return 0


def _search_options(group):
    """fairseq's beam-search options, shared by `convert` (defaults to record) and `generate`."""
    group.add_argument("--beam", type=int)
    group.add_argument("--lenpen", type=float)
    group.add_argument("--max-len-a", type=float)
    group.add_argument("--max-len-b", type=int)
    group.add_argument("--min-len", type=int)
    group.add_argument("--no-repeat-ngram-size", type=int)
    return group


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairport", description="Port fairseq checkpoints to a clean PyTorch "
                                "reference and prove the port is right.")
    p.add_argument("--version", action="version", version=f"fairport {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="fairseq checkpoint -> model folder")
    c.add_argument("src", help="checkpoint file, or a release folder holding one beside its dictionaries")
    c.add_argument("dst", help="output folder (refused if it exists, unless --force)")
    c.add_argument("--force", action="store_true",
                   help="replace DST if it is a folder fairport wrote (or empty); anything else is refused")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight dtype in the folder (auto: as in the checkpoint)")
    c.add_argument("--src-dict", help="source dictionary (default: found beside the checkpoint)")
    c.add_argument("--tgt-dict", help="target dictionary (default: found beside the checkpoint)")
    c.add_argument("--gpt2-encoder-json", help="GPT-2 encoder.json (BART)")
    c.add_argument("--gpt2-vocab-bpe", help="GPT-2 vocab.bpe (BART)")
    c.add_argument("--bpecodes", help="fastBPE / subword-nmt codes (WMT19)")
    c.add_argument("--sentencepiece-model", help="sentencepiece model (mBART's sentence.bpe.model)")
    c.add_argument("--lang-dict", help="many-to-many models: the language list file (--lang-dict), when it is "
                   "not where the checkpoint recorded it nor beside it")
    c.add_argument("--bpe", help="fairseq --bpe of the text pipeline (default: as the checkpoint records, "
                   "else from the files found): gpt2, fastbpe, subword_nmt, sentencepiece, none")
    c.add_argument("--tokenizer", help="fairseq --tokenizer (default: as the checkpoint records; Moses with "
                   "fastBPE codes otherwise): moses, space, none")
    c.add_argument("--max-shard-size", default="2GB", help="shard model.safetensors above this size")
    _search_options(c.add_argument_group("generation defaults written to generation_config.json (fairseq names)"))
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="text in, text out with a converted folder (fairseq-exact search)")
    g.add_argument("dst", help="a folder written by `fairport convert`")
    g.add_argument("--input", default="-", help="one source per line (default: stdin)")
    g.add_argument("--output", default="-", help="one output per line (default: stdout)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--source-lang", help="many-to-many models (M2M-100, mBART-50): the source language")
    g.add_argument("--target-lang", help="many-to-many models: the target language")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"],
                   help="compute dtype (default float32, as fairseq computes, fp16 folders included); int8: float32 "
                        "with int8 linear layers (CPU; outputs move, "
                        "`fairport verify --dtypes int8` measures how much)")
    g.add_argument("--seed", type=int, help="seed for sampling")
    g.add_argument("--no-pack", action="store_true",
                   help="CPU: no oneDNN-packed copy of the weights (half the weight memory, slower decoding)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    o = _search_options(g.add_argument_group("generation options (default: the folder's generation_config.json)"))
    o.add_argument("--sampling", action="store_true")
    o.add_argument("--sampling-topk", type=int)
    o.add_argument("--sampling-topp", type=float)
    o.add_argument("--temperature", type=float)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="parity report: the fairseq original against the port, same inputs")
    v.add_argument("src", help="the fairseq checkpoint (file, release folder, or a.pt:b.pt ensemble)")
    v.add_argument("dst", help="the folder written by `fairport convert`")
    v.add_argument("--data", help="text file, one source per line (optional TAB + reference)")
    v.add_argument("--fairseq-data", help="binarized fairseq data folder (fairseq-preprocess output)")
    v.add_argument("--split", default="test")
    v.add_argument("--source-lang", help="many-to-many models: the direction to verify (source language)")
    v.add_argument("--target-lang", help="many-to-many models: the direction to verify (target language)")
    v.add_argument("--limit", type=int, default=100, help="inputs to use (default 100)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16,int8")
    v.add_argument("--out", help="report folder (default: DST/verify)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--logits-tol", type=float, default=1e-4, help="fp32 logits threshold")
    v.add_argument("--exact-match", type=float, default=1.0, help="generation exact-match threshold (0-1)")
    v.add_argument("--gpt2-encoder-json")
    v.add_argument("--gpt2-vocab-bpe")
    v.add_argument("--bpecodes")
    v.add_argument("--sentencepiece-model")
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("card", help="write DST/README.md: a model card built from the parity report")
    c.add_argument("dst")
    c.add_argument("--report", help="report folder (default: DST/verify)")
    c.add_argument("--license", help="license id for the card metadata (e.g. mit)")
    c.add_argument("--repo-id", help="name shown in the card's usage snippets")
    c.set_defaults(func=cmd_card)

    u = sub.add_parser("upload", help="push DST, with its model card, to the Hugging Face Hub")
    u.add_argument("dst")
    u.add_argument("repo_id")
    u.add_argument("--private", action="store_true")
    u.add_argument("--revision", default="main")
    u.add_argument("--commit-message")
    u.add_argument("--create-pr", action="store_true")
    u.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    u.add_argument("--allow-unverified", action="store_true",
                   help="upload without a passing parity report (the card says UNVERIFIED)")
    u.add_argument("--report", help="report folder (default: DST/verify)")
    u.add_argument("--license")
    u.set_defaults(func=cmd_upload)

    b = sub.add_parser("bench", help="time reference / fairseq / transformers on the same inputs")
    b.add_argument("target", help="a converted folder, or a preset: bart-large-cnn, bart-base, wmt19-en-de, tiny")
    b.add_argument("--sides", default="reference,fairseq,transformers",
                   help="any of reference, reference-unpacked (without the oneDNN-packed weights), fairseq, "
                        "transformers")
    b.add_argument("--batch", default="1,8")
    b.add_argument("--beam", default="1,5")
    b.add_argument("--dtype", default="float32", help="reference dtypes, comma list of float32,bfloat16,float16,int8 "
                        "(fairseq is always the fp32 baseline)")
    b.add_argument("--steps", type=int, default=40, help="decoder steps per hypothesis (min_len = max_len_b)")
    b.add_argument("--src-len", type=int, help="source length in tokens (default: the preset's)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of untimed runs per configuration and side before timing (at least one run)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--workdir", default="fairport-bench", help="where presets are built and converted")
    b.add_argument("--out", help="results JSON (a PNG plot is written beside it)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FairportError as e:
        print(f"fairport: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fairport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
