"""What bench times, made ready: a preset built by fairseq at its published shape (random weights) and
converted by fairport (the conversion measured), or a converted folder; CTranslate2's own conversions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fairport.errors import FairportError


def convert_ctranslate2(checkpoint: Path, workdir: Path, dtype: str) -> tuple[Path, dict]:
    """CTranslate2's own conversion of the fairseq checkpoint (verify/ctranslate2.py), timed and sized."""
    from fairport.validation.verify.ctranslate2 import convert

    t0 = time.perf_counter()
    out = convert(checkpoint, workdir / f"ct2-{checkpoint.parent.name}-{dtype}", quantization=dtype)
    size = sum(f.stat().st_size for f in out.iterdir())
    return out, {"seconds": time.perf_counter() - t0, "model_mb": size / 2**20}


def convert_measured(src: Path, dst: Path, int8: bool = False) -> dict:
    """`fairport convert` (with `int8`: --int8) in a process of its own: wall time and peak RSS, beside a plain
    read+write of the checkpoint's bytes."""
    code = ("import json, sys, time\nfrom fairport.converters.convert import convert\n"
            "from fairport.util import peak_rss_mb\n"
            f"t0 = time.time(); convert({str(src)!r}, {str(dst)!r}, force=True, int8={int8})\n"
            "print(json.dumps({'seconds': time.time() - t0, 'peak_rss_mb': peak_rss_mb()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FairportError("conversion failed:\n" + proc.stderr[-1500:])
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    ckpt = next(Path(src).glob("*.pt"))
    size = ckpt.stat().st_size
    t0 = time.time()
    with open(ckpt, "rb") as f, open(dst.parent / ".copy-test", "wb") as g:
        while chunk := f.read(1 << 24):
            g.write(chunk)
    plain = time.time() - t0
    (dst.parent / ".copy-test").unlink()
    return {**stats, "int8_stored": int8, "checkpoint_mb": size / 2**20,
            "rss_over_file": stats["peak_rss_mb"] / (size / 2**20), "plain_read_write_seconds": plain}


def preset(target: str, workdir: Path, say, int8: bool = False) -> tuple[Path, Path, dict]:
    """A preset built by fairseq (once; kept in workdir) and converted (with `int8`, the int8 model stored too, as
    `convert --int8`), the conversion measured: (checkpoint, converted folder, conversion stats)."""
    src_dir = workdir / target
    if not (src_dir / "model.pt").exists():
        say(f"fairseq builds {target} at its published size (random weights) ...")
        proc = subprocess.run([sys.executable, "-m", "fairport.validation.bench.presets", str(workdir), target],
                              capture_output=True, text=True,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            raise FairportError("building the preset failed:\n" + proc.stderr[-1500:])
    folder = workdir / f"{target}-port"
    say(f"fairport convert {src_dir} {folder}{' --int8' if int8 else ''} ...")
    return src_dir / "model.pt", folder, convert_measured(src_dir, folder, int8)
