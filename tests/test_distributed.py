"""verify and generate on several processes with torch.distributed (gloo on the CPU), launched by torchrun or by
`--nproc`: the same report and the same output file as one process; a failing or dying rank ends the run with
one line naming it and its batch, and `--resume` finishes from the batches already done."""

from __future__ import annotations

import json
import os

import pytest

import helpers
from fairport.distributed import Ranks
from fairport.reference.hub import length_sorted_batches
from fairport.validation.verify.inputs import from_fairseq_data
from helpers import assert_one_error_line, needs_fairseq, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same threads per process either way: the same products, bit for bit
LIMIT = "40"


def torchrun(*args, env=None):
    """`torchrun --standalone --nproc-per-node 2 -m fairport ARGS`."""
    return helpers.torchrun("-m", "fairport", *args, env={**ONE_THREAD, **(env or {})})


TIMINGS = {"seconds", "sentences_per_s", "load_seconds"}  # the engines' sections time themselves too


def comparable(report: dict) -> dict:
    """A report without what differs by design between runs: timings, the environment, the plots."""
    def untimed(node):
        if isinstance(node, dict):
            return {k: untimed(v) for k, v in node.items() if k not in TIMINGS}
        return [untimed(v) for v in node] if isinstance(node, list) else node

    return untimed({k: v for k, v in report.items() if k not in ("speed", "environment", "plots")})


@pytest.fixture(scope="module")
def port(trained_dir, tmp_path_factory):
    from fairport.converters.convert import convert

    out = tmp_path_factory.mktemp("distributed") / "port"
    convert(trained_dir, out)
    return out


@pytest.fixture(scope="module")
def one_process_report(trained_dir, port, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "r"
    proc = run_cli("verify", trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", LIMIT, "--out", out,
                   env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "report.json").read_text())


@needs_fairseq
def test_verify_on_two_ranks_gives_the_one_process_report(trained_dir, port, one_process_report, tmp_path):
    proc = torchrun("verify", trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", LIMIT,
                    "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("verify: PASS") == 1  # rank 0 reports; the other rank says nothing
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert comparable(report) == comparable(one_process_report)
    assert report["generation"]["beam"]["outputs"] == one_process_report["generation"]["beam"]["outputs"]
    speed = report["speed"]
    assert speed["processes"] == 2 and [r["rank"] for r in speed["per_rank"]] == [0, 1]
    assert sum(r["inputs"] for r in speed["per_rank"]) == int(LIMIT) and all(r["inputs"] for r in speed["per_rank"])
    assert speed["throughput_sentences_per_s"]["reference"] > 0
    assert not (tmp_path / "r" / "shards").exists()  # a complete run keeps no shards


@needs_fairseq
def test_generate_on_two_ranks_writes_the_one_process_file_in_input_order(trained_dir, port, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join((trained_dir / "test.en").read_text().splitlines()[:30]) + "\n")
    one = run_cli("generate", port, "--input", src, "--output", tmp_path / "one.txt", "--batch-size", "4", "--quiet",
                  env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    two = torchrun("generate", port, "--input", src, "--output", tmp_path / "two.txt", "--batch-size", "4", "--quiet")
    assert two.returncode == 0, two.stderr
    launched = run_cli("generate", port, "--input", src, "--output", tmp_path / "nproc.txt", "--batch-size", "4",
                       "--quiet", "--nproc", "2")
    assert launched.returncode == 0, launched.stderr
    lines = (tmp_path / "one.txt").read_text().splitlines()
    assert len(lines) == 30 and lines == (tmp_path / "two.txt").read_text().splitlines()
    assert lines == (tmp_path / "nproc.txt").read_text().splitlines()


def _a_batch_of_rank_1(trained_dir) -> tuple[int, list[int]]:
    inputs = from_fairseq_data(trained_dir / "bin", "test", "en", "de", int(LIMIT))
    batches = length_sorted_batches([len(s) for s in inputs.src], 16)
    b = Ranks(1, 2).deal([sum(len(inputs.src[i]) for i in batch) for batch in batches])[-1]
    return b, batches[b]


@needs_fairseq
def test_a_failing_rank_is_named_with_its_batch_and_resume_finishes(trained_dir, port, one_process_report, tmp_path):
    b, inputs = _a_batch_of_rank_1(trained_dir)
    out = tmp_path / "r"
    args = ["verify", trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", LIMIT, "--out", out]
    proc = torchrun(*args, env={"FAIRPORT_TEST_FAULT": f"1:{b}"})
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fairport: error:")]
    assert len(errors) == 1 and f"rank 1 failed on batch {b} (inputs {inputs})" in errors[0], proc.stderr
    assert not (out / "report.json").exists() and not (out / "report.md").exists()  # nothing looks complete
    kept = sorted(p.name for p in (out / "shards").glob("batch-*.pt"))
    assert kept and f"batch-{b:05d}.pt" not in kept
    proc = torchrun(*args, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished batches kept" in proc.stdout
    assert comparable(json.loads((out / "report.json").read_text())) == comparable(one_process_report)


@needs_fairseq
def test_a_dying_rank_is_named_in_one_line_by_the_launcher(trained_dir, port, tmp_path):
    b, inputs = _a_batch_of_rank_1(trained_dir)
    out = tmp_path / "r"
    proc = run_cli("verify", trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", LIMIT, "--out", out,
                   "--nproc", "2", env={"FAIRPORT_TEST_FAULT": f"1:{b}:exit"})
    line = assert_one_error_line(proc, "rank 1 died", f"batch {b}", "--resume")
    assert str(inputs) in line and not (out / "report.json").exists()


@needs_fairseq
def test_a_run_torchrun_restarts_resumes_from_its_kept_batches(trained_dir, port, one_process_report, tmp_path):
    """torchrun --max-restarts 1: a rank dies on its last batch; torchrun restarts the workers, which keep the
    finished batches by themselves (no --resume) and finish with the one-process report."""
    b, _ = _a_batch_of_rank_1(trained_dir)
    out = tmp_path / "r"
    proc = helpers.torchrun("--max-restarts", "1", "-m", "fairport", "verify", trained_dir, port,
                            "--fairseq-data", trained_dir / "bin", "--limit", LIMIT, "--out", out,
                            env={**ONE_THREAD, "FAIRPORT_TEST_FAULT": f"1:{b}:exit"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchrun restart 1:" in proc.stdout and "finished batches kept" in proc.stdout
    assert comparable(json.loads((out / "report.json").read_text())) == comparable(one_process_report)


def two_agents(*args) -> list:
    """Two torchrun agents on this machine, as on two machines (`--nnodes 2`, one process each), meeting at a
    c10d rendezvous on localhost: `fairport ARGS` on each; both finished processes."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"two-{port}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **ONE_THREAD}
    procs = [subprocess.Popen([*common, "--node-rank", str(n), "-m", "fairport", *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for n in (0, 1)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=helpers.PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("two torchrun agents ran past the test's process timeout")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@needs_fairseq
def test_two_torchrun_agents_give_the_one_process_report_and_file(trained_dir, port, one_process_report, tmp_path):
    """Several machines, exercised on one: two agents (--nnodes 2, c10d rendezvous on localhost) verify and
    generate as one process does."""
    procs = two_agents("verify", trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", LIMIT,
                       "--out", tmp_path / "r")
    assert all(p.returncode == 0 for p in procs), [p.stdout[-2000:] + p.stderr[-2000:] for p in procs]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert comparable(report) == comparable(one_process_report) and report["speed"]["processes"] == 2
    src = tmp_path / "in.txt"
    src.write_text("\n".join((trained_dir / "test.en").read_text().splitlines()[:30]) + "\n")
    one = run_cli("generate", port, "--input", src, "--output", tmp_path / "one.txt", "--batch-size", "4", "--quiet",
                  env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    procs = two_agents("generate", port, "--input", src, "--output", tmp_path / "two.txt", "--batch-size", "4",
                       "--quiet")
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    assert (tmp_path / "two.txt").read_text() == (tmp_path / "one.txt").read_text()
