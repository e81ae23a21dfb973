"""fairseq's Dictionary, with its exact semantics (fairseq/data/dictionary.py), without fairseq.

- ids 0..3 are `<s>`, `<pad>`, `</s>`, `<unk>`; then one symbol per line of dict.txt (`<token> <count>`);
- a line ending in `#fairseq:overwrite` adds its token again at a new index (the new index wins lookups);
- a duplicate token without that flag is an error, as in fairseq;
- tasks append symbols after loading: `<mask>` (denoising, sentence prediction), `[lang]` (mBART).
"""

from __future__ import annotations

from pathlib import Path

from fairport.errors import FairportError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


class Dictionary:
    def __init__(self) -> None:
        self.symbols: list[str] = []
        self.counts: list[int] = []
        self.indices: dict[str, int] = {}
        for s in SPECIALS:
            self.add_symbol(s)
        self.bos, self.pad, self.eos, self.unk = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, sym: str) -> bool:
        return sym in self.indices

    def index(self, sym: str) -> int:
        return self.indices.get(sym, self.unk)

    def add_symbol(self, word: str, n: int = 1, overwrite: bool = False) -> int:
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.counts[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.counts.append(n)
        return idx

    @classmethod
    def load(cls, path: str | Path) -> Dictionary:
        d = cls()
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FairportError(f"dictionary not found: {path}") from None
        except UnicodeDecodeError:
            raise FairportError(f"dictionary {path} is not UTF-8 text") from None
        for lineno, line in enumerate(lines, 1):
            try:
                word, field = line.rstrip().rsplit(" ", 1)
                overwrite = field == "#fairseq:overwrite"
                if overwrite:
                    word, field = word.rsplit(" ", 1)
                count = int(field)
            except ValueError:
                raise FairportError(
                    f"{path}:{lineno}: incorrect dictionary format, expected '<token> <cnt> [flags]'") from None
            if word in d and not overwrite:
                raise FairportError(f"{path}:{lineno}: duplicate word {word!r} (fairseq refuses it too; "
                                    f"add '#fairseq:overwrite' to keep both)")
            d.add_symbol(word, count, overwrite=overwrite)
        return d

    def pad_to_multiple(self, factor: int) -> int:
        """fairseq Dictionary.pad_to_multiple_: `madeupwordNNNN` symbols until the size divides by `factor`.
        Returns how many were added."""
        added = 0
        while len(self) % factor:
            self.add_symbol(f"madeupword{added:04d}", n=0)
            added += 1
        return added

    def write(self, path: str | Path) -> None:
        """Write in fairseq's format: every symbol after the 4 specials, one per line."""
        lines = []
        seen: set[str] = set()
        for sym, cnt in zip(self.symbols[4:], self.counts[4:]):
            flag = " #fairseq:overwrite" if sym in seen or sym in SPECIALS else ""
            seen.add(sym)
            lines.append(f"{sym} {cnt}{flag}\n")
        Path(path).write_text("".join(lines), encoding="utf-8")
