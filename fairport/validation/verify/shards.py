"""Finished batches of a verify run, kept on disk (OUT/shards) so that nothing computed is lost when a rank
fails: `--resume` loads them and redoes only the missing ones.

    OUT/shards/manifest.json          what the run is (a hash of its inputs, options, checkpoint and folder)
    OUT/shards/batch-00012.pt         one batch's results (both sides), written when the batch finished
    OUT/shards/progress-rank-1.json   the batch each rank is on, for the error that names a dead rank's batch
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from fairport.errors import FairportError


class Shards:
    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key

    @staticmethod
    def key_of(*parts) -> str:
        """A hash of what the run is: inputs, options, the checkpoint and the folder, as JSON."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def prepare(self, resume: bool) -> None:
        """Rank 0, before the work starts. Without --resume: start afresh (an earlier run's shards go). With
        --resume: keep them if they are this run's; refuse if they are another's."""
        manifest = self.folder / "manifest.json"
        if resume and manifest.exists():
            recorded = json.loads(manifest.read_text()).get("key")
            if recorded != self.key:
                raise FairportError(f"--resume: the shards in {self.folder} were made with other inputs, options, "
                                    f"checkpoint or folder; run without --resume to start again")
            return
        if self.folder.exists():
            if not manifest.exists():
                raise FairportError(f"{self.folder} exists but holds no verify shards; move it away")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        manifest.write_text(json.dumps({"key": self.key}))

    def path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:05d}.pt"

    def load(self, batch: int) -> dict | None:
        p = self.path(batch)
        return torch.load(p, weights_only=True) if p.exists() else None

    def save(self, batch: int, result: dict) -> None:
        tmp = self.path(batch).with_suffix(".tmp")
        torch.save(result, tmp)
        tmp.rename(self.path(batch))  # a batch file is complete, or absent

    def progress(self, rank: int, batch: int | None, inputs: list[int] | None = None) -> None:
        (self.folder / f"progress-rank-{rank}.json").write_text(json.dumps(
            {"batch": batch, "inputs": inputs, "pid": os.getpid(), "host": socket.gethostname()}))

    def dead_ranks(self) -> str | None:
        """Ranks on this machine whose process is gone while their progress file says they were on a batch: "rank 1
        died on batch 7 (inputs [...])", for the error rank 0 gives when torchrun stops the run; None if none."""
        dead = []
        for p in sorted(self.folder.glob("progress-rank-*.json")):
            try:
                info = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if info.get("batch") is None or info.get("host") != socket.gethostname():
                continue
            if not _alive(info.get("pid")):
                dead.append(f"rank {p.stem.rsplit('-', 1)[1]} died on batch {info['batch']} (inputs {info['inputs']})")
        return "; ".join(dead) or None


def _alive(pid) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by torchrun's agent, does not)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def progress_of(folder: Path, rank: int) -> str:
    """For the --nproc launcher: what rank `rank` was doing when it died, from the progress file it kept in the
    shards folder `folder`."""
    p = Path(folder) / f"progress-rank-{rank}.json"
    if not p.exists():
        return f"the batches finished before are kept in {folder}: rerun with --resume"
    info = json.loads(p.read_text())
    return (f"it was on batch {info['batch']} (inputs {info['inputs']}); the batches finished before are kept in "
            f"{folder}: rerun with --resume")
