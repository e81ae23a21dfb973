"""Many processes, GPUs and machines with PyTorch's own engine: `torch.distributed`, launched by `torchrun`.

`fairport verify` and `fairport generate` run unchanged under torchrun (`torchrun --nproc-per-node 4 -m fairport
verify ...`); `--nproc N` starts the same thing on this machine through torch.distributed's launcher. The work is
cut into length-sorted batches, identical whatever the number of processes, and each rank takes a deterministic
share (`Ranks.deal`: costliest batches first, each to the least busy rank); rank 0 gathers the per-batch results
with torch.distributed collectives (gloo on the CPU, nccl on CUDA) and writes the one report or output file. One
process (no torchrun) is the default: world size 1.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fairport.errors import FairportError
from fairport.util import first_line

# set by `launch` (the --nproc launcher): rank 0 leaves the final error line to it
LAUNCHED = "FAIRPORT_LAUNCHED"
ERROR_DIR = "FAIRPORT_ERROR_DIR"
# the exit status of a rank that stopped, quietly, because another rank is gone: the launcher names that one
PEER_LOST = 75


class PeerLost(FairportError):
    """A collective failed because another rank is gone (it died, or was stopped)."""


def _collective(run, *args, **kwargs):
    try:
        return run(*args, **kwargs)
    except RuntimeError as e:  # gloo/nccl: the connection to a peer closed
        raise PeerLost(f"another rank is gone ({first_line(e)[:120]})") from None


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK (none: one process)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: str) -> str:
        """Join the process group (gloo on the CPU, nccl on CUDA); returns this rank's device (cuda:LOCAL_RANK
        for cuda)."""
        if device.startswith("cuda") and self.world > 1:
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            timeout = datetime.timedelta(hours=6)
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world, timeout=timeout))
            # torchrun --max-restarts keeps its store across attempts: keys of an earlier attempt (a dead rank's
            # address among them) must not be read by this one
            store = dist.PrefixStore(f"fairport-attempt-{restart_count()}/", store)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world, timeout=timeout)
        return device

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def deal(self, costs: list[float]) -> list[int]:
        """The indices of the work items (batches) this rank takes, given each item's cost (its tokens): the
        costliest first, each to the rank with the least work so far (ties: the lowest rank), so that the ranks
        finish together. Deterministic: the same for every run with the same inputs and world size."""
        load = [0.0] * self.world
        mine = []
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            load[r] += costs[i]
            if r == self.rank:
                mine.append(i)
        return sorted(mine)

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        _collective(dist.all_gather_object, out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out: list | None = [None] * self.world if self.main else None
        _collective(dist.gather_object, obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            _collective(dist.barrier)

    def check(self, failure: dict | None) -> None:
        """Every rank says whether its share failed; if one did, every rank raises the same one-line error
        naming the first failing rank and its batch."""
        failures = [f for f in self.all_gather(failure) if f]
        if failures:
            f = failures[0]
            raise FairportError(f"rank {f['rank']} failed on batch {f['batch']} (inputs {f['inputs']}): {f['error']}"
                                + (f"; {f['hint']}" if f.get("hint") else ""))


def restart_count() -> int:
    """How many times torchrun restarted this run's workers (`--max-restarts`; 0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def report_error(ranks: Ranks, message: str) -> bool:
    """Whether this process prints the final error line (rank 0, unless the --nproc launcher does); under the
    launcher every rank leaves its message for it in a file."""
    folder = os.environ.get(ERROR_DIR)
    if folder:
        with open(os.path.join(folder, f"rank-{ranks.rank}.txt"), "w") as f:
            f.write(message)
    return ranks.main and not os.environ.get(LAUNCHED)


def launch(nproc: int, argv: list[str], describe_death=None) -> int:
    """`--nproc N`: run `fairport ARGV` in N processes on this machine through torch.distributed's launcher
    (what torchrun runs), as `torchrun --standalone --nproc-per-node N -m fairport ARGV` would. Prints one
    error line if a rank fails or dies; `describe_death(rank)` says what a rank that died was doing (the verb
    knows: verify's progress files), if given."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # our one line says what failed
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="fairport-ranks-") as errors:
        env = {LAUNCHED: "1", ERROR_DIR: errors, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        os.environ.update(env)
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", run_id=f"fairport-{os.getpid()}", max_restarts=0,
                              monitor_interval=0.5)
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "fairport", *argv)
            return 0
        except ChildFailedError as e:
            messages = {}
            for name in sorted(os.listdir(errors)):
                with open(os.path.join(errors, name)) as f:
                    messages[int(name[5:-4])] = f.read().strip()
            if messages:
                print(f"fairport: error: {messages[min(messages)]}", file=sys.stderr)
            else:  # a rank died; the others stopped when they lost it, or the launcher stopped them: name it
                stopped = (PEER_LOST, -signal.SIGTERM)
                died = {r: f for r, f in e.failures.items() if f.exitcode not in stopped} or e.failures
                rank = min(died, key=lambda r: (died[r].timestamp, r))
                failure = died[rank]
                print(f"fairport: error: rank {rank} died (exit code {failure.exitcode}) before saying why; "
                      f"{(describe_death and describe_death(rank)) or 'no progress was recorded'}", file=sys.stderr)
            return 1
        except Exception as e:  # the launcher itself failed (rendezvous, ports)
            print(f"fairport: error: could not start {nproc} processes: {first_line(e)}", file=sys.stderr)
            return 1
        finally:
            for k in env:
                os.environ.pop(k, None)
