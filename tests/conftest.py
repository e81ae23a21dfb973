"""Session-wide fixtures: checkpoints made by fairseq itself (in a subprocess), converted once. Shared helpers
live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

# MKL picks kernels by memory alignment unless asked for reproducible results, so the same fp32 product can round
# differently from one process to the next. On a fixture whose activations grow large (pre-norm without a final
# norm) that was seen to move its logits by 2.6e-4 in 1 process of 8, against 8.6e-6 otherwise. The tests ask for
# reproducible results, as the command line does (fairport/cli.py; no measurable cost); subprocesses inherit it.
# Tolerances are unchanged.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# compiled decoder steps are kept for this session only (the tests' processes share them; no earlier run's count)
os.environ["FAIRPORT_CACHE"] = __import__("tempfile").mkdtemp(prefix="fairport-test-cache-")
# the original's workers, in this process and every process the tests start, are forked from one that imported
# fairseq once (fairport/validation/original/forkserver.py; started below when fairseq tests are selected)
os.environ["FAIRPORT_ORIGINAL_FORKSERVER"] = os.path.join(os.environ["FAIRPORT_CACHE"], "original.sock")

import pytest

from fairport.util import run_module, stderr_tail
from helpers import HAVE_FAIRSEQ, SHARED, gpt2_files

# fixtures that need fairseq: a test that uses one is marked `fairseq` (and skipped without it)
FAIRSEQ_FIXTURES = {"fixtures_dir", "converted", "real_sizes_dir", "trained_dir", "verified_port", "trained_port",
                    "trained_converted", "fairseq_generations", "port"}


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="fairseq (the original) is not installed: pip install -e .[fairseq] "
                                   "(or bash scripts/install.sh)")
    for item in items:
        if FAIRSEQ_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fairseq)
        if "fairseq" in item.keywords and not HAVE_FAIRSEQ:
            item.add_marker(skip)
    # the tests that wait for compilations started at collection (pytest_collection_finish) run last
    items.sort(key=lambda item: "compiled_once" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    """The original's fork server starts when fairseq tests were selected; the compilations
    test_compiled.py's fairseq-free tests need start now, beside the tests before them."""
    if session.config.option.collectonly:
        return
    if HAVE_FAIRSEQ and any("fairseq" in item.keywords for item in session.items):
        import subprocess
        import sys

        log = open(Path(os.environ["FAIRPORT_CACHE"]) / "original-forkserver.log", "w")  # noqa: SIM115 - its stderr
        session.config.original_forkserver = subprocess.Popen(
            [sys.executable, "-m", "fairport.validation.original.forkserver",
             os.environ["FAIRPORT_ORIGINAL_FORKSERVER"]],
            stdin=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if HAVE_FAIRSEQ and any(item.module.__name__ == "test_verify" for item in session.items):
        from helpers import CliServer

        CliServer.get(hub=True)  # verify's command-line server imports transformers while the first tests run
    if any("compiled_once" in getattr(item, "fixturenames", ()) for item in session.items):
        import tempfile

        from test_compiled import start_compiling

        session.config.compiling_ahead = start_compiling(Path(tempfile.mkdtemp(prefix="fairport-compiled-")))


def pytest_sessionfinish(session):
    """Compilations started ahead whose tests did not run (deselected, interrupted) are stopped."""
    _, proc = getattr(session.config, "compiling_ahead", None) or (None, None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()
    server = getattr(session.config, "original_forkserver", None)
    if server is not None:  # it ends when its stdin closes
        server.stdin.close()
        server.wait(timeout=30)


def built_by_fairseq(tmp_path_factory, name: str, *args: str) -> Path:
    """A fresh folder the fixture builder (fairport/validation/original/fixtures.py, run by fairseq) filled."""
    if not HAVE_FAIRSEQ:
        pytest.skip("fairseq (the original) is not installed")
    out = tmp_path_factory.mktemp(name)
    proc = run_module("fairport.validation.original.fixtures", out, *args, "--shared", SHARED)
    if proc.returncode != 0:
        raise RuntimeError("fairseq fixture builder failed:\n" + stderr_tail(proc, 40))
    return out


@pytest.fixture(scope="session")
def tiny_made(tmp_path_factory) -> Path:
    """`release` (helpers.tiny_checkpoint, written without fairseq) and `port`, its folder converted by the
    command line; shared by the session's tests: copy before changing either."""
    from helpers import tiny_release_and_port

    return tiny_release_and_port(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """All fixtures of fairport.validation.original.fixtures.FIXTURES, built by fairseq."""
    return built_by_fairseq(tmp_path_factory, "fairseq-fixtures")


@pytest.fixture(scope="session")
def real_sizes_dir(tmp_path_factory) -> Path:
    return built_by_fairseq(tmp_path_factory, "fairseq-real-sizes", "--real-sizes")


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
    from fairport.validation.verify.report import write
    from fairport.validation.verify.run import VerifyOptions, verify

    dst = tmp_path_factory.mktemp("verified") / "port"
    convert(trained_dir, dst)
    rep = verify(trained_dir, dst, VerifyOptions(limit=8, fairseq_data=trained_dir / "bin", progress=False))
    write(rep, dst / "verify", str(trained_dir), str(dst))
    assert rep.passed
    return dst


@pytest.fixture(scope="session")
def trained_converted(trained_dir, tmp_path_factory):
    """The trained fixture converted: `single` (model.pt) and `ensemble` (model.pt + model2.pt)."""
    from fairport.converters.convert import convert

    out = tmp_path_factory.mktemp("trained-converted")
    convert(trained_dir, out / "single")
    convert(f"{trained_dir}/model.pt:{trained_dir}/model2.pt", out / "ensemble")
    return out


@pytest.fixture(scope="session")
def fairseq_generations(trained_dir):
    """fairseq's hypotheses for test_generation.CASES on the trained fixture's first sources (one worker run)."""
    from test_generation import CASES, SEED, source_batch

    from fairport.validation.original.protocol import Generate, run

    src = source_batch(trained_dir)
    results = run([trained_dir / "model.pt"], trained_dir, *[Generate(src, o, seed=SEED) for o in CASES.values()])
    return src, {case: r.hypotheses for case, r in zip(CASES, results)}
