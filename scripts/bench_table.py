"""Markdown speed tables from `fairport bench --out FILE.json` results (the README's and docs/benchmarks.md's).

    python scripts/bench_table.py bench-tiny.json bench-bart-base.json bench-wmt19-en-de.json
"""
import json
import sys
from pathlib import Path

# (column title, dtype, side); each cell is ms per decoder step at the side's fastest thread count
COLUMNS = [("fairseq fp32", "float32", "fairseq"), ("transformers fp32", "float32", "transformers"),
           ("fairport fp32", "float32", "reference"), ("fairport compiled fp32", "float32", "reference-compiled"),
           ("CTranslate2 fp32", "float32", "ctranslate2"),
           ("fairport int8", "int8", "reference"), ("CTranslate2 int8", "int8", "ctranslate2")]


def cell(run: dict | None, side: str) -> str:
    r = (run or {}).get("sides", {}).get(side)
    if not r or "ms_per_step" not in r:
        return "—"
    return f"{r['ms_per_step']:.2f} ({r['threads']}t)"


def table(result: dict) -> str:
    runs = {r["key"]: r for r in result["runs"]}
    configs = sorted({(r["batch"], r["beam"]) for r in result["runs"]})
    columns = [c for c in COLUMNS if any(c[2] in r["sides"] and r["dtype"] == c[1] for r in result["runs"])]
    lines = ["| batch, beam | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for batch, beam in configs:
        cells = [cell(runs.get(f"{dtype}/b{batch}/beam{beam}"), side) for _, dtype, side in columns]
        lines.append(f"| {batch}, {'greedy' if beam == 1 else f'beam {beam}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory(result: dict) -> str:
    rows = ["| side | precision | peak RSS MB | load s |", "|---|---|---|---|"]
    seen = set()
    for r in result["runs"]:
        for side, s in r["sides"].items():
            key = (side, r["dtype"] if side in ("reference", "ctranslate2") else "float32")  # the others: fp32
            if key in seen or "peak_rss_mb" not in s:
                continue
            seen.add(key)
            rows.append(f"| {side} | {key[1]} | {s['peak_rss_mb']:.0f} | {s.get('load_seconds', float('nan')):.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        result = json.loads(Path(path).read_text())
        print(f"### {result['target']}\n\n{table(result)}\n\n{memory(result)}\n")
