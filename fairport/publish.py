"""`fairport card` and `fairport upload`: a model card built from the parity report, and a checked upload.

The card's YAML header comes from huggingface_hub's `ModelCardData` (with `model-index` results from the
report); the body describes the source, the conversion, usage, generation defaults, parity, speed and
known deviations. `upload` refuses a folder that fails its own integrity check (provenance hashes) or has
no passing report (unless --allow-unverified, which says so on the card), then pushes with
`create_repo(exist_ok=True)` + `upload_folder`. The token is never printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fairport import __version__
from fairport.converters.convert import sha256
from fairport.errors import FairportError

PIPELINES = {"translation": "translation", "denoising": "summarization", "multilingual_denoising": "translation",
             "translation_from_pretrained_bart": "translation", "sentence_prediction": "text-classification"}
UNVERIFIED_BANNER = ("> **UNVERIFIED PORT.** This upload was made with `--allow-unverified`: no passing fairport "
                     "parity report backs it. Its outputs may differ from the original fairseq model.")


def _translate_example(meta: dict) -> str:
    multi = meta.get("multilingual")
    if multi and not (meta.get("source_lang") and meta.get("target_lang")):
        src, tgt = (multi["lang_pairs"] or [f"{multi['langs'][0]}-{multi['langs'][-1]}"])[0].split("-")
        return f'print(model.translate(["Hello world!"], source_lang="{src}", target_lang="{tgt}"))'
    return 'print(model.translate(["Hello world!"]))'


def integrity_problems(folder: Path) -> list[str]:
    """Files missing or changed since conversion, per provenance.json."""
    prov_path = folder / "provenance.json"
    if not prov_path.exists():
        return ["provenance.json is missing"]
    prov = json.loads(prov_path.read_text())
    problems = []
    for name, digest in prov.get("files", {}).items():
        p = folder / name
        if not p.exists():
            problems.append(f"{name} is missing")
        elif sha256(p) != digest:
            problems.append(f"{name} does not match its sha256 in provenance.json")
    return problems


def load_report(folder: Path, report_dir: Path | None) -> dict | None:
    path = (report_dir or folder / "verify") / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def _metric_results(report: dict | None, card_name: str, pipeline: str):
    from huggingface_hub import EvalResult

    if not report:
        return None
    results = []
    dataset = report.get("inputs", {}).get("origin", "fairport verify inputs")
    task = pipeline if pipeline in ("translation", "summarization") else "text2text-generation"

    def add(metric_type, name, value):
        if value is not None:
            results.append(EvalResult(task_type=task, dataset_type="fairport-verify", dataset_name=dataset[:80],
                                      metric_type=metric_type, metric_name=name, metric_value=float(value)))

    q = report.get("quality", {})
    for metric in ("bleu", "rougeL"):
        if metric in q:
            add(metric.lower(), f"{metric} (original fairseq)", q[metric].get("original"))
            add(metric.lower(), f"{metric} (this port)", q[metric].get("reference"))
    beam = report.get("generation", {}).get("beam")
    if beam:
        add("exact_match", "generation exact match vs original (beam)", beam["exact_match"])
    return results or None


def build_card(folder: str | Path, report_dir: str | Path | None = None, license: str | None = None,
               unverified: bool = False, repo_id: str | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    meta = config["fairport"]
    model = meta["model"]
    prov = json.loads((folder / "provenance.json").read_text()) if (folder / "provenance.json").exists() else {}
    gen = json.loads((folder / "generation_config.json").read_text()).get("fairseq", {}) \
        if (folder / "generation_config.json").exists() else {}
    report = load_report(folder, Path(report_dir) if report_dir else None)
    family = meta.get("transformers")
    pipeline = PIPELINES.get(meta.get("task") or "", "text2text-generation")
    langs = [x for x in [meta.get("source_lang"), meta.get("target_lang")] if x] or None
    name = repo_id or folder.name
    data = ModelCardData(
        library_name="transformers" if family else "fairport", license=license, language=langs,
        tags=["fairseq", "fairport", model["arch"], model["family"]] + ([family] if family else [])
        + (["unverified"] if unverified else []),
        pipeline_tag=pipeline, model_name=name, eval_results=_metric_results(report, name, pipeline))

    src = prov.get("source", {})
    L = [f"# {name}", ""]
    if unverified:
        L += [UNVERIFIED_BANNER, ""]
    L += [f"A port of the fairseq `{model['arch']}` checkpoint `{Path(src.get('checkpoint', '?')).name}` "
          f"(sha256 `{src.get('sha256', '?')}`, {src.get('bytes', 0) / 2**20:.1f} MiB) to a clean PyTorch "
          f"reference, converted with fairport {prov.get('fairport_version', __version__)}.", ""]
    ens = prov.get("ensemble")
    if ens:
        L += [f"Ensemble of {len(ens) + 1} checkpoints; members after the first are under `ensemble/`.", ""]
    L += ["## Architecture", "", "| | encoder | decoder |", "|---|---|---|",
          f"| layers | {model['encoder_layers']} | {model['decoder_layers']} |",
          f"| width / FFN | {model['encoder_embed_dim']} / {model['encoder_ffn_dim']} | "
          f"{model['decoder_embed_dim']} / {model['decoder_ffn_dim']} |",
          f"| heads | {model['encoder_heads']} | {model['decoder_heads']} |",
          f"| norm | {'pre' if model['encoder_normalize_before'] else 'post'} | "
          f"{'pre' if model['decoder_normalize_before'] else 'post'} |",
          f"| positions | {'learned' if model['encoder_learned_pos'] else 'sinusoidal'} | "
          f"{'learned' if model['decoder_learned_pos'] else 'sinusoidal'} |",
          f"| vocabulary | {model['src_vocab_size']} | {model['tgt_vocab_size']} |", "",
          f"Activation `{model['activation_fn']}`, layernorm_embedding {model['layernorm_embedding']}, "
          f"shared embeddings {model['share_all_embeddings']}, dtype `{config.get('torch_dtype')}`.", ""]
    L += ["## Usage", ""]
    if family:
        hf_tok = (folder / "tokenizer_config.json").exists()
        L += ["With transformers:", "", "```python",
              "from transformers import AutoModelForSeq2SeqLM" + (", AutoTokenizer" if hf_tok else ""),
              *([f'tok = AutoTokenizer.from_pretrained("{name}")'] if hf_tok else []),
              f'model = AutoModelForSeq2SeqLM.from_pretrained("{name}")', "```", ""]
    L += ["With fairport (fairseq-exact generation and tokenization):", "", "```python",
          "from huggingface_hub import snapshot_download", "from fairport.reference import load",
          f'model = load(snapshot_download("{name}"))', _translate_example(meta) if meta.get(
              "text") or meta.get("tokenizer") else "hyps = model.generate(src_tokens)  # fairseq dictionary ids", "```", ""]
    if gen:
        L += ["## Generation defaults (fairseq names)", "", "| option | value |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in gen.items()] + [""]
    L += _parity_section(report)
    L += ["## Known deviations", "",
          "- `no_repeat_ngram_size` blocks as fairseq 0.10.2 and its CUDA kernel do; the Python fallback of "
          "fairseq 0.12 never blocks (fairseq issues #5206, #4709).", ""]
    if meta.get("transformers") is None:
        unmet = meta.get("transformers_unmet", {})
        L += ["- No transformers architecture reproduces this model exactly: "
              + "; ".join(f"{f} needs {', '.join(u)}" for f, u in unmet.items()) + ".", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(L))
    return str(card)


def _parity_section(report: dict | None) -> list[str]:
    if not report:
        return ["## Parity", "", "No fairport parity report was found for this folder.", ""]
    L = ["## Parity with the original (fairport verify)", "",
         f"Result: **{'PASS' if report['passed'] else 'FAIL'}** on {report['inputs']['origin']} "
         f"({report['inputs']['count']} inputs).", "", "| check | result | value | threshold |", "|---|---|---|---|"]
    for c in report["checks"]:
        L.append(f"| {c['name']} | {'pass' if c['passed'] else 'FAIL'} | {c['value']} | {c['threshold']} |")
    if report.get("plots", {}).get("layers"):
        L += ["", "![per-layer divergence](verify/layers.png)"]
    L += ["", "## Speed (same inputs, same run)", "", "| setting | side | sentences/s | tokens/s |", "|---|---|---|---|"]
    for k, v in report.get("speed", {}).items():
        if isinstance(v, dict) and isinstance(v.get("original"), dict):
            for side in ("original", "reference"):
                L.append(f"| {k} | {side} | {v[side]['sentences_per_s']:.1f} | {v[side]['tokens_per_s']:.1f} |")
    env = report.get("environment", {})
    L += ["", f"Hardware: {env.get('device')} ({env.get('machine')}, {env.get('threads')} threads); "
          f"versions {env.get('versions')}.", ""]
    return L


def write_card(folder: str | Path, report_dir=None, license=None, unverified=False, repo_id=None) -> Path:
    folder = Path(folder)
    (folder / "README.md").write_text(build_card(folder, report_dir, license, unverified, repo_id), encoding="utf-8")
    return folder / "README.md"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                            p.relative_to(folder).parts))


def upload(folder: str | Path, repo_id: str, *, private: bool = False, revision: str = "main",
           commit_message: str | None = None, create_pr: bool = False, dry_run: bool = False,
           allow_unverified: bool = False, license: str | None = None, report_dir=None, retries: int = 3,
           out=print) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FairportError(f"{folder} is not a fairport model folder (no config.json)")
    problems = integrity_problems(folder)
    if problems:
        raise FairportError(f"{folder} fails its integrity check: " + "; ".join(problems))
    report = load_report(folder, Path(report_dir) if report_dir else None)
    verified = bool(report and report.get("passed"))
    if not verified and not allow_unverified:
        why = "has no parity report" if report is None else "has a failing parity report"
        raise FairportError(f"{folder} {why} (run `fairport verify` first, or pass --allow-unverified)")
    card = build_card(folder, report_dir, license, unverified=not verified, repo_id=repo_id)
    files = [p for p in _files(folder) if p.name != "README.md" or p.parent != folder]
    listing = [(str(p.relative_to(folder)), p.stat().st_size) for p in files] + [("README.md", len(card.encode()))]
    if dry_run:
        out(f"dry run: would upload to {repo_id} (revision {revision}{', as a pull request' if create_pr else ''}"
            f"{', private' if private else ''}):")
        for name, size in listing:
            out(f"  {size:>12,d}  {name}")
        out(f"  total {sum(s for _, s in listing):,d} bytes in {len(listing)} files")
        out("--- README.md (model card) ---")
        out(card)
        return {"dry_run": True, "files": listing}
    (folder / "README.md").write_text(card, encoding="utf-8")
    return _push(folder, repo_id, private, revision, commit_message, create_pr, retries, out, listing)


def _push(folder, repo_id, private, revision, commit_message, create_pr, retries, out, listing) -> dict:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()  # token: HF_TOKEN or the stored login; endpoint: HF_ENDPOINT
    message = commit_message or f"Upload fairport port ({len(listing)} files)"
    last = None
    for attempt in range(1, retries + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                     commit_message=message, create_pr=create_pr, repo_type="model",
                                     ignore_patterns=[".*", "**/.*"])
            url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
            out(f"uploaded {len(listing)} files to {repo_id}: {url}")
            return {"dry_run": False, "files": listing, "url": url}
        except RepositoryNotFoundError:
            raise FairportError(f"repository {repo_id} not found, or the token cannot write to it") from None
        except HfHubHTTPError as e:
            status = e.response.status_code if getattr(e, "response", None) is not None else None
            if status in (401, 403):
                raise FairportError(f"the Hub refused the upload ({status}): check HF_TOKEN or `hf auth login` "
                                    f"and your write access to {repo_id}") from None
            if status is not None and status < 500 and status != 429:
                raise FairportError(f"the Hub answered {status}: {_short(e)}") from None
            last = e
        except (OSError, ConnectionError) as e:
            last = e
        if attempt < retries:
            out(f"transient Hub error ({_short(last)}); retrying ({attempt}/{retries - 1}) ...")
            time.sleep(min(2 ** attempt, 10) * 0.1)
    raise FairportError(f"upload failed after {retries} attempts: {_short(last)}")


def _short(e) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
