"""The README's demo: fairseq builds a small BART-like and a small WMT-like checkpoint, fairport converts
them and checks the port against the original. `python -m fairport.validation.demo OUTDIR`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fairport.converters.convert import convert
from fairport.validation.parity import logits_parity

DEMOS = ["bart_base_mnli", "wmt_big_joined"]


def shared_data() -> Path | None:
    here = Path(__file__).resolve().parents[2]
    p = Path(os.environ.get("FAIRPORT_SHARED_DATA", here.parent / "shared" / "data"))
    return p if (p / "gpt2" / "encoder.json").exists() else None


def main(out: str = "fairport-demo") -> int:
    out_dir = Path(out).resolve()
    shutil.rmtree(out_dir, ignore_errors=True)
    src_dir = out_dir / "fairseq"
    shared = shared_data()
    t0 = time.time()
    print(f"[1/3] fairseq builds {', '.join(DEMOS)} (its own arch presets, shrunk) ...", flush=True)
    cmd = [sys.executable, "-m", "fairport.validation.fixtures", str(src_dir), *DEMOS]
    if shared:
        cmd += ["--shared", str(shared)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    failed = 0
    for name in DEMOS:
        print(f"[2/3] fairport convert {src_dir / name} {out_dir / name}", flush=True)
        gpt2 = {}
        if name.startswith("bart") and shared:
            gpt2 = {"encoder_json": shared / "gpt2" / "encoder.json", "vocab_bpe": shared / "gpt2" / "vocab.bpe"}
        r = convert(src_dir / name, out_dir / name, **gpt2)
        print(f"      -> {r['config'].arch}, transformers family: {r['family'] or 'none (reference only)'}")
        print(f"[3/3] logits parity against fairseq on a left-padded batch ...", flush=True)
        p = logits_parity(src_dir / name / "model.pt", src_dir / name, out_dir / name)
        status = "PASS" if p.ok() else "FAIL"
        failed += not p.ok()
        heads = "".join(f", head {h} max|d| {v:.1e}" for h, v in p.head_max_abs.items())
        print(f"      {status} {name}: max|d| {p.max_abs:.1e}, mean|d| {p.mean_abs:.1e} over {p.positions} "
              f"positions{heads} (tolerance 1e-4)")
    print(f"done in {time.time() - t0:.0f}s; converted folders under {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
