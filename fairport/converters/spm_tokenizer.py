"""A transformers `tokenizer.json` for a sentencepiece folder whose ids are fairseq's.

fairseq encodes sentencepiece text in two steps: the model's pieces (`encode(out_type=str)`), then each piece looked
up in the fairseq dictionary (`<unk>` when absent). The dictionary's order is fairseq-preprocess's (by frequency,
specials and task symbols added), not the sentencepiece model's, so transformers' own mBART/M2M-100 classes, which
derive ids from the model file, do not hold for a model trained by someone else. This file writes the pieces
straight at their dictionary indices: the sentencepiece normalizer (its precompiled character map, whitespace
rules, dummy prefix), the model (Unigram with the pieces' scores, or BPE with merges ranked by the merged piece's
score, as sentencepiece ranks them), and a post-processor that frames a source as the task does.

One rule it cannot express: a piece of the sentencepiece model that is not in the dictionary. fairseq maps it to
`<unk>` after segmenting; a tokenizer.json has one id per piece, so a Unigram model leaves such pieces out (text
whose segmentation uses one is split differently) and a BPE model keeps them at ids after the dictionary (its
merges need them). `out_of_dictionary` counts them (convert notes it; verify names the rule with the piece as
evidence).

The model file is read with a few lines of protobuf wire decoding (sentencepiece's `ModelProto`), so that neither
conversion nor loading needs the protobuf package.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from fairport.errors import FairportError
from fairport.reference.dictionary import Dictionary

# sentencepiece_model.proto: ModelProto.pieces = 1, .trainer_spec = 2, .normalizer_spec = 3; SentencePiece.piece = 1,
# .score = 2, .type = 3; TrainerSpec.model_type = 3, .byte_fallback = 35; NormalizerSpec.precompiled_charsmap = 2,
# .add_dummy_prefix = 3, .remove_extra_whitespaces = 4, .escape_whitespaces = 5
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
PIECES = (NORMAL, USER_DEFINED, BYTE)  # the kinds sentencepiece emits as text


def _fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for length-delimited, the raw 4 or 8
    bytes for fixed-width fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    @classmethod
    def read(cls, path: Path) -> SpmModel:
        try:
            m = cls()
            for number, value in _fields(Path(path).read_bytes()):
                if number == 1:
                    piece, score, kind = "", 0.0, NORMAL
                    for n, v in _fields(value):
                        if n == 1:
                            piece = v.decode("utf-8")
                        elif n == 2:
                            score = struct.unpack("<f", v)[0]
                        elif n == 3:
                            kind = v
                    m.pieces.append((piece, score, kind))
                elif number == 2:
                    for n, v in _fields(value):
                        if n == 3:
                            m.model_type = v
                        elif n == 35:
                            m.byte_fallback = bool(v)
                elif number == 3:
                    for n, v in _fields(value):
                        if n == 2:
                            m.charsmap = v
                        elif n in (3, 4, 5):
                            setattr(m, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                                        5: "escape_whitespaces"}[n], bool(v))
        except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
            raise FairportError(f"{path} is not a sentencepiece model: {e}") from None
        if m.model_type not in (UNIGRAM, BPE) or not m.pieces:
            raise FairportError(f"{path}: sentencepiece model type {m.model_type} has no transformers tokenizer "
                                f"(unigram and BPE do)")
        return m

    @cached_property
    def emitted(self) -> dict[str, float]:
        """The pieces sentencepiece emits as text (normal, user-defined, byte) and their scores."""
        return {p: score for p, score, kind in self.pieces if kind in PIECES}


def out_of_dictionary(spm: SpmModel, dictionary: Dictionary) -> list[str]:
    """The model's ordinary pieces that the dictionary lacks (fairseq maps each to <unk>)."""
    return [p for p in spm.emitted if p not in dictionary]


def specials(spm: SpmModel, dictionary: Dictionary) -> list[int]:
    """The dictionary's indices whose symbols are not pieces of the model (<s>, </s>, language tokens, <mask>,
    madeupwordNNNN): transformers' special tokens, matched whole in text and skipped when decoding."""
    return [i for i, s in enumerate(dictionary.symbols) if s not in spm.emitted]


def build(spm: SpmModel, dictionary: Dictionary, prefix: list[int], suffix: list[int], special: list[int]):
    """The `tokenizers.Tokenizer`: ids are `dictionary`'s; a single sequence is framed `prefix x suffix`;
    `special`: `specials(spm, dictionary)`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE as BPEModel
    from tokenizers.models import Unigram

    symbols = dictionary.symbols
    index = {s: i for i, s in enumerate(symbols)}  # a symbol listed twice: the later index, as fairseq looks up
    kinds = {p: (score, kind) for p, score, kind in spm.pieces}
    unk = dictionary.unk
    if spm.model_type == UNIGRAM:
        # a special's score is the lowest piece's: the lattice never sees its text (it is split out before), and
        # the unknown-character score (the lowest score - 10, in sentencepiece as in tokenizers) stays the model's
        floor = min((score for _, score, kind in spm.pieces if kind == NORMAL), default=0.0)
        special_set = set(special)
        vocab = [(s, spm.emitted[s]) if i not in special_set and index[s] == i else (s, floor)
                 for i, s in enumerate(symbols)]
        tok = Tokenizer(Unigram(vocab, unk_id=unk, byte_fallback=spm.byte_fallback))
    else:  # every piece, merges need the intermediate ones; those outside the dictionary get ids after it
        ranked = {p: score for p, (score, kind) in kinds.items() if kind == NORMAL}
        vocab = dict(index)
        for p in spm.emitted:
            if p not in vocab:
                vocab[p] = len(vocab)
        merges = sorted(((-score, vocab[p], p[:k], p[k:]) for p, score in ranked.items()
                         for k in range(1, len(p)) if p[:k] in ranked and p[k:] in ranked))
        user_defined = any(kind == USER_DEFINED for _, _, kind in spm.pieces)  # a split-out piece stays whole
        tok = Tokenizer(BPEModel(vocab, [(a, b) for _, _, a, b in merges], unk_token=symbols[unk], fuse_unk=True,
                                 byte_fallback=spm.byte_fallback, ignore_merges=user_defined))
    steps = [normalizers.Precompiled(spm.charsmap)] if spm.charsmap else []
    if spm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    user = sorted((p for p, (_, kind) in kinds.items() if kind == USER_DEFINED and p in index), key=len, reverse=True)
    if user:  # sentencepiece emits a user-defined piece whole wherever it occurs in the normalized text
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(map(re.escape, user))), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1 if spm.add_dummy_prefix else 0, 0)])
    tok.add_special_tokens([AddedToken(symbols[i], special=True, normalized=False) for i in special])
    framed = [(symbols[i], i) for i in dict.fromkeys(prefix + suffix)]
    tok.post_processor = processors.TemplateProcessing(
        single=[symbols[i] for i in prefix] + ["$A"] + [symbols[i] for i in suffix],
        pair=[symbols[i] for i in prefix] + ["$A", "$B"] + [symbols[i] for i in suffix], special_tokens=framed)
    return tok


def write(out: Path, model: Path, dictionary: Dictionary, prefix: list[int], suffix: list[int],
          max_len: int) -> tuple[list[str], list[str]]:
    """tokenizer.json and tokenizer_config.json in `out`; returns (files written, notes)."""
    spm = SpmModel.read(model)
    special = specials(spm, dictionary)
    tok = build(spm, dictionary, prefix, suffix, special)
    tok.save(str(out / "tokenizer.json"))
    s = dictionary.symbols
    names = {"bos_token": s[dictionary.bos], "eos_token": s[dictionary.eos], "unk_token": s[dictionary.unk],
             "pad_token": s[dictionary.pad]}
    extra = [s[i] for i in special if s[i] not in names.values()]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **names,
        "additional_special_tokens": extra, "clean_up_tokenization_spaces": False}, indent=2))
    missing = out_of_dictionary(spm, dictionary)
    notes = [f"transformers tokenizer: {len(missing)} of {len(spm.pieces)} sentencepiece pieces are not in the "
             f"dictionary (e.g. {missing[0]!r}); fairseq turns such a piece into <unk> after segmenting, "
             f"tokenizer.json segments without it"] if missing else []
    return ["tokenizer.json", "tokenizer_config.json"], notes


OUT_OF_DICTIONARY = ("a sentencepiece piece outside the fairseq dictionary: fairseq segments with it and reads it as "
                     "<unk>; tokenizer.json, one id per piece, does not have it")
TIE = ("equal-score segmentations: the unigram lattice has two best paths, and tokenizers breaks the tie otherwise "
       "than sentencepiece")
SPECIAL_TEXT = ("the text holds a special token's literal (e.g. '</s>'), which transformers reads as that token; "
                "fairseq segments it as text")


def explain(spm: SpmModel, dictionary: Dictionary, text: str, pieces: list[str], tokens: list[str]) -> str | None:
    """Why transformers' `tokens` for `text` (no framing) differ from fairseq's sentencepiece `pieces`, each rule
    checked on its evidence: a piece fairseq used that the dictionary lacks (and the rest equal, for BPE), an
    exact tie of the two segmentations' scores (unigram), a special token's text in the input. None: unexplained."""
    scores = spm.emitted
    unk = dictionary.symbols[dictionary.unk]
    pieces = [p if p in scores else unk for p in pieces]  # an unknown character's surface: <unk> on both sides
    missing = {p for p in pieces if p in scores and p not in dictionary}
    if missing and (spm.model_type == UNIGRAM or len(tokens) == len(pieces) and all(
            a == b or a in missing for a, b in zip(pieces, tokens))):
        return OUT_OF_DICTIONARY
    if spm.model_type == UNIGRAM and "".join(pieces) == "".join(tokens) and pieces.count(unk) == tokens.count(unk) \
            and abs(sum(scores.get(p, 0.0) for p in pieces) - sum(scores.get(t, 0.0) for t in tokens)) <= 1e-4:
        return TIE
    if any(dictionary.symbols[i] in text for i in specials(spm, dictionary)):
        return SPECIAL_TEXT
    return None
