"""`fairport verify SRC DST`: the fairseq original and the port on the same inputs, check by check.

    verify(src, dst, opts) -> Report
        open_setup     (setup.py) the port, the engines, the task's framing and direction, the inputs in
                       length-sorted batches dealt out to the ranks (fairport/distributed.py); fixed from then on
        run_batches    per batch, on each rank: the original once (batch.py), then each check's `measure`
                       (checks/); every finished batch kept in OUT/shards; rank 0 gathers them all
        report         rank 0: each check's `report`, in CHECKS order (checks/__init__.py)

The per-batch results are the same whatever the number of processes, so a run under torchrun gives the
single-process report.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fairport.distributed import LAUNCHED, PeerLost, Ranks, restart_count
from fairport.errors import FairportError
from fairport.options import report_dir
from fairport.reference.folder import ModelFolder
from fairport.util import first_line, peak_rss_mb
from fairport.validation.original.protocol import Generate, Memory, Original
from fairport.validation.verify.batch import OriginalBatch, Record, measure_original, revive
from fairport.validation.verify.checks import CHECKS, MEASURED
from fairport.validation.verify.explain import on_device
from fairport.validation.verify.report import Report, check_report_dir
from fairport.validation.verify.setup import Setup, VerifyOptions, open_setup
from fairport.validation.verify.shards import Shards

__all__ = ["VerifyOptions", "VerifyRun", "verify"]
FAULT = "FAIRPORT_TEST_FAULT"  # tests: "RANK:BATCH" raises on that batch, "RANK:BATCH:exit" ends the process


@dataclass
class VerifyRun:
    """A run: its fixed setup, the original (started on first use), the gathered records, the report."""

    setup: Setup
    report: Report = field(default_factory=Report)
    original: Original | None = None
    results: dict[int, Record] = field(default_factory=dict)  # batch -> its record (rank 0: every batch)
    rank_memory: list = field(default_factory=list)  # each rank's peak RSS (MB): its fairseq worker, itself
    delta: float = 0.0  # the largest fp32 |logit difference|, reference vs original (the logits check sets it)
    traces: dict = field(default_factory=dict)  # (batch, setting) -> both searches traced there (explanations)

    def fairseq(self) -> Original:
        """The original, started on first use (a rank whose batches were all resumed may never need it)."""
        if self.original is None:
            s = self.setup
            self.original = Original(list(s.checkpoints), s.src_dir, s.device, s.overrides)
        return self.original

    def close(self) -> None:
        if self.original is not None:
            self.original.close()

    def records(self) -> list[Record]:
        """Every batch's record in batch order (rank 0, after the gather)."""
        return [self.results[b] for b in sorted(self.results)]

    def results_of(self, check: str) -> list:
        """One check's result on every batch, in batch order (batches where it measured nothing left out)."""
        return [r.checks[check] for r in self.records() if r.checks.get(check) is not None]

    def per_input(self, per_batch: list[list]) -> list:
        """Per-batch lists (one for every record, in batch order; one entry per input of its batch) as one list in
        input order."""
        out: list = [None] * len(self.setup.inputs.src)
        for rec, values in zip(self.records(), per_batch):
            for i, v in zip(rec.inputs, values):
                out[i] = v
        return out

    def outputs(self, side: str, key: str) -> list:
        """One side's top hypotheses in setting `key`, in input order: "original", "reference" (the port) or
        an engine ("transformers", "ctranslate2")."""
        if side == "original":
            return self.per_input([r.original.outputs.top[key] for r in self.records()])
        check = "generation" if side == "reference" else side
        return self.per_input([r.checks[check].top[key] for r in self.records()])


def verify(src: str | Path, dst: str | Path, opts: VerifyOptions, ranks: Ranks | None = None,
           original=None) -> Report | None:
    """The report on rank 0 (None on the other ranks). Raises FairportError for bad inputs and failed ranks.
    `original`: what answers the original's requests instead of fairseq's worker (tests' FakeOriginal)."""
    ranks = ranks or Ranks.from_env()
    opts.check()
    check_report_dir(report_dir(dst, opts.out))
    device = ranks.start(opts.device)
    report = Report()
    run = VerifyRun(open_setup(Path(src), ModelFolder.open(dst), opts, ranks, device, report), report, original)
    try:
        run_batches(run)
        if ranks.main:
            for check in CHECKS:
                check.report(run)
        ranks.barrier()  # every rank's batches are in the report (report.write removes the shards once it is written)
        return run.report if ranks.main else None
    finally:
        run.close()


def measure(run: VerifyRun, b: int) -> dict:
    """Batch b: the original once, then every check's measurement; plain data, as the shards keep it."""
    batch = measure_original(run, b)
    checks = {c.NAME: c.measure(run, batch) for c in MEASURED}
    return {"inputs": batch.inputs, "original": asdict(batch.original),
            "checks": {name: None if r is None else asdict(r) for name, r in checks.items()}}


def record_of(data: dict) -> Record:
    """A batch's record typed again from what `measure` gave (or a shard kept)."""
    types = {c.NAME: c.Result for c in MEASURED}
    return Record(data["inputs"], revive(OriginalBatch, data["original"]),
                  {name: None if r is None else revive(types[name], r) for name, r in data["checks"].items()})


def shards_of(run: VerifyRun) -> Shards:
    """Where finished batches are kept, under a key of everything that decides their results."""
    s = run.setup
    return Shards(s.out / "shards", Shards.key_of(
        s.inputs.src, s.inputs.refs, s.settings, s.opts.dtypes, s.opts.batch_size, s.device,
        [str(p) for p in s.checkpoints], [p.stat().st_size for p in s.checkpoints], s.folder.provenance, s.forced,
        s.overrides, str(s.ct2.folder) if s.ct2 else None))


def run_batches(run: VerifyRun) -> None:
    """Every batch of this rank (kept in OUT/shards as it finishes); rank 0 then holds them all."""
    s = run.setup
    shards = shards_of(run)
    restarts = restart_count()  # a run torchrun restarted (--max-restarts) resumes from its kept batches by itself
    resume = s.opts.resume or restarts > 0
    if s.ranks.main:  # an earlier report stays until this run's is complete (report.write)
        shards.prepare(resume)
    s.ranks.barrier()
    todo = [b for b in s.mine if not (resume and shards.path(b).exists())]
    if len(todo) < len(s.mine) and s.opts.progress:  # every rank says what it kept
        how = f"torchrun restart {restarts}" if restarts and not s.opts.resume else "--resume"
        who = f"rank {s.ranks.rank}: " if s.ranks.world > 1 else ""
        print(f"[verify] {who}{how}: {len(s.mine) - len(todo)} finished batches kept", flush=True)
    with _stopped_by_torchrun(run, shards):
        failure = _run_my_batches(run, shards, todo)
        s.ranks.check(failure)
        mine = {b: shards.load(b) for b in s.mine}
        mine["memory"] = {"original": run.original(Memory()) if run.original else None, "verify": peak_rss_mb()}
        gathered = s.ranks.gather(mine)
    if s.ranks.main:
        run.rank_memory = [g.pop("memory") for g in gathered]
        run.results = {b: record_of(data) for g in gathered for b, data in g.items()}


def _run_my_batches(run: VerifyRun, shards: Shards, todo: list[int]) -> dict | None:
    """This rank's batches in turn; the first failure (rank, batch, error) stops them and is returned."""
    s = run.setup
    if todo:
        warm_up(run, todo[0])
    for n, b in enumerate(todo):
        shards.progress(s.ranks.rank, b, s.batches[b])
        try:
            _fault(run, b)
            shards.save(b, measure(run, b))
        except Exception as e:
            shards.progress(s.ranks.rank, None)
            return {"rank": s.ranks.rank, "batch": b, "inputs": s.batches[b], "error": first_line(e),
                    "hint": f"the batches finished before are kept in {shards.folder}: rerun with --resume"}
        s.say(f"batch {n + 1}/{len(todo)} done" if s.ranks.world == 1 else f"rank 0: batch {n + 1}/{len(todo)} done")
    shards.progress(s.ranks.rank, None)
    return None


def warm_up(run: VerifyRun, b: int) -> None:
    """One untimed generation on each side before anything is timed."""
    s = run.setup
    src = s.src_batch(b)[:1]
    run.fairseq()(Generate(src, s.settings["beam"], prefix=s.prefix(1), force_bos=s.framing.bart))
    s.port.generate(src.to(s.device), prefix_tokens=on_device(s.prefix(1), s.device), **s.settings["beam"])


@contextlib.contextmanager
def _stopped_by_torchrun(run: VerifyRun, shards: Shards):
    """Under plain torchrun, when a rank dies, the others are stopped (SIGTERM) or see their collectives fail:
    rank 0 then ends with one line naming the rank that died and its batch (its progress file, its process
    gone), not a traceback. Best effort (docs/distributed.md): torchrun may stop rank 0 before it can say it,
    and torchrun's own summary is then the only word. (The --nproc launcher names a dead rank itself, always.)"""
    ranks = run.setup.ranks
    if ranks.world == 1 or os.environ.get(LAUNCHED) or not ranks.main:
        yield
        return

    def why() -> str:
        dead = shards.dead_ranks() or "a rank ended early (torchrun's summary below names it)"
        return f"{dead}; the batches finished before are kept in {shards.folder}: rerun with --resume"

    def stopped(signum, frame):
        raise FairportError(f"torchrun stopped the run: {why()}")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    except (RuntimeError, PeerLost) as e:  # a collective failed because a peer is gone
        raise FairportError(f"{why()} ({first_line(e)[:120]})") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fault(run: VerifyRun, b: int) -> None:
    """Tests' fault injection (FAIRPORT_TEST_FAULT="RANK:BATCH[:exit]"), on a run's first attempt only (a run
    torchrun restarts goes through)."""
    spec = os.environ.get(FAULT, "").split(":")
    if len(spec) >= 2 and int(spec[0]) == run.setup.ranks.rank and int(spec[1]) == b and restart_count() == 0:
        if spec[2:] == ["exit"]:
            os._exit(3)
        raise RuntimeError(f"injected fault ({FAULT})")
