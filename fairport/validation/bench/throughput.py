"""The reference generating a corpus on N processes of this machine (torch.distributed), the cores shared out:
sentences per second of the whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.reference.batching import pad_batch

THROUGHPUT_SENTENCES = 64


def throughput(folder: Path, nproc: int, dtype: str, batch: int, beam: int, steps: int, src_len: int,
               device: str, gen: dict) -> dict:
    """The reference generating a corpus (THROUGHPUT_SENTENCES random sources, every hypothesis `steps` long)
    on `nproc` processes of this machine through torch.distributed, the cores shared out (cores // nproc
    threads each): sentences per second of the whole, from the first rank's start to the last rank's end."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    with tempfile.TemporaryDirectory(prefix="fairport-throughput-") as tmp:
        job = {"folder": str(folder), "dtype": dtype, "batch": batch, "beam": beam, "steps": steps,
               "src_len": src_len, "device": device, "gen": gen, "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(nproc), "-m", "fairport.validation.bench", "--throughput-worker",
                               str(Path(tmp) / "job.json")],
                              capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            raise FairportError(f"throughput with {nproc} processes failed:\n" + proc.stderr[-1500:])
        out = json.loads((Path(tmp) / "out.json").read_text())
    return {"processes": nproc, "threads_per_process": threads, "sentences": THROUGHPUT_SENTENCES, "batch": batch,
            "beam": beam, "dtype": dtype, **out}


def throughput_worker(job_path: str) -> None:
    from fairport.distributed import Ranks
    from fairport.reference import load
    from fairport.reference.hub import length_sorted_batches

    job = json.loads(Path(job_path).read_text())
    ranks = Ranks.from_env()
    device = ranks.start(job["device"])
    model = load(job["folder"], device=device, dtype=job["dtype"])
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(2, job["src_len"] // 2), job["src_len"] + 1, (THROUGHPUT_SENTENCES,), generator=g)
    sources = [torch.randint(4, cfg.src_vocab_size, (int(n) - 1,), generator=g).tolist() + [cfg.eos] for n in lengths]
    batches = length_sorted_batches([len(s) for s in sources], job["batch"])
    mine = [batches[b] for b in ranks.deal([sum(len(sources[i]) for i in b) for b in batches])]
    options = {**job["gen"], "beam": job["beam"], "max_len_b": job["steps"], "min_len": job["steps"], "max_len_a": 0}

    def run(idx):
        model.generate(pad_batch([sources[i] for i in idx], cfg.pad, left=True).to(device), **options)

    run(mine[0][:1])  # warm-up
    ranks.barrier()
    t0 = time.perf_counter()
    for idx in mine:
        run(idx)
    seconds = time.perf_counter() - t0
    ranks.barrier()
    wall = time.perf_counter() - t0
    per_rank = ranks.gather({"rank": ranks.rank, "sentences": sum(map(len, mine)), "seconds": seconds})
    if ranks.main:
        Path(job["out"]).write_text(json.dumps({"seconds": wall, "sentences_per_s": THROUGHPUT_SENTENCES / wall,
                                                "per_rank": per_rank}))
    ranks.stop()
