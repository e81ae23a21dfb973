"""The README's demo: fairseq builds a small BART-like checkpoint and trains a small WMT-like translation
model; fairport converts both and verifies each against its original (logits, per-layer outputs,
generation, speed), writing the reports. `python -m fairport.validation.demo OUTDIR`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fairport.converters.convert import convert
from fairport.validation import report as report_writer
from fairport.validation.verify import VerifyOptions, verify


def shared_data() -> Path | None:
    here = Path(__file__).resolve().parents[2]
    p = Path(os.environ.get("FAIRPORT_SHARED_DATA", here.parent / "shared" / "data"))
    return p if (p / "gpt2" / "encoder.json").exists() else None


def _build(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "fairport.validation.fixtures", *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])


def main(out: str = "fairport-demo") -> int:
    out_dir = Path(out).resolve()
    shutil.rmtree(out_dir, ignore_errors=True)
    src_dir = out_dir / "fairseq"
    shared = shared_data()
    t0 = time.time()
    print("[1/3] fairseq builds a BART-like checkpoint (bart_base preset, shrunk) and trains a WMT-like "
          "translation model (transformer_wmt_en_de, shrunk; fairseq-train, ~1 min) ...", flush=True)
    _build([str(src_dir), "bart_base_mnli"] + (["--shared", str(shared)] if shared else []))
    _build([str(src_dir), "--trained"])
    jobs = []
    bart_kw = {"generation_overrides": {"beam": 4, "max_len_b": 30, "lenpen": 2.0, "no_repeat_ngram_size": 3}}
    bart_opts = VerifyOptions(limit=12)
    if shared:
        bart_kw.update(encoder_json=shared / "gpt2" / "encoder.json", vocab_bpe=shared / "gpt2" / "vocab.bpe")
        data = out_dir / "en.txt"
        data.write_text("\n".join((shared / "text" / "en.txt").read_text().splitlines()[:12]) + "\n")
        bart_opts = VerifyOptions(limit=12, data=data)
    jobs.append(("bart-like", src_dir / "bart_base_mnli", bart_kw, bart_opts))
    trained = src_dir / "trained_reverse"
    jobs.append(("wmt-like", trained, {"generation_overrides": {"beam": 5}},
                 VerifyOptions(limit=60, fairseq_data=trained / "bin", dtypes=("float32", "bfloat16"))))
    failed = 0
    for name, src, kw, vopts in jobs:
        dst = out_dir / name
        print(f"[2/3] fairport convert {src} {dst}", flush=True)
        r = convert(src, dst, **kw)
        print(f"      {r['config'].arch}; transformers: {r['family'] or 'none (reference only)'}", flush=True)
        print(f"[3/3] fairport verify {src} {dst}", flush=True)
        vopts.progress = False
        rep = verify(src, dst, vopts)
        report_writer.write(rep, dst / "verify", str(src), str(dst))
        bad = [c for c in rep.checks if not c.passed]
        failed += bool(bad)
        print(f"      {'PASS' if not bad else 'FAIL'}: {len(rep.checks) - len(bad)}/{len(rep.checks)} checks; "
              f"report {dst / 'verify' / 'report.md'}", flush=True)
        for c in bad:
            print(f"      FAIL {c.name}: {c.value} (threshold {c.threshold})")
    print(f"done in {time.time() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
