"""A verify report: checks and measured sections, written as report.json (schema fairport.verify/2),
report.md (for people: rounded numbers, tables) and PNG plots. docs/verify.md describes the schema."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "fairport.verify/2"
FILES = ("report.json", "report.md", "layers.png", "speed.png")  # what `write` puts in the report folder


@dataclass
class Check:
    name: str
    passed: bool
    value: object
    threshold: object
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    sections: dict = field(default_factory=dict)

    def add(self, name, passed, value, threshold, detail="") -> None:
        self.checks.append(Check(name, bool(passed), value, threshold, detail))

    def note(self, text: str) -> None:
        self.sections.setdefault("notes", []).append(text)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def num(v, digits: int = 3) -> str:
    """A number for people: 3 significant digits (1.23e-05, 0.0123, 12.3, 1.23e+04)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    if isinstance(v, int) or v == 0:
        return str(v)
    return f"{v:.{digits}g}"


def write(report: Report, out: Path, source: str, port: str) -> dict:
    """Write the report into `out`. `source`/`port` are shown by name only: a report may be published (the
    model card cites it), so it carries no local paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    doc = {"schema": SCHEMA, "passed": report.passed, "source": Path(source).name, "port": Path(port).name,
           "checks": [asdict(c) for c in report.checks], "plots": plots, **report.sections}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    (out / "report.md").write_text(markdown(doc))
    return doc


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(num(x) if not isinstance(x, str) else x for x in r) + " |" for r in rows]


def markdown(doc: dict) -> str:
    L = [f"# fairport verify: {'PASS' if doc['passed'] else 'FAIL'}", "",
         f"The fairseq original `{doc['source']}` against the port `{doc['port']}` on {doc['inputs']['origin']} "
         f"({doc['inputs']['count']} inputs).", "", "## Checks", ""]
    L += table(["check", "result", "value", "threshold", "detail"],
               [[c["name"], "pass" if c["passed"] else "**FAIL**", c["value"], c["threshold"], c["detail"]]
                for c in doc["checks"]])
    L += ["", "## Logits (teacher-forced, fp32)", ""]
    L += table(["side", "max abs Δ", "mean abs Δ", "logit values compared"],
               [[side, v["max_abs"], v["mean_abs"], v["values"]] for side, v in doc["logits"].items()])
    nll = doc["nll"]
    L += ["", f"## Teacher-forced NLL (on {nll['target']})", ""]
    L += table(["side", "NLL per token", "perplexity", "tokens"],
               [[side, v["nll"], v["ppl"], v["tokens"]] for side, v in nll.items() if isinstance(v, dict)])
    layers = doc["layers"]
    L += ["", "## Where the port diverges", "",
          f"First module whose output differs beyond tolerance: **{layers['first_divergent'] or 'none'}** "
          f"(first batch, {layers['batch_inputs']} inputs).", ""]
    if "layers" in doc.get("plots", {}):
        L += [f"![per-layer divergence]({doc['plots']['layers']})", ""]
    L += table(["module", "max abs Δ", "tolerance", "ok"],
               [[r["module"], r["max_abs"], r["tolerance"], "yes" if r["ok"] else "NO"] for r in layers["curve"]])
    L += ["", "## Generation", ""]
    L += table(["setting", "options", "exact match", "max score Δ (matches)", "near-ties", "batch-dependent",
                "divergences"],
               [[k, ", ".join(f"{o}={v}" for o, v in g["options"].items() if v is not None), f"{g['exact_match']:.1%}",
                 g["max_score_abs"], g["counts"]["near-tie"], g["counts"]["batch-dependent original"],
                 g["counts"]["divergence"]] for k, g in doc["generation"].items()])
    L += ["", "Every top-hypothesis mismatch is explained or fails (docs/verify.md, \"Reading a mismatch\"):"]
    for k, g in doc["generation"].items():
        for m in g["mismatches"][:20]:
            L += ["", f"- **{k}, input {m['input']}: {m['class']}.** {m['explanation']}",
                  f"  - original: `{m['original']}`", f"  - port: `{m['port']}`"]
    if "quality" in doc:
        q = doc["quality"]
        L += ["", "## Quality", ""]
        rows = [[metric, q[metric]["original"], q[metric]["reference"]] for metric in ("bleu", "rougeL") if metric in q]
        L += table(["metric (against the references)", "original", "port"], rows) if rows else []
        L += ["", f"BLEU of the port's outputs against the original's: {num(q.get('bleu_between_sides'))}."]
    if "tokenizer" in doc:
        t = doc["tokenizer"]
        L += ["", "## Tokenizer", "", f"{len(t['mismatches'])} of {t['sentences']} sentences encode differently."]
    L += ["", "## Precision matrix (the port in each dtype against the fp32 original)", ""]
    L += table(["dtype", "logits max abs Δ", "tolerance", "beam exact match", "top score mean abs Δ", "BLEU",
                "BLEU Δ"],
               [[p["dtype"], p["logits_max_abs"], p["tolerance"], f"{p['beam_exact_match']:.1%}",
                 p.get("score_mean_abs_delta"), p.get("bleu"), p.get("bleu_delta_vs_original")]
                for p in doc["precision"]])
    sp = doc["speed"]
    L += ["", "## Speed and memory (same inputs, this run)", ""]
    if "speed" in doc.get("plots", {}):
        L += [f"![speed]({doc['plots']['speed']})", ""]
    rows = []
    for k in ("greedy", "beam"):
        if k in sp:
            rows += [[k, side, sp[k][side]["seconds"], sp[k][side]["sentences_per_s"], sp[k][side]["tokens_per_s"]]
                     for side in ("original", "reference")]
    L += table(["setting", "side", "seconds", "sentences/s", "tokens/s"], rows)
    if len(sp.get("per_rank", [])) > 1:
        L += ["", f"{len(sp['per_rank'])} processes:", ""]
        L += table(["rank", "inputs", "original seconds", "port seconds"],
                   [[r["rank"], r["inputs"], r["original_seconds"], r["reference_seconds"]] for r in sp["per_rank"]])
    mem = sp.get("peak_rss_mb", {})
    L += ["", "Peak resident memory (each process's own VmHWM): " +
          ", ".join(f"{side} {num(v)} MB" for side, v in mem.items()) + "."]
    env = doc["environment"]
    L += ["", "## Environment", ""]
    L += table(["", ""], [["versions", ", ".join(f"{k} {v}" for k, v in env["versions"].items())],
                          ["device", f"{env['device']} ({env['processor'] or env['machine']}, {env['threads']} "
                                     f"threads, {env['processes']} process(es))"],
                          ["seed", str(env["seed"])]] +
               [[f"sha256 {name}", digest] for name, digest in env["source_sha256"].items()])
    L += ["", "## Known deviations of the installed fairseq", ""] + [f"- {d}" for d in env["known_deviations"]]
    notes = doc.get("notes", [])
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
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
        plots["layers"] = _save(plt, fig, out / "layers.png")
    speed = {k: v for k, v in report.sections.get("speed", {}).items() if k in ("greedy", "beam")}
    if speed:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        keys = list(speed)
        w = 0.38
        for offset, side, label in ((-w / 2, "original", "fairseq original"), (w / 2, "reference", "fairport port")):
            ax.bar([i + offset for i in range(len(keys))], [speed[k][side]["sentences_per_s"] for k in keys], w,
                   label=label)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylabel("sentences / s")
        ax.legend()
        plots["speed"] = _save(plt, fig, out / "speed.png")
    return plots


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def print_summary(report: Report, out: Path) -> int:
    """What `fairport verify` prints: every check, the failing ones last; the exit code (0: PASS)."""
    print(f"report: {out / 'report.md'} (and report.json)")
    for c in report.checks:
        if c.passed:
            print(f"  pass  {c.name}")
    for c in report.failed:
        print(f"  FAIL  {c.name}: {num(c.value)} (threshold {num(c.threshold)}) {c.detail}")
    print("verify: PASS" if report.passed else f"verify: FAIL ({len(report.failed)} checks failed)")
    return 0 if report.passed else 1
