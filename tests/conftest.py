"""Session-wide fixtures: checkpoints made by fairseq itself (in a subprocess), converted once. Shared helpers
live in helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# MKL picks kernels by memory alignment unless asked for reproducible results, so the same fp32 product can round
# differently from one process to the next. On a fixture whose activations grow large (pre-norm without a final
# norm) that was seen to move its logits by 2.6e-4 in 1 process of 8, against 8.6e-6 otherwise. The tests ask for
# reproducible results, as the command line does (fairport/cli.py; no measurable cost); subprocesses inherit it.
# Tolerances are unchanged.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# The suite runs in pytest-xdist's worker processes (pyproject.toml: `-n auto`, a file per worker at a time). One
# folder per test session, made by the process pytest started and inherited by its workers, holds what they share:
# the fixtures fairseq builds (`shared`: built once, by the first worker that needs one) and the compiled decoder
# steps (FAIRPORT_CACHE: this session's only, no earlier run's count).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...; None in the process pytest started
if WORKER is None or "FAIRPORT_TEST_SESSION" not in os.environ:
    os.environ["FAIRPORT_TEST_SESSION"] = tempfile.mkdtemp(prefix="fairport-test-")
SESSION = Path(os.environ["FAIRPORT_TEST_SESSION"])
os.environ["FAIRPORT_CACHE"] = str(SESSION / "cache")
# the original's workers, in this process and every process its tests start, are forked from one that imported
# fairseq once (fairport/validation/original/forkserver.py; started below when fairseq tests are selected)
os.environ["FAIRPORT_ORIGINAL_FORKSERVER"] = str(SESSION / f"original-{WORKER or 'main'}.sock")

# after the settings above (torch reads MKL_CBWR when it loads)
import pytest  # noqa: E402

from fairport.util import run_module, stderr_tail  # noqa: E402
from helpers import HAVE_FAIRSEQ, SHARED, gpt2_files  # noqa: E402

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


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4 (each starts its own servers: the original's, the command line's)."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_configure(config):
    """Workers that share the cores run their torch on a share of them: threads of two processes on one core wait
    for each other (a test that measures threads sets its own)."""
    workers = getattr(config.option, "numprocesses", None) or 0
    if WORKER is None and isinstance(workers, int) and workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_finish(session):
    """The original's fork server starts when fairseq tests were selected; the compilations
    test_compiled_cache.py's tests need start now (in the first worker to get here), beside the tests
    before them."""
    if session.config.option.collectonly:
        return
    if HAVE_FAIRSEQ and any("fairseq" in item.keywords for item in session.items):
        import subprocess
        import sys

        log = open(SESSION / f"original-{WORKER or 'main'}.log", "w")  # noqa: SIM115 - the server's stderr
        session.config.original_forkserver = subprocess.Popen(
            [sys.executable, "-m", "fairport.validation.original.forkserver",
             os.environ["FAIRPORT_ORIGINAL_FORKSERVER"]],
            stdin=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if HAVE_FAIRSEQ and any(item.module.__name__ == "test_verify" for item in session.items):
        from helpers import CliServer

        CliServer.get(hub=True)  # verify's command-line server imports transformers while the first tests run
    if any("compiled_once" in getattr(item, "fixturenames", ()) for item in session.items):
        from test_compiled_cache import COMPILED_AHEAD, start_compiling

        session.config.compiling_ahead = start_compiling(SESSION / COMPILED_AHEAD)  # None: another worker did


def pytest_sessionfinish(session, exitstatus):
    """Compilations started ahead are waited for (another worker's tests may be waiting for them), or stopped when
    the run was interrupted; the servers end."""
    proc = getattr(session.config, "compiling_ahead", None)
    if proc is not None and proc.poll() is None:
        if exitstatus == pytest.ExitCode.INTERRUPTED or session.shouldstop or session.shouldfail:
            proc.kill()
        proc.wait()
    server = getattr(session.config, "original_forkserver", None)
    if server is not None:  # it ends when its stdin closes
        server.stdin.close()
        server.wait(timeout=30)


def pytest_unconfigure(config):
    """The session's folder goes with the process that made it."""
    if WORKER is None:
        import shutil

        shutil.rmtree(SESSION, ignore_errors=True)


def shared(name: str, build) -> Path:
    """`SESSION/fixtures/NAME`, made by `build(path)` once per test session: by the first of the session's processes
    (pytest-xdist's workers) that asks for it, while the others that ask wait. Shared: copy before changing."""
    import fcntl
    import shutil

    out = SESSION / "fixtures" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        done = out.with_name(out.name + ".done")
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a failed try left
            build(out)
            done.touch()
    return out


def built_by_fairseq(name: str, *args: str) -> Path:
    """A folder the fixture builder (fairport/validation/original/fixtures.py, run by fairseq) filled."""
    if not HAVE_FAIRSEQ:
        pytest.skip("fairseq (the original) is not installed")

    def build(out: Path) -> None:
        out.mkdir()
        proc = run_module("fairport.validation.original.fixtures", out, *args, "--shared", SHARED)
        if proc.returncode != 0:
            raise RuntimeError("fairseq fixture builder failed:\n" + stderr_tail(proc, 40))

    return shared(name, build)


@pytest.fixture(scope="session")
def tiny_made() -> Path:
    """`release` (helpers.tiny_checkpoint, written without fairseq) and `port`, its folder converted by the
    command line; shared by the session's tests: copy before changing either."""
    from helpers import tiny_release_and_port

    return shared("tiny", tiny_release_and_port)


@pytest.fixture()
def tiny_folder(tiny_made, tmp_path) -> Path:
    """A copy of tiny_made's folder, this test's own to change."""
    import shutil

    return Path(shutil.copytree(tiny_made / "port", tmp_path / "folder"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """All fixtures of fairport.validation.original.fixtures.FIXTURES, built by fairseq."""
    return built_by_fairseq("fairseq-fixtures")


@pytest.fixture(scope="session")
def real_sizes_dir() -> Path:
    return built_by_fairseq("fairseq-real-sizes", "--real-sizes")


@pytest.fixture(scope="session")
def converted(fixtures_dir):
    """name -> converted folder (fp32 checkpoints as stored; dtype auto)."""
    from fairport.converters.convert import convert

    def get(name: str) -> Path:
        return shared(f"converted/{name}", lambda out: convert(fixtures_dir / name, out, **gpt2_files(name)))

    return get


@pytest.fixture(scope="session")
def trained_dir() -> Path:
    """A small translation model trained by fairseq-train (two checkpoints of one run)."""
    return built_by_fairseq("fairseq-trained", "--trained") / "trained_reverse"


@pytest.fixture(scope="session")
def verified_port(trained_dir) -> Path:
    """The trained fixture converted and verified (a passing report in DST/verify)."""
    from fairport.converters.convert import convert
    from fairport.validation.verify.report import write
    from fairport.validation.verify.run import VerifyOptions, verify

    def build(out: Path) -> None:
        out.mkdir()
        convert(trained_dir, out / "port")
        rep = verify(trained_dir, out / "port", VerifyOptions(limit=8, fairseq_data=trained_dir / "bin",
                                                              progress=False))
        write(rep, out / "port" / "verify", str(trained_dir), str(out / "port"))
        assert rep.passed

    return shared("verified", build) / "port"


@pytest.fixture(scope="session")
def trained_converted(trained_dir):
    """The trained fixture converted: `single` (model.pt) and `ensemble` (model.pt + model2.pt)."""
    from fairport.converters.convert import convert

    def build(out: Path) -> None:
        out.mkdir()
        convert(trained_dir, out / "single")
        convert(f"{trained_dir}/model.pt:{trained_dir}/model2.pt", out / "ensemble")

    return shared("trained-converted", build)


@pytest.fixture(scope="session")
def fairseq_generations(trained_dir):
    """fairseq's hypotheses for test_generation.CASES on the trained fixture's first sources (one worker run)."""
    from test_generation import CASES, SEED, source_batch

    from fairport.validation.original.protocol import Generate, run

    src = source_batch(trained_dir)
    results = run([trained_dir / "model.pt"], trained_dir, *[Generate(src, o, seed=SEED) for o in CASES.values()])
    return src, {case: r.hypotheses for case, r in zip(CASES, results)}
