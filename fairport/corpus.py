"""`fairport generate`: a file of sources through a converted folder, in one process or many.

Under torchrun (or with `--nproc N`) every rank loads the folder, encodes the whole input, cuts it into the
same length-sorted batches as one process would (so each output is the one process's output), generates its
share of the batches, and rank 0 gathers the outputs and writes one file in input order.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from fairport.distributed import Ranks
from fairport.errors import FairportError
from fairport.reference import load
from fairport.reference.hub import length_sorted_batches


def read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as e:
        raise FairportError(f"cannot read --input {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise FairportError(f"--input {path} is not UTF-8 text") from None


def generate_file(folder: str, input: str, output: str, *, device: str = "cpu", dtype: str | None = None,
                  pack: bool = True, compile: bool = False, batch_size: int | None = 32,
                  max_tokens: int | None = None, seed: int | None = None,
                  quiet: bool = False, source_lang: str | None = None, target_lang: str | None = None,
                  **gen) -> int:
    from tqdm import tqdm

    check_output(input, output)
    ranks = Ranks.from_env()
    device = ranks.start(device)
    try:
        if compile and ranks.main and not quiet:
            print("the compiled decoder step (compiled once per machine, ~30 s on a tiny model, 1-2 min on large ones, "
                  "then loaded from a cache) ...",
                  file=sys.stderr)
        model = load(folder, device=device, dtype=dtype, pack=pack, compile=compile)
        framing = model.tokenizer.framing  # fails early: no text pipeline
        recorded = {"--source-lang": (source_lang, framing.source_lang),
                    "--target-lang": (target_lang, framing.target_lang)}
        named = [flag for flag, (given, fixed) in recorded.items() if given and given != fixed]
        if named and not framing.multi:
            raise FairportError(f"{' and '.join(named)}: {folder} is not a many-to-many model (it translates "
                                f"{framing.source_lang or '?'}-{framing.target_lang or '?'} only); these flags choose "
                                f"a many-to-many model's direction")
        framing.check_direction(source_lang, target_lang)
        lines = read_lines(input)
        encoded = model.encode_all(lines, source_lang, target_lang)
        batches = length_sorted_batches([len(e) for e in encoded], batch_size, max_tokens)
        mine = [batches[b] for b in ranks.deal([sum(len(encoded[i]) for i in b) for b in batches])]
        desc = "generate" if ranks.world == 1 else f"generate (rank 0 of {ranks.world})"
        with tqdm(total=sum(map(len, mine)), unit="sent", desc=desc, disable=quiet or not ranks.main,
                  file=sys.stderr) as bar:
            hyps = model.generate_batches(encoded, mine, seed, bar, target_lang, **gen)
        texts = {i: model.decode(h[0]["tokens"].tolist(), target_lang) for i, h in enumerate(hyps) if h is not None}
        shares = ranks.gather(texts)
        if ranks.main:
            merged = {i: t for share in shares for i, t in share.items()}
            write_lines(output, [merged[i] for i in range(len(lines))])
        return 0
    finally:
        ranks.stop()


def check_output(input: str, output: str) -> None:
    """Before any work: --output is writable and is not --input (writing it would replace the sources)."""
    if output == "-":
        return
    out = Path(output)
    if input != "-" and out.exists() and Path(input).exists() and os.path.samefile(input, out):  # links too
        raise FairportError(f"--output {output} is the --input file: writing it would replace the sources; give "
                            f"another --output")
    if out.is_dir():
        raise FairportError(f"--output {output} is a folder; give a file name")
    if not out.resolve().parent.is_dir():
        raise FairportError(f"--output {output}: folder {out.resolve().parent} does not exist")


def write_lines(path: str, lines: list[str]) -> None:
    """Standard output, or the file written whole: into a temporary file beside it, renamed over it at the end
    (an interrupted run leaves an earlier file as it was)."""
    text = "".join(line + "\n" for line in lines)
    if path == "-":
        sys.stdout.write(text)
        return
    out = Path(path).resolve()  # a link: the file it points to is written
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".fairport-tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if out.exists():
                os.chmod(tmp, out.stat().st_mode & 0o777)
            else:
                os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise FairportError(f"cannot write --output {path}: {e.strerror}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
