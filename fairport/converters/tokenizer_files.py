"""Tokenizer files for the output folder, built so that token ids equal fairseq dictionary indices.

GPT-2 BPE (BART/mBART-on-GPT-2): fairseq's dict.txt lists GPT-2 ids as strings ("13 850314647"); the
folder's `vocab.json` maps each BPE token straight to its fairseq index, `merges.txt` is vocab.bpe.
fastBPE (WMT19): `vocab-src.json`/`vocab-tgt.json` (fairseq symbols with `@@` continuation rewritten as
transformers' FSMT expects: `le@@` -> `le`, `er` -> `er</w>`) and `merges.txt` (bpecodes without counts).
sentencepiece (mBART, and models trained with `--bpe sentencepiece`): the model file, copied as
`sentencepiece.bpe.model`; fairseq looks its pieces up in the dictionary like any other BPE symbols (transformers'
tokenizer.json for it: spm_tokenizer.py).
The fairseq dictionaries themselves are kept as `dict.src.txt`/`dict.tgt.txt`, task additions included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fairport.errors import FairportError
from fairport.reference.dictionary import SPECIALS, Dictionary
from fairport.util import first_line


def gpt2_vocab(encoder_json: Path, dictionary: Dictionary) -> dict[str, int]:
    """BPE token -> fairseq index. Symbols that are not GPT-2 ids (<s>, <mask>, madeupwordNNNN, [lang])
    map to themselves. Where fairseq has a symbol twice (#fairseq:overwrite), the later index wins, as
    fairseq's own lookup does."""
    try:
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FairportError(f"cannot read GPT-2 encoder.json {encoder_json}: {e}") from None
    decoder = {v: k for k, v in encoder.items()}
    vocab: dict[str, int] = {}
    for idx, sym in enumerate(dictionary.symbols):
        if idx >= len(SPECIALS) and sym.isdigit():
            if int(sym) not in decoder:
                raise FairportError(f"dictionary symbol {sym!r} (index {idx}) is not a GPT-2 id in {encoder_json}")
            token = decoder[int(sym)]
        else:
            token = sym
        vocab[token] = idx
    return vocab


def write_gpt2(out: Path, encoder_json: Path, vocab_bpe: Path, dictionary: Dictionary, max_len: int) -> list[str]:
    vocab = gpt2_vocab(encoder_json, dictionary)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = Path(vocab_bpe).read_text(encoding="utf-8")
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "cls_token": "<s>", "sep_token": "</s>"}
    if "<mask>" in dictionary:
        specials["mask_token"] = "<mask>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BartTokenizer", "model_max_length": max_len, "add_prefix_space": False,
        "errors": "replace", **specials}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


def fsmt_vocab(dictionary: Dictionary) -> dict[str, int]:
    vocab = {}
    for idx, sym in enumerate(dictionary.symbols):
        if sym in SPECIALS:
            key = sym
        elif sym.endswith("@@"):
            key = sym[:-2]
        else:
            key = sym + "</w>"
        vocab[key] = idx
    return vocab


def write_fastbpe(out: Path, bpecodes: Path, src: Dictionary, tgt: Dictionary, langs: list[str],
                  max_len: int) -> list[str]:
    (out / "vocab-src.json").write_text(json.dumps(fsmt_vocab(src), ensure_ascii=False), encoding="utf-8")
    (out / "vocab-tgt.json").write_text(json.dumps(fsmt_vocab(tgt), ensure_ascii=False), encoding="utf-8")
    codes = Path(bpecodes).read_text(encoding="utf-8")
    merges = re.sub(r" \d+$", "", codes, flags=re.M)
    merges = re.sub(r"\A#version[^\n]*\n", "", merges)  # subword-nmt's header line
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    (out / "bpecodes").write_text(codes, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "FSMTTokenizer", "langs": langs, "model_max_length": max_len,
        "do_lower_case": False}, indent=2))
    return ["vocab-src.json", "vocab-tgt.json", "merges.txt", "bpecodes", "tokenizer_config.json"]


def write_sentencepiece(out: Path, model: Path) -> list[str]:
    from fairport.reference.tokenizer import require_sentencepiece

    sentencepiece = require_sentencepiece()
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(model))
    except (OSError, RuntimeError) as e:
        raise FairportError(f"{model} is not a sentencepiece model: {first_line(e)}") from None
    (out / "sentencepiece.bpe.model").write_bytes(Path(model).read_bytes())
    return ["sentencepiece.bpe.model"]
