"""The README's demo: fairseq builds a small BART-like checkpoint and trains a small WMT-like translation
model; fairport converts both and verifies each against its original, with the same commands a user types.

`python -m fairport.demo [OUTDIR]` (default `fairport-demo`). OUTDIR must be new, empty, or an
earlier demo's folder: the demo marks what it creates (`.fairport-demo` lists it) and only ever removes that.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARKER = ".fairport-demo"
CREATED = ("fairseq", "bart-like", "wmt-like", "en.txt")  # everything the demo writes inside OUTDIR


def shared_data() -> Path | None:
    """The shared data where the tests find it: $FAIRPORT_SHARED_DATA, else ../shared/data beside the repository."""
    repository = Path(__file__).resolve().parents[1]
    p = Path(os.environ.get("FAIRPORT_SHARED_DATA", repository.parent / "shared" / "data"))
    return p if (p / "gpt2" / "encoder.json").exists() else None


def prepare(out_dir: Path) -> None:
    """Make OUTDIR ready: create it, or clear what an earlier demo run created there (nothing else)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"demo: {out_dir} exists and is not a folder; give another output folder")
    marker = out_dir / MARKER
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.exists():
        raise SystemExit(f"demo: {out_dir} already exists, is not empty and was not made by the demo; nothing was "
                         f"touched. Give another output folder: bash scripts/demo.sh OTHER_DIR")
    if marker.exists():
        for name in json.loads(marker.read_text()):
            if name in CREATED:  # the marker lists what the demo made; only those names are ever removed
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(list(CREATED)))


def run(args: list[str], quiet: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m ...` as printed; on failure show its output and stop."""
    cmd = [sys.executable, "-m", *args]
    print("  $ " + shlex.join(["python", "-m", *args]), flush=True)
    proc = subprocess.run(cmd, capture_output=quiet, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and args[:2] != ["fairport", "verify"]):
        raise SystemExit(f"demo: the command above failed (exit {proc.returncode}):\n"
                         + ((proc.stderr or "")[-2000:] if quiet else ""))
    return proc


def main(out: str = "fairport-demo") -> int:
    out_dir = Path(out).resolve()
    prepare(out_dir)
    print(f"demo: writing to {out_dir}", flush=True)
    src_dir = out_dir / "fairseq"
    shared = shared_data()
    t0 = time.time()
    steps = 1 + 2 * 2  # build, then convert and verify each of the two models
    print(f"[1/{steps}] fairseq builds a BART-like checkpoint (bart_base preset, shrunk) and trains a WMT-like "
          "translation model (transformer_wmt_en_de, shrunk; fairseq-train, ~1 min):", flush=True)
    shared_flag = ["--shared", str(shared)] if shared else []
    run(["fairport.validation.original.fixtures", str(src_dir), "bart_base_mnli", *shared_flag])
    run(["fairport.validation.original.fixtures", str(src_dir), "--trained"])

    bart_convert = ["--beam", "4", "--max-len-b", "30", "--lenpen", "2.0", "--no-repeat-ngram-size", "3"]
    bart_verify = ["--limit", "12"]
    if shared:
        bart_convert += ["--gpt2-encoder-json", str(shared / "gpt2" / "encoder.json"),
                         "--gpt2-vocab-bpe", str(shared / "gpt2" / "vocab.bpe")]
        data = out_dir / "en.txt"
        data.write_text("\n".join((shared / "text" / "en.txt").read_text().splitlines()[:12]) + "\n")
        bart_verify += ["--data", str(data)]
    trained = src_dir / "trained_reverse"
    jobs = [("bart-like", src_dir / "bart_base_mnli", bart_convert, bart_verify),
            ("wmt-like", trained, ["--beam", "5"],
             ["--limit", "60", "--fairseq-data", str(trained / "bin"), "--dtypes", "float32,bfloat16"])]
    failed = 0
    for n, (name, src, convert_flags, verify_flags) in enumerate(jobs):
        dst = out_dir / name
        print(f"[{2 + 2 * n}/{steps}] convert ({name}):", flush=True)
        proc = run(["fairport", "convert", str(src), str(dst), *convert_flags])
        print("      " + proc.stdout.strip().replace("\n", "\n      "), flush=True)
        print(f"[{3 + 2 * n}/{steps}] verify ({name}) against the fairseq original:", flush=True)
        proc = run(["fairport", "verify", str(src), str(dst), *verify_flags])
        lines = proc.stdout.strip().splitlines()
        verdict = lines[-1] if lines else "(no output)"
        failed += proc.returncode != 0
        print(f"      {verdict}; report {dst / 'verify' / 'report.md'}", flush=True)
        if proc.returncode != 0:
            print("\n".join("      " + ln for ln in lines if "FAIL" in ln) or proc.stderr[-2000:])
    print(f"done in {time.time() - t0:.0f}s; everything is in {out_dir}")
    example = "s3 s7 s12 s1"  # the trained model reverses a sentence and renames every word
    print(f"try it: echo {shlex.quote(example)} | python -m fairport generate {shlex.quote(str(out_dir / 'wmt-like'))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
