"""Which text pipeline a converted folder gets, decided as fairseq decides it, as data.

fairseq's hub builds `--tokenizer` then `--bpe` from the checkpoint's own options (`cfg.tokenizer`/`cfg.bpe`,
or the legacy `args`), and release archives name them beside the weights (WMT19: Moses + fastBPE with
`bpecodes`; BART: GPT-2 BPE with encoder.json/vocab.bpe; mBART: sentencepiece with sentence.bpe.model).
The choice, in order: `--bpe`/`--tokenizer` given to `fairport convert`; a BPE file passed explicitly; the
checkpoint's recorded choice; the files found beside the checkpoint (fastBPE codes then mean Moses too, as
fairseq's WMT19 hub entries say). A pipeline fairport does not reproduce, or one whose files are missing,
leaves an ids-only folder and says why in provenance.json's notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fairport.converters.checkpoint import recorded_file
from fairport.converters.tasks import TASKS


@dataclass(frozen=True)
class TextFile:
    """A file of the text pipeline: its Sources field (also its key in provenance "inputs"), the command-line
    flag that names it, and the fairseq option under which a checkpoint records it."""

    field: str
    flag: str
    option: str
    help: str


TEXT_FILES: dict[str, TextFile] = {f.field: f for f in (
    TextFile("encoder_json", "--gpt2-encoder-json", "gpt2_encoder_json", "GPT-2 encoder.json (BART)"),
    TextFile("vocab_bpe", "--gpt2-vocab-bpe", "gpt2_vocab_bpe", "GPT-2 vocab.bpe (BART)"),
    TextFile("bpecodes", "--bpecodes", "bpe_codes", "fastBPE / subword-nmt codes (WMT19)"),
    TextFile("sentencepiece_model", "--sentencepiece-model", "sentencepiece_model",
             "sentencepiece model (mBART's sentence.bpe.model)"),
)}

# fairseq --bpe name -> {TEXT_FILES field: the file names a release archive uses for it beside the checkpoint}
BPE_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt2": {"encoder_json": ("encoder.json",), "vocab_bpe": ("vocab.bpe",)},
    "fastbpe": {"bpecodes": ("bpecodes",)},
    "subword_nmt": {"bpecodes": ("bpecodes", "codes", "code")},
    "sentencepiece": {"sentencepiece_model": ("sentencepiece.bpe.model", "sentence.bpe.model", "spm.model")},
}
# fairseq --tokenizer names reproduced (no tokenizer: None)
TOKENIZERS = ("moses", "space")


# A checkpoint that records no --bpe/--tokenizer, with no BPE files beside it: fairseq's hub interface and
# fairseq-interactive take its text as whitespace-separated dictionary symbols, and give symbols back.
WHITESPACE = {"tokenizer": None, "bpe": None, "bart": False}
WHITESPACE_NOTE = ("text pipeline: the checkpoint records no --bpe/--tokenizer and no BPE files were found beside "
                   "it, so text is whitespace-separated dictionary symbols in and out, as fairseq's hub and "
                   "fairseq-interactive take it (convert with --bpe/--tokenizer or the BPE files for another)")


def _name(value) -> str | None:
    return None if value in (None, "", "none", "None") else str(value)


def find_file(field: str, bpe: str, recorded: dict, sources) -> Path | None:
    """The file for `field`: given on the command line, else where the checkpoint recorded it (that path, or
    its base name beside the checkpoint: recorded paths are usually the trainer's, or a URL), else a release
    archive's usual names beside the checkpoint."""
    given = getattr(sources, field)
    if given is not None:
        return Path(given)
    return recorded_file(recorded.get(TEXT_FILES[field].option), sources.folder) or next(
        (p for p in (sources.folder / n for n in BPE_FILES[bpe][field]) if p.is_file()), None)


def choose_bpe(recorded: dict, sources) -> str | None:
    if sources.bpe:
        return _name(sources.bpe)
    explicit = sources.explicit_files
    if {"encoder_json", "vocab_bpe"} & explicit:
        return "gpt2"
    if "sentencepiece_model" in explicit:
        return "sentencepiece"
    if "bpecodes" in explicit:
        return "subword_nmt" if _name(recorded.get("bpe")) == "subword_nmt" else "fastbpe"
    if _name(recorded.get("bpe")):
        return _name(recorded.get("bpe"))
    for bpe in ("gpt2", "fastbpe", "sentencepiece"):  # a release archive's files
        if all(find_file(f, bpe, recorded, sources) for f in BPE_FILES[bpe]):
            return bpe
    return None


def choose_tokenizer(recorded: dict, bpe: str | None, override: str | None) -> str | None:
    if override:  # --tokenizer given to convert
        return _name(override)
    if _name(recorded.get("bpe")) or _name(recorded.get("tokenizer")):
        return _name(recorded.get("tokenizer"))
    return "moses" if bpe in ("fastbpe", "subword_nmt") else None


def resolve(recorded: dict, family: str, task: str, options: dict,
            sources) -> tuple[dict | None, dict[str, Path], list[str]]:
    """Returns (pipeline spec for config.json, {Sources field: file}, notes). spec None: ids only.
    `sources.bpe`/`sources.tokenizer`: the names given to convert, if any."""
    bpe = choose_bpe(recorded, sources)
    tok = choose_tokenizer(recorded, bpe, sources.tokenizer)
    bart_hub = family == "bart" and not (task in TASKS and TASKS[task].frames_text)
    if bpe is None and tok is None and not (sources.bpe or sources.tokenizer):
        if bart_hub:  # nothing recorded, nothing found: fairseq's BART hub defaults to GPT-2 BPE
            bpe = "gpt2"
        else:  # fairseq's hub and fairseq-interactive then take whitespace-separated dictionary symbols
            return dict(WHITESPACE), {}, [WHITESPACE_NOTE]
    notes = []
    if bpe is not None and bpe not in BPE_FILES:
        notes.append(f"text pipeline: fairseq --bpe {bpe} is not reproduced by fairport (it knows "
                     f"{', '.join(BPE_FILES)}); the folder takes and gives token ids only")
    if tok is not None and tok not in TOKENIZERS:
        notes.append(f"text pipeline: fairseq --tokenizer {tok} is not reproduced by fairport (it knows "
                     f"{', '.join(TOKENIZERS)}); the folder takes and gives token ids only")
    if notes or bpe is None and tok is None:
        return None, {}, notes
    files = {field: find_file(field, bpe, recorded, sources) for field in BPE_FILES.get(bpe, {})}
    missing = [field for field, path in files.items() if path is None]
    if missing:
        whose = "the checkpoint records" if _name(recorded.get("bpe")) else "fairseq's BART hub uses" \
            if bart_hub and not sources.bpe else "it uses"
        recs = [str(recorded[TEXT_FILES[f].option]) for f in missing if recorded.get(TEXT_FILES[f].option)]
        where = f" (the checkpoint recorded {', '.join(recs)})" if recs else ""
        return None, {}, [f"text pipeline: {whose} --bpe {bpe} but its {' and '.join(missing)} "
                          f"file{'s' if len(missing) > 1 else ''}{where} "
                          f"{'is' if len(missing) == 1 else 'are'} not beside the checkpoint; pass "
                          f"{' and '.join(TEXT_FILES[f].flag for f in missing)} for text in/out (ids only for now)"]
    # fairseq's BART hub interface: `<s> x </s>` in, <s> forced first; translation tasks that frame their
    # inputs (mBART translation, many-to-many) follow fairseq-generate instead
    spec = {"tokenizer": tok, "bpe": bpe, "bart": bart_hub}
    if tok == "moses":
        spec |= {"moses_source_lang": recorded.get("source_lang") or recorded.get("moses_source_lang")
                 or options.get("source_lang") or "en",
                 "moses_target_lang": recorded.get("target_lang") or recorded.get("moses_target_lang")
                 or options.get("target_lang") or "en",
                 "moses_dash_splits": not recorded.get("moses_no_dash_splits"),
                 "moses_escape": not recorded.get("moses_no_escape")}
    if bpe == "sentencepiece" and recorded.get("sentencepiece_enable_sampling"):
        notes.append("text pipeline: the checkpoint records sentencepiece sampling (a training-time option); "
                     "fairport encodes deterministically")
    return spec, files, notes
