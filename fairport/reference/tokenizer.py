"""Text <-> fairseq ids, exactly as fairseq's hub pipelines do it.

- GPT-2 byte-level BPE (BART): text -> GPT-2 BPE tokens -> fairseq ids through the folder's vocab.json
  (ids are fairseq dictionary indices); sentences are `<s> ... </s>`.
- Moses + fastBPE (the WMT19 family): Moses tokenization in the source language (aggressive dash splits,
  escaping, as fairseq's `moses` tokenizer), fastBPE with the release's codes, dictionary lookup, `</s>`;
  back: dictionary string, `@@ ` removal, Moses detokenization in the target language.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from fairport.converters.dictionary import Dictionary
from fairport.errors import FairportError

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
    def from_folder(cls, folder: Path, unk: int = 3) -> "GPT2BPE":
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(ln.split()) for ln in lines[1:] if ln.strip()]  # the first line is "#version"
        return cls(vocab, merges, unk)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            out: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

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
            if len(parts) >= 2:
                self.ranks.setdefault((parts[0], parts[1]), i)
        self.word = lru_cache(maxsize=65536)(self._word)

    def _word(self, word: str) -> str:
        subwords = list(word[:-1]) + [word[-1] + "</w>"]
        while len(subwords) > 1:
            best, best_rank = None, None
            for pair in zip(subwords, subwords[1:]):
                r = self.ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            out: list[str] = []
            i = 0
            while i < len(subwords):
                if i < len(subwords) - 1 and (subwords[i], subwords[i + 1]) == best:
                    out.append(subwords[i] + subwords[i + 1])
                    i += 2
                else:
                    out.append(subwords[i])
                    i += 1
            subwords = out
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


class Tokenizer:
    """The folder's text pipeline: `encode(text) -> ids`, `decode(ids) -> text`."""

    def __init__(self, folder: Path, meta: dict, src_dict: Dictionary, tgt_dict: Dictionary):
        self.kind = meta.get("tokenizer")
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        self.bos, self.eos, self.pad, self.unk = src_dict.bos, src_dict.eos, src_dict.pad, src_dict.unk
        if self.kind == "gpt2":
            self.gpt2 = GPT2BPE.from_folder(folder, src_dict.unk)
        elif self.kind == "fastbpe":
            from sacremoses import MosesDetokenizer, MosesTokenizer

            self.bpe = FastBPE(folder / "bpecodes")
            self.moses = MosesTokenizer(lang=meta.get("source_lang") or "en")
            self.detok = MosesDetokenizer(lang=meta.get("target_lang") or "en")
        else:
            raise FairportError(f"{folder} has no tokenizer files (convert with --gpt2-encoder-json/--gpt2-vocab-bpe "
                                f"or --bpecodes to get text in/out)")

    @property
    def forced_prefix(self) -> int | None:
        """BART's hub forces <s> as the first generated token."""
        return self.bos if self.kind == "gpt2" else None

    def encode(self, text: str, max_positions: int | None = None) -> torch.Tensor:
        if self.kind == "gpt2":
            ids = self.gpt2.encode(text)
            if max_positions is not None and len(ids) > max_positions - 2:  # BART's hub truncates too
                ids = ids[: max_positions - 2]
            return torch.tensor([self.bos] + ids + [self.eos], dtype=torch.long)
        words = self.bpe.apply(self.moses.tokenize(text, aggressive_dash_splits=True, return_str=True, escape=True))
        words = SPACE.sub(" ", words).strip().split()
        return torch.tensor([self.src_dict.index(w) for w in words] + [self.eos], dtype=torch.long)

    def _string(self, ids, dictionary: Dictionary) -> str:
        """fairseq Dictionary.string: drops </s> and <s>, keeps <unk> as '<unk>'."""
        return " ".join(dictionary.symbols[i] for i in ids if i not in (self.eos, self.bos))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "gpt2":
            if ids and ids[0] == self.bos:
                ids = ids[1:]
            return self.gpt2.decode([i for i in ids if i not in (self.eos, self.bos)])
        return self.detok.detokenize(FastBPE.remove(self._string(ids, self.tgt_dict)).split())


def load_tokenizer(folder: str | Path) -> Tokenizer:
    from fairport.reference.load import read_config

    folder = Path(folder)
    _, meta = read_config(folder)
    src = Dictionary.load(folder / "dict.src.txt") if (folder / "dict.src.txt").exists() else None
    tgt = Dictionary.load(folder / "dict.tgt.txt") if (folder / "dict.tgt.txt").exists() else src
    if src is None:
        raise FairportError(f"{folder} has no dict.src.txt")
    return Tokenizer(folder, meta, src, tgt)
