"""Write a verify report: report.json (schema fairport.verify/1), report.md, and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fairport.validation.verify import SCHEMA, Report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
    return str(v)


def write(report: Report, out: Path, src: str, dst: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    doc = {"schema": SCHEMA, "passed": report.passed, "source": str(src), "port": str(dst),
           "checks": [asdict(c) for c in report.checks], "plots": plots, **report.sections}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    (out / "report.md").write_text(_markdown(doc))
    return doc


def _markdown(doc: dict) -> str:
    L = [f"# fairport verify: {'PASS' if doc['passed'] else 'FAIL'}", "",
         f"Original `{doc['source']}` against the port `{doc['port']}`; inputs: {doc['inputs']['origin']} "
         f"({doc['inputs']['count']}).", "", "## Checks", "", "| check | result | value | threshold | detail |",
         "|---|---|---|---|---|"]
    for c in doc["checks"]:
        L.append(f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {_fmt(c['value'])} | "
                 f"{_fmt(c['threshold'])} | {c['detail']} |")
    L += ["", "## Logits (teacher-forced, fp32)", "", "| side | max abs Δ | mean abs Δ | positions |", "|---|---|---|---|"]
    for side, v in doc["logits"].items():
        L.append(f"| {side} | {_fmt(v['max_abs'])} | {_fmt(v['mean_abs'])} | {v['positions']} |")
    nll = doc["nll"]
    L += ["", f"## Teacher-forced NLL (on {nll['target']})", "", "| side | NLL/token | perplexity | tokens |",
          "|---|---|---|---|"]
    for side, v in nll.items():
        if isinstance(v, dict):
            L.append(f"| {side} | {v['nll']:.6f} | {v['ppl']:.4f} | {v['tokens']} |")
    layers = doc["layers"]
    L += ["", "## Where the port diverges", "",
          f"First module whose output differs beyond tolerance: **{layers['first_divergent'] or 'none'}**.", ""]
    if "layers" in doc.get("plots", {}):
        L += [f"![per-layer divergence]({doc['plots']['layers']})", ""]
    L += ["| module | max abs Δ | tolerance | ok |", "|---|---|---|---|"]
    L += [f"| {r['module']} | {_fmt(r['max_abs'])} | {_fmt(r['tolerance'])} | {'yes' if r['ok'] else 'NO'} |"
          for r in layers["curve"]]
    L += ["", "## Generation", "", "| setting | options | exact match | max score Δ | mismatches |", "|---|---|---|---|---|"]
    for k, g in doc["generation"].items():
        L.append(f"| {k} | {g['options']} | {g['exact_match']:.2%} | {_fmt(g['max_score_abs'])} | {len(g['mismatches'])} |")
    for k, g in doc["generation"].items():
        for m in g["mismatches"][:20]:
            L += [f"- {k}, input {m['input']}: original `{m['original']}` / port `{m['port']}`"]
    if "quality" in doc:
        L += ["", "## Quality", "", "```", json.dumps(doc["quality"], indent=1), "```"]
    if "tokenizer" in doc:
        t = doc["tokenizer"]
        L += ["", f"## Tokenizer", "", f"{len(t['mismatches'])} of {t['sentences']} sentences encode differently."]
    L += ["", "## Precision matrix (port in each dtype vs the fp32 original)", "",
          "| dtype | logits max abs Δ | tolerance | beam exact match | top score mean abs Δ | BLEU | BLEU Δ |",
          "|---|---|---|---|---|---|---|"]
    for p in doc["precision"]:
        L.append(f"| {p['dtype']} | {_fmt(p['logits_max_abs'])} | {_fmt(p['tolerance'])} | "
                 f"{p['beam_exact_match']:.1%} | {_fmt(p.get('score_mean_abs_delta', '-'))} | "
                 f"{_fmt(p.get('bleu', '-'))} | {_fmt(p.get('bleu_delta_vs_original', '-'))} |")
    sp = doc["speed"]
    L += ["", "## Speed and memory (same inputs, this run)", ""]
    if "speed" in doc.get("plots", {}):
        L += [f"![speed]({doc['plots']['speed']})", ""]
    L += ["| setting | side | seconds | sentences/s | tokens/s |", "|---|---|---|---|---|"]
    for k, v in sp.items():
        if isinstance(v, dict) and "original" in v and "reference" in v and isinstance(v["original"], dict):
            for side in ("original", "reference"):
                L.append(f"| {k} | {side} | {v[side]['seconds']:.3f} | {v[side]['sentences_per_s']:.1f} | "
                         f"{v[side]['tokens_per_s']:.1f} |")
    L += ["", f"Peak RSS: {json.dumps(sp.get('peak_rss_mb'))} MB.", ""]
    env = doc["environment"]
    L += ["## Environment", "", f"- versions: {env['versions']}", f"- device: {env['device']}, threads "
          f"{env['threads']}, seed {env['seed']}", f"- source sha256: {env['source_sha256']}", ""]
    L += ["## Known deviations of the installed fairseq", ""] + [f"- {d}" for d in env["known_deviations"]]
    for note in doc.get("notes", []):
        L.append(f"- note: {note}")
    return "\n".join(L) + "\n"


def _plots(report: Report, out: Path) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots = {}
    curve = report.sections.get("layers", {}).get("curve", [])
    if curve:
        fig, ax = plt.subplots(figsize=(max(6, len(curve) * 0.5), 3.5))
        xs = range(len(curve))
        ax.semilogy(xs, [max(r["max_abs"], 1e-12) for r in curve], marker="o", label="max |Δ|")
        ax.semilogy(xs, [r["tolerance"] for r in curve], ls="--", label="tolerance")
        ax.set_xticks(list(xs), [r["module"] for r in curve], rotation=60, ha="right", fontsize=7)
        ax.set_title("port vs original, per module (first batch)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "layers.png", dpi=110)
        plt.close(fig)
        plots["layers"] = "layers.png"
    speed = {k: v for k, v in report.sections.get("speed", {}).items() if isinstance(v, dict) and "reference" in v
             and isinstance(v.get("original"), dict)}
    if speed:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        keys = list(speed)
        w = 0.38
        ax.bar([i - w / 2 for i in range(len(keys))], [speed[k]["original"]["sentences_per_s"] for k in keys], w,
               label="fairseq original")
        ax.bar([i + w / 2 for i in range(len(keys))], [speed[k]["reference"]["sentences_per_s"] for k in keys], w,
               label="fairport reference")
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylabel("sentences / s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=110)
        plt.close(fig)
        plots["speed"] = "speed.png"
    return plots
