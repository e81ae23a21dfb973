"""bench's results: each configuration's row (every side's timing against fairseq's fp32 baseline and
CTranslate2 in the same precision), the plot, the printed table."""

from __future__ import annotations

import json
from pathlib import Path

from fairport.validation.bench.config import Config


def compare(runs: dict, configs: list[Config]) -> list[dict]:
    """One row per configuration: each side's timing, its speed-up over fairseq's fp32 run of the same batch and
    beam and whether its outputs equal fairseq's, its time over CTranslate2's, its process's memory and load."""
    rows = []
    for c in configs:
        base_key = c.in_dtype("float32").key
        base = runs.get("fairseq", {}).get(base_key)
        row = {"key": c.key, "dtype": c.dtype, "batch": c.batch, "beam": c.beam, "sides": {}}
        for side, res in runs.items():
            r = res.get(c.key if side != "fairseq" else base_key)
            if r is None:
                continue
            entry = {k: v for k, v in r.items() if k != "tokens"}
            if base is not None:
                entry["speedup_vs_fairseq_fp32"] = base["min_s"] / r["min_s"]
                entry["outputs_equal_fairseq"] = r["tokens"] == base["tokens"]
                same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
                entry["exact_match_rate"] = same / len(base["tokens"])
            row["sides"][side] = entry
        peer = runs.get("ctranslate2", {}).get(c.key)  # the engine users pick, same precision
        for side, entry in row["sides"].items():
            if peer is not None and side != "ctranslate2":
                entry["times_ctranslate2"] = entry["min_s"] / peer["min_s"]
        rows.append(row)
    for side, res in runs.items():  # each side's process, per precision: its own peak memory and load time
        for row in rows:
            if side in row["sides"]:
                dtype = "float32" if side == "fairseq" else row["dtype"]
                row["sides"][side]["peak_rss_mb"] = res["peak_rss_mb"].get(dtype)
                row["sides"][side]["load_seconds"] = res["load_seconds"].get(dtype)
    return rows


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result.get("runs", [])
    if not rows:
        return
    sides = sorted({s for r in rows for s in r["sides"]})
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 3.6))
    w = 0.8 / max(len(sides), 1)
    for i, side in enumerate(sides):
        ax.bar([j + i * w for j in range(len(rows))], [r["sides"].get(side, {}).get("ms_per_step", 0) for r in rows],
               w, label=side)
    if result.get("batch1_bound_ms_per_step"):
        ax.axhline(result["batch1_bound_ms_per_step"], ls="--", color="k", lw=1,
                   label="fp32 floor, batch 1 (step weights at memory bandwidth)")
    ax.set_xticks([j + w * (len(sides) - 1) / 2 for j in range(len(rows))], [r["key"] for r in rows], rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel("ms per decoder step")
    ax.set_title(f"fairport bench: {result['target']} ({result['device']}, {result['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_results(result: dict, out: Path) -> None:
    """Write the results (JSON and a plot) and print the table `fairport bench` shows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    if "runs" not in result:
        print(f"{result['device']}: {result['status']}")
        return
    print(f"{result['cpu']}, {result['cores']} cores")
    print(f"{'config':<24}{'side':<20}{'ms/step':>9}{'sent/s':>9}{'tok/s':>9}{'vs fairseq':>11}{'x CT2':>7}"
          f"  same output")
    for row in result["runs"]:
        for side, r in row["sides"].items():
            sp = r.get("speedup_vs_fairseq_fp32")
            same = r.get("outputs_equal_fairseq")
            same = "-" if same is None else "True" if same else f"False ({r['exact_match_rate']:.0%} of sentences)"
            ct2 = r.get("times_ctranslate2")  # this side's time over CTranslate2's (issue 15's targets)
            print(f"{row['key']:<24}{side:<20}{r['ms_per_step']:>9.2f}{r['sentences_per_s']:>9.2f}"
                  f"{r['tokens_per_s']:>9.1f}{(f'{sp:.2f}x' if sp else '-'):>11}{(f'{ct2:.2f}' if ct2 else '-'):>7}"
                  f"  {same}")
    over = {(row["dtype"], side): r["over_batch1_bound"] for row in result["runs"]
            for side, r in row["sides"].items() if "over_batch1_bound" in r}

    def over_text(dtype):
        return ", ".join(f"{side} {x:.2f}x" for (d, side), x in over.items() if d == dtype) or "-"

    if result.get("batch1_bound_ms_per_step"):
        print(f"fp32 floor at batch 1: {result['batch1_bound_ms_per_step']:.2f} ms/step (the step's "
              f"{result['step_weights_mb_fp32']:.0f} MB of weights at {result['roofline']['memory_read_gbps']:.0f} "
              f"GB/s memory read); greedy batch-1 step over it: {over_text('float32')}")
    if result.get("batch1_int8_bound_ms_per_step"):
        print(f"int8 floor at batch 1: {result['batch1_int8_bound_ms_per_step']:.2f} ms/step (its matrices at one "
              f"byte a value); greedy batch-1 step over it: {over_text('int8')}")
    if "conversion" in result:
        c = result["conversion"]
        print(f"conversion: {c['seconds']:.1f}s, peak RSS {c['peak_rss_mb']:.0f} MB = {c['rss_over_file']:.2f}x the "
              f"{c['checkpoint_mb']:.0f} MB checkpoint (plain read+write: {c['plain_read_write_seconds']:.1f}s)")
    for t in result.get("throughput", []):
        print(f"throughput, {t['processes']} process(es) x {t['threads_per_process']} thread(s): "
              f"{t['sentences_per_s']:.2f} sentences/s ({t['sentences']} sentences, batch {t['batch']}, beam "
              f"{t['beam']}, {t['dtype']}; per rank: " + ", ".join(f"{r['sentences']} in {r['seconds']:.1f}s"
                                                                  for r in t["per_rank"]) + ")")
    if "corpus" in result:
        c = result["corpus"]
        print(f"corpus: {c['sentences']} sentences ({c['source']}), beam {c['options']['beam']}, batches of <= "
              f"{c['max_tokens']} source tokens")
        for key, r in c["sides"].items():
            same = r.get("exact_match_vs_fairseq")
            print(f"  {key:<28}{r['sentences_per_s']:>9.2f} sent/s{r['tokens_per_s']:>10.1f} tok/s  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB  load {sum(r['load_seconds'].values()):.2f}s  "
                  f"{r['threads']} thread(s)  same as fairseq: {'-' if same is None else f'{same:.1%}'}")
    print(f"results: {out} (+ {out.with_suffix('.png').name})")
