"""Text <-> fairseq ids, exactly as fairseq's hub pipelines do it: `--tokenizer`, then `--bpe`, then the
dictionary, as the folder's config.json `fairport.text` says (converters/text.py decides it at conversion).

- Tokenizers: Moses (sacremoses, fairseq's options: aggressive dash splits, escaping; detokenization in the
  target language) or `space`; none at all is common (BART, mBART, sentencepiece models).
- BPEs: GPT-2 byte-level BPE (ids through the folder's vocab.json, whose ids are fairseq dictionary indices),
  fastBPE / subword-nmt codes (`@@ ` continuation), sentencepiece pieces (`▁` marks a word start).
- Framing: BART's hub gives `<s> x </s>` and forces `<s>` as the first generated token; everything else is
  `x </s>`, followed by the task's source suffix where it has one (mBART translation: `[en_XX]`). Decoding
  drops `<s>`, `</s>` and the generator's EOS (a language token for mBART translation), as fairseq-generate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.reference.dictionary import Dictionary
from fairport.reference.folder import ModelFolder

SPACE = re.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one word: merge the adjacent pair of lowest rank, everywhere it occurs, until no pair has a rank."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


class GPT2BPE:
    """GPT-2 byte-level BPE over a vocabulary whose ids are fairseq dictionary indices."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], unk: int = 3):
        import regex

        self.vocab = vocab
        self.inverse = {i: t for t, i in vocab.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.pat = regex.compile(self.PATTERN)
        self.unk = unk
        self.bpe = lru_cache(maxsize=65536)(self._bpe)

    @classmethod
    def from_folder(cls, folder: Path, unk: int = 3) -> GPT2BPE:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(ln.split()) for ln in lines[1:] if ln.strip()]  # the first line is "#version"
        return cls(vocab, merges, unk)

    def _bpe(self, token: str) -> tuple[str, ...]:
        return tuple(apply_merges(list(token), self.ranks))

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pat.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab.get(t, self.unk) for t in self.bpe(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.inverse.get(i, "<unk>") for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class FastBPE:
    """fastBPE's `apply` (subword-nmt merges, `@@ ` continuation) in Python."""

    def __init__(self, codes_path: Path):
        self.ranks: dict[tuple[str, str], int] = {}
        for i, line in enumerate(Path(codes_path).read_text(encoding="utf-8").splitlines()):
            parts = line.split(" ")
            if len(parts) >= 2 and not (i == 0 and line.startswith("#version")):  # subword-nmt's header
                self.ranks.setdefault((parts[0], parts[1]), i)
        self.word = lru_cache(maxsize=65536)(self._word)

    def _word(self, word: str) -> str:
        subwords = apply_merges(list(word[:-1]) + [word[-1] + "</w>"], self.ranks)
        last = subwords[-1][: -len("</w>")]
        pieces = [s + "@@" for s in subwords[:-1]] + ([last] if last else [])
        if not last and pieces:  # a word whose last merge left only "</w>": drop the trailing marker
            pieces[-1] = pieces[-1][:-2]
        return " ".join(pieces)

    def apply(self, sentence: str) -> str:
        return " ".join(self.word(w) for w in sentence.split(" ") if w)

    @staticmethod
    def remove(sentence: str) -> str:
        return (sentence + " ").replace("@@ ", "").rstrip()


def require_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise FairportError("this folder's text pipeline is sentencepiece, which is not installed: "
                            "pip install sentencepiece (or fairport[text])") from None
    return sentencepiece


class SentencePiece:
    """fairseq's `sentencepiece` BPE: pieces joined by spaces; decoding joins them back on U+2581."""

    def __init__(self, model_path: Path):
        sentencepiece = require_sentencepiece()
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))

    def apply(self, sentence: str) -> str:
        return " ".join(self.sp.encode(sentence, out_type=str))

    @staticmethod
    def remove(sentence: str) -> str:
        return sentence.replace(" ", "").replace("\u2581", " ").strip()


class Moses:
    """fairseq's `moses` tokenizer (sacremoses)."""

    def __init__(self, spec: dict):
        from sacremoses import MosesDetokenizer, MosesTokenizer

        self.tok = MosesTokenizer(lang=spec.get("moses_source_lang") or "en")
        self.detok = MosesDetokenizer(lang=spec.get("moses_target_lang") or "en")
        self.dash_splits, self.escape = spec.get("moses_dash_splits", True), spec.get("moses_escape", True)

    def encode(self, text: str) -> str:
        return self.tok.tokenize(text, aggressive_dash_splits=self.dash_splits, return_str=True, escape=self.escape)

    def decode(self, text: str) -> str:
        return self.detok.detokenize(text.split())


class Space:
    """fairseq's `space` tokenizer: whitespace runs become one space; decoding leaves the text alone."""

    def __init__(self, spec: dict):
        pass

    def encode(self, text: str) -> str:
        return SPACE.sub(" ", text)

    def decode(self, text: str) -> str:
        return text


# fairseq --tokenizer / --bpe name -> how to build it from the spec / the folder
TOKENIZERS = {"moses": Moses, "space": Space}
STRING_BPES = {"fastbpe": lambda folder: FastBPE(folder / "bpecodes"),
               "subword_nmt": lambda folder: FastBPE(folder / "bpecodes"),
               "sentencepiece": lambda folder: SentencePiece(folder / "sentencepiece.bpe.model")}
@dataclass
class Framing:
    """How the task frames what the model is fed and what it generates, on ids (no text needed): BART's hub
    (`<s> x </s>`, <s> forced first), a source suffix (mBART translation: `x </s> [en_XX]`), the generator's
    EOS (`[ro_RO]`), a many-to-many model's language tokens (`__en__ x </s>`, `__de__` forced first)."""

    bos: int
    eos: int
    bart: bool = False
    source_suffix: int | None = None
    generation_eos: int | None = None
    multi: dict | None = None  # config.json fairport.multilingual
    source_lang: str | None = None  # the defaults (a single-direction model records them)
    target_lang: str | None = None

    @classmethod
    def from_folder(cls, folder: ModelFolder) -> Framing:
        cfg, meta, spec = folder.config, folder.meta, folder.text or {}
        return cls(cfg.bos, cfg.eos, bool(spec.get("bart")), meta.get("source_suffix"), folder.generation.get("eos"),
                   meta.get("multilingual"), meta.get("source_lang"), meta.get("target_lang"))

    def default_direction(self) -> tuple[str | None, str | None]:
        """The direction used when none is named: the recorded one, else (many-to-many) the first language
        pair (or the first and last language)."""
        if self.multi and not (self.source_lang and self.target_lang):
            pair = (self.multi["lang_pairs"] or [f"{self.multi['langs'][0]}-{self.multi['langs'][-1]}"])[0]
            src, tgt = pair.split("-")
            return self.source_lang or src, self.target_lang or tgt
        return self.source_lang, self.target_lang

    def lang_token(self, lang: str | None, role: str) -> int:
        """A many-to-many model's token for `lang`; a clear error when the direction is not named."""
        tokens = self.multi["tokens"]
        if lang is None:
            raise FairportError(f"this model translates between {', '.join(tokens)}: name the {role} language "
                                f"(source_lang=/target_lang=; CLI: --source-lang/--target-lang)")
        if lang not in tokens:
            raise FairportError(f"{role} language {lang!r} is not one of this model's: {', '.join(tokens)}")
        return tokens[lang]

    def check_direction(self, source_lang: str | None = None, target_lang: str | None = None) -> None:
        """Raise the one-line error framing would raise for this direction, before any work."""
        self.task_source([], source_lang, target_lang)
        self.forced_prefix(target_lang)

    def forced_prefix(self, target_lang: str | None = None) -> int | None:
        """The token forced first in generation: <s> for BART's hub, the target language token for a
        many-to-many model with --decoder-langtok (fairseq's inference_step), else none."""
        if self.bart:
            return self.bos
        if self.multi and self.multi["decoder_langtok"]:
            return self.lang_token(target_lang or self.target_lang, "target")
        return None

    def task_source(self, ids: list[int], source_lang: str | None = None, target_lang: str | None = None) -> list[int]:
        """A source as the task's dataset frames it: `x </s>`, after a many-to-many model's language token
        (`--encoder-langtok src`: the source's; `tgt`: the target's), before the task's suffix."""
        prefix = []
        if self.multi and self.multi["encoder_langtok"]:
            if self.multi["encoder_langtok"].startswith("src"):  # the source's language token leads
                prefix = [self.lang_token(source_lang or self.source_lang, "source")]
            else:  # `--encoder-langtok tgt`: the target's
                prefix = [self.lang_token(target_lang or self.target_lang, "target")]
        suffix = [self.source_suffix] if self.source_suffix is not None else []
        return prefix + ids + [self.eos] + suffix

    def task_target(self, ids: list[int], target_lang: str | None = None) -> list[int]:
        """A target as the task's dataset holds it: `y </s>` (mBART translation: `y </s> [ro_RO]`, ending in the
        generator's EOS; many-to-many: `__de__ y </s>`)."""
        prefix = [] if self.bart or (p := self.forced_prefix(target_lang)) is None else [p]
        return prefix + ids + [self.eos] + ([self.generation_eos] if self.generation_eos not in (None, self.eos)
                                            else [])

    def source(self, ids: list[int], max_positions: int | None = None, source_lang: str | None = None,
               target_lang: str | None = None) -> list[int]:
        """What the model is fed for text: BART's hub framing (truncated as it truncates), else the task's."""
        if self.bart:
            if max_positions is not None and len(ids) > max_positions - 2:
                ids = ids[: max_positions - 2]
            return [self.bos] + ids + [self.eos]
        return self.task_source(ids, source_lang, target_lang)

    def target(self, ids: list[int], max_positions: int | None = None, target_lang: str | None = None) -> list[int]:
        if self.bart and max_positions is not None:
            ids = ids[: max_positions - 2]
        return self.task_target(ids, target_lang)

    def strip(self, ids: list[int], target_lang: str | None = None) -> list[int]:
        """The ids that become text, as fairseq-generate strips a hypothesis: without <s>, </s> and the
        generator's symbols (its EOS; a many-to-many model's target language token). A framed source strips
        too: its leading language token and trailing task suffix go."""
        dropped = {self.eos, self.bos} | ({self.generation_eos} if self.generation_eos is not None else set())
        if self.multi:
            if ids and ids[0] in self.multi["tokens"].values():  # a source's or a hypothesis' language token
                dropped.add(ids[0])
                ids = ids[1:]
            tgt = target_lang or self.target_lang
            if tgt in self.multi["tokens"] and self.multi["decoder_langtok"]:
                dropped.add(self.multi["tokens"][tgt])
        if ids and self.source_suffix is not None and ids[-1] == self.source_suffix:
            ids = ids[:-1]
        return [i for i in ids if i not in dropped]


class Tokenizer:
    """The folder's text pipeline: `encode(text) -> ids`, `decode(ids) -> text`; `framing` is the task's."""

    def __init__(self, folder: Path, spec: dict, src_dict: Dictionary, tgt_dict: Dictionary,
                 framing: Framing | None = None):
        self.spec = spec
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        self.bos, self.eos, self.pad, self.unk = src_dict.bos, src_dict.eos, src_dict.pad, src_dict.unk
        self.framing = framing or Framing(self.bos, self.eos, bool(spec.get("bart")))
        self.pre = TOKENIZERS[spec["tokenizer"]](spec) if spec.get("tokenizer") else None
        self.gpt2 = GPT2BPE.from_folder(folder, src_dict.unk) if spec.get("bpe") == "gpt2" else None
        self.bpe = STRING_BPES[spec["bpe"]](folder) if spec.get("bpe") in STRING_BPES else None

    @classmethod
    def from_folder(cls, folder: ModelFolder) -> Tokenizer:
        src_path, tgt_path = folder.file("dict.src.txt"), folder.file("dict.tgt.txt")
        if not src_path.exists():
            raise FairportError(f"{folder.path} has no dict.src.txt")
        src = Dictionary.load(src_path)
        tgt = Dictionary.load(tgt_path) if tgt_path.exists() else src
        spec = folder.text
        if not spec:
            why = next((n.split(": ", 1)[1] for n in folder.notes if n.startswith("text pipeline:")), None)
            raise FairportError(f"{folder.path} takes token ids only{f' ({why})' if why else ''}; for text, convert "
                                f"again with its BPE files (fairport convert --help)")
        return cls(folder.path, spec, src, tgt, Framing.from_folder(folder))

    @property
    def bart(self) -> bool:
        return self.framing.bart

    @property
    def multi(self) -> dict | None:
        return self.framing.multi

    def ids(self, text: str, dictionary: Dictionary | None = None) -> list[int]:
        """Tokenizer, BPE, dictionary (the source's unless given): the ids of `text` without any framing."""
        if self.pre is not None:
            text = self.pre.encode(text)
        if self.gpt2 is not None:
            return self.gpt2.encode(text)
        if self.bpe is not None:
            text = self.bpe.apply(text)
        d = dictionary or self.src_dict
        return [d.index(w) for w in SPACE.sub(" ", text).strip().split()]

    def encode(self, text: str, max_positions: int | None = None, source_lang: str | None = None,
               target_lang: str | None = None) -> torch.Tensor:
        """What the model is fed for `text`, framed as the task frames inference inputs."""
        return torch.tensor(self.framing.source(self.ids(text), max_positions, source_lang, target_lang),
                            dtype=torch.long)

    def encode_target(self, text: str, max_positions: int | None = None, target_lang: str | None = None) -> list[int]:
        """A reference translation as the task's dataset holds targets (see Framing.task_target)."""
        return self.framing.target(self.ids(text, self.tgt_dict), max_positions, target_lang)

    def decode(self, ids, target_lang: str | None = None, source: bool = False) -> str:
        """fairseq-generate's text: Dictionary.string of the ids Framing.strip keeps, then BPE removal and the
        detokenizer. `source`: ids of the source side (its dictionary)."""
        ids = self.framing.strip([int(i) for i in ids], target_lang)
        if self.gpt2 is not None:
            text = self.gpt2.decode(ids)
        else:
            d = self.src_dict if source else self.tgt_dict
            text = " ".join(d.symbols[i] for i in ids)
            if self.bpe is not None:
                text = self.bpe.remove(text)
        return self.pre.decode(text) if self.pre is not None else text


def load_tokenizer(folder: str | Path | ModelFolder) -> Tokenizer:
    return Tokenizer.from_folder(folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder))
