"""Session-wide fixtures: checkpoints made by fairseq itself (in a subprocess), converted once."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRPORT_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAVE_FAIRSEQ = importlib.util.find_spec("fairseq") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

needs_fairseq = pytest.mark.skipif(not HAVE_FAIRSEQ, reason="fairseq (the original) is not installed: "
                                   "pip install -e .[fairseq]")
needs_shared = pytest.mark.skipif(not (SHARED / "gpt2" / "encoder.json").exists(),
                                  reason=f"shared data not found at {SHARED}")


def run_fixture_builder(out: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "fairport.validation.fixtures", str(out), *args,
                           "--shared", str(SHARED)], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError("fairseq fixture builder failed:\n" + proc.stderr[-3000:])


def built_by_fairseq(tmp_path_factory, name: str, *args: str) -> Path:
    """A fresh folder the fixture builder filled (skips when fairseq is not installed)."""
    if not HAVE_FAIRSEQ:
        pytest.skip("fairseq (the original) is not installed")
    out = tmp_path_factory.mktemp(name)
    run_fixture_builder(out, *args)
    return out


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """All fixtures from fairport.validation.fixtures.FIXTURES, built by fairseq."""
    return built_by_fairseq(tmp_path_factory, "fairseq-fixtures")


@pytest.fixture(scope="session")
def real_sizes_dir(tmp_path_factory) -> Path:
    return built_by_fairseq(tmp_path_factory, "fairseq-real-sizes", "--real-sizes")


def gpt2_files(name: str) -> dict:
    from fairport.validation.fixtures import FIXTURES

    if FIXTURES.get(name, {}).get("dicts") == "gpt2" and (SHARED / "gpt2" / "encoder.json").exists():
        return {"encoder_json": SHARED / "gpt2" / "encoder.json", "vocab_bpe": SHARED / "gpt2" / "vocab.bpe"}
    return {}


@pytest.fixture(scope="session")
def converted(fixtures_dir, tmp_path_factory):
    """name -> converted folder (fp32 checkpoints as stored; dtype auto)."""
    from fairport.converters.convert import convert

    out = tmp_path_factory.mktemp("converted")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            convert(fixtures_dir / name, out / name, **gpt2_files(name))
            cache[name] = out / name
        return cache[name]

    return get


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A small translation model trained by fairseq-train (two checkpoints of one run)."""
    return built_by_fairseq(tmp_path_factory, "fairseq-trained", "--trained") / "trained_reverse"


@pytest.fixture(scope="session")
def verified_port(trained_dir, tmp_path_factory) -> Path:
    """The trained fixture converted and verified (a passing report in DST/verify)."""
    from fairport.converters.convert import convert
    from fairport.validation import report as report_writer
    from fairport.validation.verify import VerifyOptions, verify

    dst = tmp_path_factory.mktemp("verified") / "port"
    convert(trained_dir, dst)
    rep = verify(trained_dir, dst, VerifyOptions(limit=8, fairseq_data=trained_dir / "bin", progress=False))
    report_writer.write(rep, dst / "verify", str(trained_dir), str(dst))
    assert rep.passed
    return dst
