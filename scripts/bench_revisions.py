"""Time the reference model of two fairport checkouts on the same checkpoints, alternating processes (this is
how a refactor shows that `fairport bench` numbers did not regress). Each checkout converts the checkpoint
with its own code; every process loads its folder, warms up for a second, and times 3 runs per config
(batch 1/8 x greedy/beam 5, 32-token random sources, 40 forced steps). Prints a markdown table.

    git worktree add /tmp/before REV
    python scripts/bench_revisions.py /tmp/before . CHECKPOINT_DIR:THREADS [CHECKPOINT_DIR:THREADS ...]
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [[1, 1], [1, 5], [8, 1], [8, 5]]
CHILD = """
import json, sys, time, torch
folder, threads, configs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(threads)
from fairport.reference import load
model, g, out = load(folder, dtype="float32"), torch.Generator().manual_seed(0), {}
with torch.inference_mode():
    for batch, beam in configs:
        src = torch.randint(4, 900, (batch, 32), generator=g)
        src[:, -1] = 2
        opts = dict(beam=beam, min_len=40, max_len_a=0, max_len_b=40)
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            model.generate(src, **opts)
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            hyps = model.generate(src, **opts)
            best = min(best, time.perf_counter() - t)
        out[f"b{batch}/beam{beam}"] = [best / 41 * 1000, [h[0]["tokens"].tolist() for h in hyps]]
print(json.dumps(out))
"""


def run(checkout: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), MKL_CBWR="AUTO,STRICT", THP_MEM_ALLOC_ENABLE="1")
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return p.stdout


def main(before: Path, after: Path, targets: list[str], rounds: int = 2) -> None:
    work = Path(tempfile.mkdtemp(prefix="fairport-revisions-"))
    results: dict = {}
    for i, target in enumerate(targets):
        checkpoint = target.rsplit(":", 1)[0]
        for side, checkout in (("before", before), ("after", after)):
            run(checkout, "-m", "fairport", "convert", checkpoint, str(work / f"{side}-{i}"))
    for r in range(rounds):
        for i, target in enumerate(targets):
            threads = target.rsplit(":", 1)[1]
            for side, checkout in ((("before", before), ("after", after)) if r % 2 == 0 else
                                   (("after", after), ("before", before))):
                out = json.loads(run(checkout, "-c", CHILD, str(work / f"{side}-{i}"), threads,
                                     json.dumps(CONFIGS)).splitlines()[-1])
                for key, (ms, tokens) in out.items():
                    entry = results.setdefault((target, key), {}).setdefault(side, {"ms": [], "tokens": tokens})
                    entry["ms"].append(ms)
    print("| checkpoint:threads | config | before ms/step | after ms/step | after/before | same tokens |")
    print("|---|---|---|---|---|---|")
    for (target, key), sides in results.items():
        b, a = min(sides["before"]["ms"]), min(sides["after"]["ms"])
        same = sides["before"]["tokens"] == sides["after"]["tokens"]
        print(f"| {Path(target).name} | {key} | {b:.2f} | {a:.2f} | {a / b:.2f} | {same} |")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
