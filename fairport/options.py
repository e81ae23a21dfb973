"""The command line's options as tables, and the names they choose from. Torch-free: `fairport --help` and a
refused flag cost no torch import.

Each verb's options are one dataclass (ConvertArgs, GenerateArgs, ...): a field per flag, its help and value
type in the field's metadata (`opt`). cli.py builds argparse from the tables (`add_options`) and hands each verb
its dataclass (`parse`). Two groups of flags come from other tables: the text pipeline's files (TEXT_FILES in
converters/text.py) and fairseq's generation options (GenerationOptions in reference/generate.py); a verb takes
them by naming the group in GROUPS, and receives them as one dict field (`text_files`, `search`).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

PRESETS = ("bart-large-cnn", "bart-base", "wmt19-en-de", "tiny")  # bench's built-in shapes
DTYPES = ("float32", "bfloat16", "float16", "int8")  # compute dtypes (reference.load.PRECISIONS)
FOLDER_DTYPES = ("auto", "float32", "float16", "bfloat16")  # what convert stores
VERIFY_SIDES = ("reference", "transformers", "ctranslate2")
BENCH_SIDES = ("reference", "reference-unpacked", "reference-compiled", "fairseq", "transformers", "ctranslate2")


def report_dir(dst: str | Path, out: str | Path | None) -> Path:
    """Where verify writes its report (and keeps its shards): OUT, else DST/verify."""
    return Path(out) if out else Path(dst) / "verify"


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
positive = _type("number", float, lambda v: v > 0, "a number above 0")
ints = _type("integers", lambda t: [int(x) for x in t.split(",") if x], lambda v: v and min(v) > 0,
             "a comma list of positive integers")


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


# ---- the tables -----------------------------------------------------------------------------------------

def opt(help: str, default=None, *, positional: bool = False, flag: bool = False, exclusive: str | None = None,
        **argparse_kwargs):
    """A verb's option: `help`, its default, and what argparse needs beyond that (type, choices, ...).
    `positional`: an argument, not a flag; `flag`: a store_true switch; `exclusive`: the name of a group of
    options of which at most one may be given."""
    meta = {"help": help, "positional": positional, "exclusive": exclusive, "kwargs": argparse_kwargs}
    if flag:
        meta["kwargs"] = {**argparse_kwargs, "action": "store_true"}
        return field(default=False, metadata={"cli": meta})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"cli": {**meta, "default": list(default)}})
    if positional and default is None:
        return field(metadata={"cli": meta})
    return field(default=default, metadata={"cli": meta})


def _devices(help: str):
    return opt(help, "cpu", type=device)


NPROC = "processes on this machine (torch.distributed; or run under torchrun for several machines)"


@dataclass
class ConvertArgs:
    """fairseq checkpoint -> model folder"""

    GROUPS = (("text_files", "default: as the checkpoint records them, or found beside it"),
              ("search", "generation defaults written to generation_config.json (fairseq names)", ("search",)))
    src: str = opt("checkpoint file, a release folder holding one beside its dictionaries, or an ensemble as "
                   "a.pt:b.pt", positional=True)
    dst: str = opt("output folder (refused if it exists, unless --force)", positional=True)
    force: bool = opt("replace DST if it is a folder fairport wrote (or empty); anything else is refused", flag=True)
    dtype: str = opt("weight dtype in the folder (auto: as in the checkpoint)", "auto", choices=FOLDER_DTYPES)
    int8: bool = opt("also store the int8 model (model.int8.safetensors: int8 weights, a scale per row), which "
                     "--dtype int8 runs then load instead of quantizing (the same values, ~4x faster to load; "
                     "CPU); the float weights stay for transformers, CTranslate2 and verify", flag=True)
    src_dict: str | None = opt("source dictionary (default: found beside the checkpoint)")
    tgt_dict: str | None = opt("target dictionary (default: found beside the checkpoint)")
    lang_dict: str | None = opt("many-to-many models: the language list file (--lang-dict), when it is not where "
                                "the checkpoint recorded it nor beside it")
    bpe: str | None = opt("fairseq --bpe of the text pipeline (default: as the checkpoint records, else from the "
                          "files found): gpt2, fastbpe, subword_nmt, sentencepiece, none")
    tokenizer: str | None = opt("fairseq --tokenizer (default: as the checkpoint records; Moses with fastBPE codes "
                                "otherwise): moses, space, none")
    max_shard_size: int = opt("shard model.safetensors above this size", "2GB", type=size)
    text_files: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)


@dataclass
class GenerateArgs:
    """text in, text out with a converted folder (fairseq-exact search)"""

    GROUPS = (("search", "generation options (default: the folder's generation_config.json)", ("search", "sample")),)
    dst: str = opt("a folder written by `fairport convert`", positional=True)
    input: str = opt("one source per line (default: stdin)", "-")
    output: str = opt("one output per line, in input order (default: stdout)", "-")
    batch_size: int | None = opt("inputs per batch (default 32; with --max-tokens, no bound unless given)",
                                 type=positive_int)
    max_tokens: int | None = opt("batch by token budget, as fairseq-generate's --max-tokens: at most this many "
                                 "padded source tokens a batch (length-sorted; output in input order)",
                                 type=positive_int)
    source_lang: str | None = opt("many-to-many models (M2M-100, mBART-50): the source language")
    target_lang: str | None = opt("many-to-many models: the target language")
    device: str = _devices("cpu, cuda, cuda:N (default: cpu; under torchrun with cuda, each rank takes "
                           "cuda:LOCAL_RANK)")
    dtype: str | None = opt("compute dtype (default float32, as fairseq computes, fp16 folders included); int8: "
                            "float32 with int8 linear layers and embeddings (CPU; outputs move, `fairport verify "
                            "--dtypes int8` measures how much)", choices=DTYPES)
    seed: int | None = opt("seed for sampling", type=int)
    no_pack: bool = opt("CPU: torch's default matrix products instead of oneDNN-packed weights (slower decoding)",
                        flag=True)
    compile: bool = opt("decode with the compiled decoder step (reference/compiled.py: same tokens, faster on small "
                        "models and at batch 1, slower at large batches of large ones; compiled once per machine "
                        "and kept in a cache for later processes)", flag=True)
    nproc: int = opt(NPROC, 1, type=positive_int)
    quiet: bool = opt("no progress bar", flag=True)
    search: dict = field(default_factory=dict)


@dataclass
class VerifyArgs:
    """parity report: the fairseq original against the port, same inputs"""

    GROUPS = (("text_files", "the original's, for the tokenizer check; default: those conversion read"),)
    src: str = opt("the fairseq checkpoint (file, release folder, or a.pt:b.pt ensemble)", positional=True)
    dst: str = opt("the folder written by `fairport convert`", positional=True)
    data: str | None = opt("text file, one source per line (optional TAB + reference)", exclusive="inputs")
    fairseq_data: str | None = opt("binarized fairseq data folder (fairseq-preprocess output)", exclusive="inputs")
    split: str | None = opt("the split of --fairseq-data (default: test)")
    source_lang: str | None = opt("many-to-many models: the direction to verify (source language)")
    target_lang: str | None = opt("many-to-many models: the direction to verify (target language)")
    limit: int = opt("inputs to use (default 100)", 100, type=positive_int)
    device: str = _devices("cpu, cuda, cuda:N (under torchrun with cuda, each rank takes cuda:LOCAL_RANK)")
    dtypes: list = opt("comma list: float32,bfloat16,float16,int8 (the precision matrix)", ["float32"],
                       type=choices_list(DTYPES, "dtype"))
    out: str | None = opt("report folder (default: DST/verify)")
    seed: int = opt("seed of random inputs and sampling", 0, type=int)
    batch_size: int = opt("inputs per batch", 16, type=positive_int)
    logits_tol: float = opt("fp32 logits threshold", 1e-4, type=non_negative)
    max_tie_rate: float | None = opt("share of inputs whose top hypothesis may differ for an explained reason (a "
                                     "near-tie, a batch-dependent original) before generation fails (default 0.02)",
                                     type=fraction)
    strict: bool = opt("require identical top hypotheses (--exact-match), explained or not", flag=True)
    exact_match: float | None = opt("with --strict: the exact-match rate required (default 1)", type=fraction)
    nproc: int = opt(NPROC, 1, type=positive_int)
    resume: bool = opt("keep the batches an interrupted run finished (OUT/shards)", flag=True)
    sides: list = opt("what is checked against the original: the port (always), transformers (when the folder "
                      "loads there), ctranslate2 (CTranslate2's own conversion of SRC; pip install "
                      "'fairport[ctranslate2]')", ["reference", "transformers"],
                      type=choices_list(VERIFY_SIDES, "side"))
    ctranslate2_model: str | None = opt("a ready CTranslate2 model folder to check (instead of converting SRC)")
    compile: bool = opt("the port generates with the compiled decoder step (what `generate --compile` runs): its "
                        "outputs are checked against the original's", flag=True)
    text_files: dict = field(default_factory=dict)


@dataclass
class CardArgs:
    """write DST/README.md: a model card built from the parity report"""

    dst: str = opt("the converted folder", positional=True)
    report: str | None = opt("report folder (default: DST/verify)")
    license: str | None = opt("license id for the card metadata (e.g. mit); upload keeps it")
    repo_id: str | None = opt("the Hub repository the card's usage snippets load from (default: DST's name)")
    dataset_name: str | None = opt("the name the card gives the verification data (default: its file name)")
    force: bool = opt("replace a README.md that is not fairport's unedited card", flag=True)


@dataclass
class UploadArgs:
    """push DST, with its model card, to the Hugging Face Hub"""

    dst: str = opt("the converted folder", positional=True)
    repo_id: str = opt("namespace/name", positional=True)
    private: bool = opt("create the repository private", flag=True)
    revision: str = opt("the branch to push to", "main")
    commit_message: str | None = opt("the commit's message")
    create_pr: bool = opt("open a pull request instead of pushing to the branch", flag=True)
    dry_run: bool = opt("print what would be sent; send nothing", flag=True)
    allow_unverified: bool = opt("upload without a passing parity report (the card says UNVERIFIED)", flag=True)
    report: str | None = opt("report folder (default: DST/verify)")
    license: str | None = opt("license id (default: the one `fairport card` wrote, if any)")
    dataset_name: str | None = opt("the name the card gives the verification data (default: its file name)")
    card: str | None = opt("when DST/README.md is a card you wrote or edited: keep (upload it as it is) or replace "
                           "(upload a card built from the report; the local file is never changed)",
                           choices=("keep", "replace"))


@dataclass
class BenchArgs:
    """time reference / fairseq / transformers on the same inputs"""

    target: str = opt(f"a converted folder, or a preset: {', '.join(PRESETS)}", positional=True)
    sides: list = opt("any of reference, reference-unpacked (without the oneDNN-packed weights), reference-compiled "
                      "(the compiled decoder step; its load time includes compiling), fairseq, transformers, "
                      "ctranslate2 (converted by its own ct2-fairseq-converter; pip install fairport[ctranslate2])",
                      ["reference", "fairseq", "transformers"], type=choices_list(BENCH_SIDES, "side"))
    batch: list = opt("batch sizes, comma list", [1, 8], type=ints)
    beam: list = opt("beam sizes, comma list", [1, 5], type=ints)
    dtype: list = opt("reference dtypes, comma list of float32,bfloat16,float16,int8 (fairseq is always the fp32 "
                      "baseline)", ["float32"], type=choices_list(DTYPES, "dtype"))
    steps: int = opt("decoder steps per hypothesis (min_len = max_len_b)", 40, type=positive_int)
    src_len: int | None = opt("source length in tokens (default: the preset's)", type=positive_int)
    repeats: int = opt("timed runs per configuration and side", 3, type=positive_int)
    warmup: float = opt("seconds of untimed runs per configuration and side before timing (at least one run)", 1.0,
                        type=non_negative)
    threads: list | None = opt("thread counts each side is timed with; its fastest is compared (default: 1 to the "
                               "number of cores)", type=ints)
    procs: list = opt("also measure the reference's throughput on a corpus with this many processes (comma list, "
                      "e.g. 1,2: torch.distributed, the machine's cores shared out)", [], type=ints)
    corpus: int = opt("also translate a corpus of this many sentences with each engine's own batching (reference, "
                      "reference-compiled, fairseq, ctranslate2 among --sides; 0: off): sentences/s, tokens/s, "
                      "peak RSS, outputs against fairseq's", 0, type=count)
    corpus_text: str | None = opt("the corpus as text (one sentence a line, through the folder's tokenizer); "
                                  "default: random ids with a test set's spread of lengths")
    max_tokens: int = opt("the corpus's batches: at most this many padded source tokens (fairseq-generate "
                          "--max-tokens, CTranslate2 max_batch_size with batch_type tokens)", 4096, type=positive_int)
    device: str = opt("cpu or cuda (without a GPU: \"not measured\")", "cpu", type=device_name)
    workdir: str = opt("where presets are built and converted", "fairport-bench")
    out: str | None = opt("results JSON (a PNG plot is written beside it)")


VERBS = {"convert": ConvertArgs, "generate": GenerateArgs, "verify": VerifyArgs, "card": CardArgs,
         "upload": UploadArgs, "bench": BenchArgs}


# ---- argparse from the tables ----------------------------------------------------------------------------

def add_options(parser: argparse.ArgumentParser, table) -> None:
    """One argparse argument per field of `table` (a verb's dataclass), then its groups' flags."""
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(table):
        meta = f.metadata.get("cli")
        if meta is None:
            continue
        kwargs = {"help": meta["help"], **meta["kwargs"]}
        if meta["positional"]:
            parser.add_argument(f.name, **kwargs)
            continue
        if kwargs.get("action") != "store_true":
            kwargs["default"] = meta.get("default", f.default if f.default is not MISSING else None)
        target = parser
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    for name, title, *kinds in getattr(table, "GROUPS", ()):
        group = parser.add_argument_group(title if name == "search" else f"text pipeline files ({title})")
        if name == "text_files":
            _text_file_flags(group)
        else:
            _search_flags(group, *kinds[0])


def parse(table, namespace: argparse.Namespace):
    """The verb's dataclass from what argparse parsed: its fields, and its groups' values as dicts (the text
    files given, and the generation options given, by GenerationOptions' names)."""
    values = {f.name: getattr(namespace, f.name) for f in fields(table) if "cli" in f.metadata}
    for name, _, *kinds in getattr(table, "GROUPS", ()):
        if name == "text_files":
            from fairport.converters.text import TEXT_FILES

            values[name] = {k: getattr(namespace, k) for k in TEXT_FILES if getattr(namespace, k)}
        else:
            values[name] = {k: getattr(namespace, k) for k in _search_fields(*kinds[0])
                            if getattr(namespace, k) is not None}
    return table(**values)


def _text_file_flags(group) -> None:
    from fairport.converters.text import TEXT_FILES

    for f in TEXT_FILES.values():
        group.add_argument(f.flag, dest=f.field, help=f.help)


SEARCH_TYPES = {"beam": positive_int, "max_len_b": count, "min_len": count, "no_repeat_ngram_size": count,
                "lenpen": float, "max_len_a": non_negative, "temperature": positive, "sampling_topk": int,
                "sampling_topp": float}


def _search_fields(*kinds: str) -> list:
    from fairport.reference.generate import GenerationOptions

    return [f.name for f in fields(GenerationOptions) if f.metadata["cli"] in kinds]


def _search_flags(group, *kinds: str) -> None:
    """fairseq's generation options as flags (GenerationOptions is their one table)."""
    from fairport.reference.generate import GenerationOptions

    for f in fields(GenerationOptions):
        if f.metadata["cli"] not in kinds:
            continue
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            group.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            group.add_argument(flag, type=SEARCH_TYPES[f.name],
                               help=f"{f.metadata['help']} (fairseq's default: {f.default})")
