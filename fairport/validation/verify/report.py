"""A verify report: checks and measured sections, written as report.json (schema fairport.verify/3),
report.md (for people: rounded numbers, tables) and PNG plots. docs/verify.md describes the schema."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fairport.errors import FairportError

SCHEMA = "fairport.verify/3"  # /3: a transformers section, per-engine parity, two more mismatch classes
FILES = ("report.json", "report.md", "layers.png", "speed.png")  # what `write` puts in the report folder
# what else a verify run writes there: resumable batches, CTranslate2's conversion of the source
RUN_FOLDERS = ("shards", "ctranslate2")
TEMPORARY = ".report-new"  # where `write` puts the new report until it is complete


def _ours(folder: Path) -> set[str]:
    """The entries of `folder` that a verify run wrote: a fairport report (report.json of this schema family,
    report.md as `write` starts it) and, beside such a report or resumable shards, its plots and run folders."""
    mine = set()
    try:
        if json.loads((folder / "report.json").read_text()).get("schema", "").startswith("fairport.verify/"):
            mine.add("report.json")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(folder / "report.md", encoding="utf-8") as f:
            if f.readline().startswith("# fairport verify:"):
                mine.add("report.md")
    except (OSError, UnicodeDecodeError):
        pass
    if (folder / "shards" / "manifest.json").is_file():
        mine.add("shards")
    if mine:
        mine |= {n for n in ("layers.png", "speed.png", "ctranslate2", TEMPORARY) if (folder / n).exists()}
    return mine


def check_report_dir(folder: Path) -> None:
    """Before any work: the report folder is new, empty, or holds only what verify wrote there (which a new
    report replaces once it is complete). Anything else is refused by name: nothing of the user's is removed."""
    if not folder.exists():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise FairportError(f"report folder {folder} exists and is not a folder; choose another --out")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _ours(folder))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise FairportError(f"report folder {folder} holds files fairport verify did not write ({shown}); verify "
                            f"replaces only its own report: choose another --out, or move them")


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
    """Write the report into `out` (checked by `check_report_dir`). `source`/`port` are shown by name only: a
    report may be published (the model card cites it), so it carries no local paths. The new files are written
    into a temporary folder first and moved into place once all are there (report.json last): an interrupted
    write leaves the earlier report whole. Then the run's shards, which have served, go."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / TEMPORARY, ignore_errors=True)  # an earlier write that was interrupted
    new = out / TEMPORARY
    new.mkdir()
    plots = _plots(report, new)
    doc = {"schema": SCHEMA, "passed": report.passed, "source": Path(source).name, "port": Path(port).name,
           "checks": [asdict(c) for c in report.checks], "plots": plots, **report.sections}
    (new / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    (new / "report.md").write_text(markdown(doc))
    written = [n for n in FILES if (new / n).exists()]
    for name in sorted(written, key=lambda n: n == "report.json"):
        os.replace(new / name, out / name)
    for name in set(FILES) - set(written):  # an earlier report's plot this one does not have
        (out / name).unlink(missing_ok=True)
    new.rmdir()
    shutil.rmtree(out / "shards", ignore_errors=True)
    return doc


ENGINES = {"reference": "fairport reference", "transformers": "transformers", "ctranslate2": "CTranslate2"}


def engine_of(check: str) -> str:
    """Which engine a check is about, by its name ("transformers generation (beam): ...", "logits: transformers
    vs original ...", "ctranslate2: ..."); every other check is the fairport reference's."""
    for engine in ("transformers", "ctranslate2"):
        if check.startswith(engine) or check.startswith(f"logits: {engine}"):
            return engine
    return "reference"


def engines(doc: dict) -> list[dict]:
    """One row per engine the run checked: its verdict (its own checks), logits |Δ|, exact match and mismatch
    classes per setting, tokenizer ids, speed; what the report and the model card show."""
    rows = []
    for engine, title in ENGINES.items():
        section = doc["generation"] if engine == "reference" else doc.get(engine)
        if not section:
            continue
        checks = [c for c in doc["checks"] if engine_of(c["name"]) == engine]
        if engine == "ctranslate2":
            logits = ("log-probs", section["log_probs"]["max_abs"])
        else:
            logits = ("logits", doc["logits"].get(engine, {}).get("max_abs"))
        speed = doc.get("speed", {})
        rows.append({
            "engine": engine, "title": title, "passed": all(c["passed"] for c in checks), "delta": logits,
            "exact_match": {k: section[k]["exact_match"] for k in ("greedy", "beam") if k in section},
            "counts": {k: {c: v for c, v in section[k]["counts"].items() if v} for k in ("greedy", "beam")
                       if k in section},
            "tokenizer": doc.get("tokenizer") if engine == "reference" else section.get("tokenizer"),
            "sentences_per_s": {k: (speed[k]["reference"]["sentences_per_s"] if engine == "reference"
                                    else section[k].get("sentences_per_s")) for k in ("greedy", "beam")
                                if k in section and (engine != "reference" or k in speed)}})
    return rows


def engine_table(doc: dict) -> list[str]:
    rows = []
    for e in engines(doc):
        tok = e["tokenizer"]
        rows.append([e["title"], "PASS" if e["passed"] else "**FAIL**", f"{e['delta'][0]} {num(e['delta'][1])}",
                     " / ".join(f"{k} {v:.1%}" for k, v in e["exact_match"].items()),
                     "; ".join(f"{k}: " + (", ".join(f"{v} {c}" for c, v in cs.items()) or "none")
                               for k, cs in e["counts"].items()),
                     f"{tok['sentences'] - len(tok['mismatches'])}/{tok['sentences']} equal" if tok else "-",
                     " / ".join(f"{k} {num(v)}" for k, v in e["sentences_per_s"].items())])
    return table(["engine", "verdict", "max abs Δ", "exact match (greedy / beam)", "mismatches", "tokenizer ids",
                  "sentences/s"], rows)


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
    L += ["", "## Parity per engine (each as it is deployed, against the original, this run)", ""]
    L += engine_table(doc)
    L += ["", "Every top-hypothesis mismatch is explained or fails (docs/verify.md, \"Reading a mismatch\"):"]
    for engine, section, label in (("reference", doc["generation"], "port"), ("transformers", doc.get("transformers"),
                                   "transformers"), ("ctranslate2", doc.get("ctranslate2"), "ctranslate2")):
        for k in ("greedy", "beam"):
            for m in (section or {}).get(k, {}).get("mismatches", [])[:20]:
                L += ["", f"- **{engine} {k}, input {m['input']}: {m['class']}.** {m['explanation']}",
                      f"  - original: `{m['original']}`", f"  - {label}: `{m[label]}`"]
    rules = (doc.get("transformers") or {}).get("rules_not_expressed")
    if rules:
        L += ["", "fairseq rules the folder's generation_config.json cannot express for transformers' generate():", ""]
        L += [f"- {r}" for r in rules]
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
