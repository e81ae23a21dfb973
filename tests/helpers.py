"""What the tests share: paths, which originals are installed, a CLI runner, assertions."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRPORT_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAVE_FAIRSEQ = importlib.util.find_spec("fairseq") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# tests that run fairseq (the original); conftest skips them where it is not installed, and
# `pytest -m "not fairseq"` leaves them out
needs_fairseq = pytest.mark.fairseq
needs_shared = pytest.mark.skipif(not (SHARED / "gpt2" / "encoder.json").exists(),
                                  reason=f"shared data not found at {SHARED}")
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")


def gpt2_files(name: str) -> dict:
    """The GPT-2 BPE files a fixture with a GPT-2 dictionary converts with (when the shared data is here)."""
    from fairport.original.fixtures import FIXTURES

    if FIXTURES.get(name, {}).get("dicts") == "gpt2" and (SHARED / "gpt2" / "encoder.json").exists():
        return {"encoder_json": SHARED / "gpt2" / "encoder.json", "vocab_bpe": SHARED / "gpt2" / "vocab.bpe"}
    return {}


def run_cli(*args, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m fairport ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fairport", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, input=stdin, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """A non-zero exit with exactly one line on stderr, `fairport: error: ...`, naming `words`; no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fairport: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    """Within `atol` everywhere; the failure message gives the largest and mean differences."""
    d = (actual.float() - expected.float()).abs()
    assert d.max().item() <= atol, f"{what}: max |Δ| {d.max().item():.3g} (mean {d.mean().item():.3g}) > {atol}"
