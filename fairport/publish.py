"""`fairport card` and `fairport upload`: a model card built from the parity report, and a checked upload.

The card's YAML header comes from huggingface_hub's `ModelCardData` (with `model-index` results from the
report); the body describes the source, the conversion, usage, generation defaults, parity, speed and known
deviations. `upload` refuses a folder that fails its own integrity check (provenance hashes) or has no passing
report (unless --allow-unverified, which says so on the card), then pushes one commit (`create_repo(exist_ok=
True)` + `create_commit`), retrying transient failures. Nothing published carries a local path: the card and
reports name files only, and the uploaded provenance.json keeps base names. The token is never printed.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from fairport import __version__
from fairport.errors import FairportError
from fairport.options import report_dir as verify_report_dir
from fairport.reference.folder import CARD, ModelFolder, card_is_fairports, sha256, signed_card
from fairport.reference.tokenizer import Framing
from fairport.util import first_line
from fairport.validation.verify.report import engine_table, engines, num

PIPELINES = {"translation": "translation", "denoising": "summarization", "multilingual_denoising": "translation",
             "translation_from_pretrained_bart": "translation", "sentence_prediction": "text-classification",
             "translation_multi_simple_epoch": "translation"}
UNVERIFIED_BANNER = ("> **UNVERIFIED PORT.** This upload was made with `--allow-unverified`: no passing fairport "
                     "parity report backs it. Its outputs may differ from the original fairseq model.")
# transient network failures, by class name in the HTTP libraries huggingface_hub has used (requests, httpx,
# httpx2): retried, then one error line
NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
                  "Timeout", "TimeoutException", "NetworkError", "TransportError", "RemoteProtocolError",
                  "ReadError", "WriteError", "ChunkedEncodingError"}


def is_network_error(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in NETWORK_ERRORS and cls.__module__.split(".")[0] in ("requests", "httpx", "httpx2", "urllib3")
        for cls in type(e).__mro__)


def _translate_example(folder: ModelFolder) -> str:
    framing = Framing.from_folder(folder)
    if framing.multi and not (framing.source_lang and framing.target_lang):
        src, tgt = framing.default_direction()
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
    path = verify_report_dir(folder, report_dir) / "report.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise FairportError(f"{path} is not valid JSON: run `fairport verify` again") from None


def dataset_name(report: dict | None, given: str | None) -> str:
    """What the card calls the verification data: the name given, else the report's (a file name, never a path)."""
    if given:
        return given
    origin = (report or {}).get("inputs", {}).get("origin", "fairport verify inputs")
    return " ".join(Path(w).name if "/" in w else w for w in origin.split(" "))[:80]


def _metric_results(report: dict | None, pipeline: str, dataset: str):
    from huggingface_hub import EvalResult

    if not report:
        return None
    results = []
    task = pipeline if pipeline in ("translation", "summarization") else "text2text-generation"

    def add(metric_type, name, value):
        if value is not None:
            results.append(EvalResult(task_type=task, dataset_type="fairport-verify", dataset_name=dataset,
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


def existing_license(folder: Path) -> str | None:
    """The license a card already in the folder declares (`fairport card --license`), so upload keeps it."""
    card = folder / "README.md"
    if not card.exists():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # a README that is not a model card: nothing to keep
        return None


def build_card(folder: str | Path, report_dir: str | Path | None = None, license: str | None = None,
               unverified: bool = False, repo_id: str | None = None, dataset: str | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    f = ModelFolder.open(folder)
    model, prov = f.meta["model"], f.provenance
    report = load_report(f.path, Path(report_dir) if report_dir else None)
    pipeline = PIPELINES.get(f.meta.get("task") or "", "text2text-generation")
    langs = [x for x in [f.meta.get("source_lang"), f.meta.get("target_lang")] if x] or None
    name = repo_id or f.path.name
    data = ModelCardData(
        library_name="transformers" if f.transformers else "fairport", license=license, language=langs,
        tags=["fairseq", "fairport", model["arch"], model["family"]] + ([f.transformers] if f.transformers else [])
        + (["unverified"] if unverified else []),
        pipeline_tag=pipeline, model_name=name,
        eval_results=_metric_results(report, pipeline, dataset_name(report, dataset)))

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
          f"shared embeddings {model['share_all_embeddings']}, stored dtype `{f.dtype}`.", ""]
    L += ["## Usage", ""]
    if f.transformers:
        L += _transformers_usage(f, name, report)
    L += ["With fairport (fairseq-exact generation and tokenization):", "", "```python",
          "from huggingface_hub import snapshot_download", "from fairport.reference import load",
          f'model = load(snapshot_download("{name}"))',
          _translate_example(f) if f.text else "hyps = model.generate(src_tokens)  # fairseq dictionary ids", "```", ""]
    if f.generation:
        L += ["## Generation defaults (fairseq names)", "", "| option | value |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in f.generation.items() if v is not None] + [""]
    L += _parity_section(report, dataset_name(report, dataset))
    L += ["## Known deviations", "",
          "- `no_repeat_ngram_size` blocks as fairseq 0.10.2 and its CUDA kernel do; the Python fallback of "
          "fairseq 0.12 never blocks (fairseq issues #5206, #4709).", ""]
    if f.transformers is None:
        unmet = f.meta.get("transformers_unmet", {})
        L += ["- No transformers architecture reproduces this model exactly: "
              + "; ".join(f"{fam} needs {', '.join(u)}" for fam, u in unmet.items()) + ".", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(L)))


def _transformers_usage(f: ModelFolder, name: str, report: dict | None) -> list[str]:
    """The transformers lines: exactly what verify's transformers side runs (its default load, generate() with the
    folder's generation config), with how that run did, and the fairseq rules the config cannot express."""
    hf_tok = (f.path / "tokenizer_config.json").exists()
    framing = Framing.from_folder(f)
    forced = ""
    if framing.multi and framing.multi["decoder_langtok"] and not framing.target_lang:
        src, tgt = framing.default_direction()
        forced = f", forced_bos_token_id={framing.lang_token(tgt, 'target')}  # the target language ({tgt})"
    side = (report or {}).get("transformers")
    if side:
        rows = {e["engine"]: e for e in engines(report)}
        verdict = "PASS" if rows["transformers"]["passed"] else "FAIL"
        tok = side.get("tokenizer")
        tok_line = "" if not hf_tok else (
            f" AutoTokenizer: {tok['sentences'] - tok.get('differ', len(tok['mismatches']))} of {tok['sentences']} "
            f"sentences give fairseq's ids" + (f"; {tok.get('explained', 0)} differ by a named rule ({tok['rule']})"
                                               if tok.get("rule") else "")
            + (f"; {len(tok['unexplained'])} differ, unexplained" if tok.get("unexplained") else "") + "."
            if tok else " AutoTokenizer was not checked (the parity data were token ids, not text).")
        how = (f"verify ran these lines on the parity data: **{verdict}**, exact match with fairseq "
               + ", ".join(f"{k} {side[k]['exact_match']:.1%}" for k in ("greedy", "beam") if k in side)
               + " (table below)." + tok_line)
    else:
        how = "**Not verified**: the parity report has no transformers side (run `fairport verify` with transformers " \
              "installed)."
    L = ["With transformers (loads in float32, as fairseq computes, whatever the stored dtype):", "", "```python",
         "from transformers import AutoModelForSeq2SeqLM" + (", AutoTokenizer" if hf_tok else ""),
         *([f'tok = AutoTokenizer.from_pretrained("{name}")'] if hf_tok else []),
         f'model = AutoModelForSeq2SeqLM.from_pretrained("{name}")',
         f"out = model.generate(input_ids, attention_mask=attention_mask{forced})  # the folder's generation config",
         "```", "", how, ""]
    if hf_tok and framing.multi and f.file("tokenizer.json").exists():
        src, tgt = framing.default_direction()
        L += [f"`AutoTokenizer` frames sources for {src} -> {tgt}; for another direction, encode with "
              f"`add_special_tokens=False` and add the language tokens as fairport's `Framing.source` does.", ""]
    rules = f.transformers_rules
    if rules:
        L += ["fairseq rules transformers' generation config cannot express:", ""] + [f"- {r}" for r in rules] + [""]
    return L


def _parity_section(report: dict | None, dataset: str) -> list[str]:
    if not report:
        return ["## Parity", "", "No fairport parity report was found for this folder.", ""]
    L = ["## Parity with the original (fairport verify)", "",
         f"Result: **{'PASS' if report['passed'] else 'FAIL'}** on {dataset} ({report['inputs']['count']} inputs).", ""]
    if "transformers" in report or "ctranslate2" in report or report.get("schema", "").endswith("/3"):
        L += ["Each engine as it is deployed, against the original, in this run:", ""] + engine_table(report) + [""]
    L += ["| check | result | value | threshold |", "|---|---|---|---|"]
    for c in report["checks"]:
        L.append(f"| {c['name']} | {'pass' if c['passed'] else 'FAIL'} | {num(c['value'])} | {num(c['threshold'])} |")
    if report.get("plots", {}).get("layers"):
        L += ["", "![per-layer divergence](verify/layers.png)"]
    L += ["", "## Speed (same inputs, same run)", "", "| setting | side | sentences/s | tokens/s |",
          "|---|---|---|---|"]
    for k, v in report.get("speed", {}).items():
        if k in ("greedy", "beam"):
            for side in ("original", "reference"):
                L.append(f"| {k} | {side} | {num(v[side]['sentences_per_s'])} | {num(v[side]['tokens_per_s'])} |")
    env = report.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    L += ["", f"Hardware: {env.get('device')} ({env.get('processor') or env.get('machine')}, {env.get('threads')} "
              f"threads); versions: {versions}.", ""]
    return L


def write_card(folder: str | Path, report_dir=None, license=None, unverified=False, repo_id=None,
               dataset=None, force: bool = False) -> Path:
    """DST/README.md from the report. A README.md that is not fairport's unedited card is kept unless `force`."""
    path = Path(folder) / CARD
    if path.exists() and not force and not card_is_fairports(path):
        raise FairportError(f"{path} is not the card fairport wrote (edited by hand, or your own): it is kept; pass "
                            f"--force to replace it")
    text = build_card(folder, report_dir, license, unverified, repo_id, dataset)
    tmp = path.with_name(f".{CARD}.fairport-tmp")
    tmp.write_text(signed_card(text), encoding="utf-8")
    os.replace(tmp, path)
    return path


def card_to_upload(folder: Path, choice: str | None, report_dir, license, unverified, repo_id, dataset) -> str:
    """The card upload sends: built from the report, unless README.md is a card a person wrote or edited; then
    `choice` must say: "keep" (send it as it is) or "replace" (send the built card; the local file stays)."""
    path = folder / CARD
    edited = path.exists() and not card_is_fairports(path)
    if choice == "keep":
        if not path.exists():
            raise FairportError(f"--card keep: {path} does not exist; drop --card to upload a card built from the "
                                f"report")
        return path.read_text(encoding="utf-8")
    if edited and choice != "replace":
        raise FairportError(f"{path} is not the card fairport wrote (edited by hand, or your own): upload does not "
                            f"replace it; pass --card keep to upload it as it is, or --card replace to upload a card "
                            f"built from the report (the local file stays as it is)")
    license = license or existing_license(folder)
    return build_card(folder, report_dir, license, unverified=unverified, repo_id=repo_id, dataset=dataset)


def hub_token() -> str:
    """The Hub token (HF_TOKEN or the stored login), checked before anything goes to the network."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise FairportError("no Hugging Face token found: set HF_TOKEN, or run `hf auth login` (nothing was "
                            "uploaded)")
    return token


# what a verify run may leave in DST/verify that is not the report: CTranslate2's conversion, resumable batches
NOT_PUBLISHED = (("verify", "ctranslate2"), ("verify", "shards"))


def _files(folder: Path) -> list[Path]:
    """What upload sends: the folder's files, less hidden ones and NOT_PUBLISHED."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and p.relative_to(folder).parts[:2] not in NOT_PUBLISHED)


ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])(?:/|~/|[A-Za-z]:\\)[^\s,;()'\"]+")


def public_provenance(path: Path) -> bytes:
    """provenance.json as published: every local path it records (the checkpoint, the inputs, paths quoted in
    notes) reduced to its file name."""
    prov = json.loads(path.read_text())

    def names(node):
        if isinstance(node, dict):
            return {k: names(v) for k, v in node.items()}
        if isinstance(node, list):
            return [names(v) for v in node]
        if isinstance(node, str):
            return ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name, node)
        return node

    return json.dumps(names(prov), indent=2).encode()


def upload(folder: str | Path, repo_id: str, *, private: bool = False, revision: str = "main",
           commit_message: str | None = None, create_pr: bool = False, dry_run: bool = False,
           allow_unverified: bool = False, license: str | None = None, report_dir=None, retries: int = 3,
           dataset: str | None = None, card_choice: str | None = None, out=print) -> dict:
    """Push the folder with its card. Nothing local is written: the card sent is built in memory (or, with
    `card_choice="keep"`, the folder's own README.md as it is)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise FairportError(f"{repo_id!r} is not a Hub repository id (namespace/name): {first_line(e)}") from None
    ModelFolder.open(folder)  # a clear error for a folder that is not a model
    problems = integrity_problems(folder)
    if problems:
        raise FairportError(f"{folder} fails its integrity check: " + "; ".join(problems))
    report = load_report(folder, Path(report_dir) if report_dir else None)
    verified = bool(report and report.get("passed"))
    if not verified and not allow_unverified:
        why = "has no parity report" if report is None else "has a failing parity report"
        raise FairportError(f"{folder} {why} (run `fairport verify` first, or pass --allow-unverified)")
    card = card_to_upload(folder, card_choice, report_dir, license, not verified, repo_id, dataset)
    if not dry_run:
        hub_token()
    contents = {str(p.relative_to(folder)): p for p in _files(folder) if p != folder / CARD}
    contents[CARD] = card.encode()
    contents["provenance.json"] = public_provenance(folder / "provenance.json")
    listing = [(name, len(v) if isinstance(v, bytes) else v.stat().st_size) for name, v in sorted(contents.items())]
    if dry_run:
        out(f"dry run: would upload to {repo_id} (revision {revision}{', as a pull request' if create_pr else ''}"
            f"{', private' if private else ''}):")
        for name, size in listing:
            out(f"  {size:>12,d}  {name}")
        out(f"  total {sum(s for _, s in listing):,d} bytes in {len(listing)} files")
        out("--- README.md (model card) ---")
        out(card)
        return {"dry_run": True, "files": listing}
    return _push(contents, repo_id, private, revision, commit_message, create_pr, retries, out, listing)


def _push(contents, repo_id, private, revision, commit_message, create_pr, retries, out, listing) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()  # token: HF_TOKEN or the stored login; endpoint: HF_ENDPOINT
    message = commit_message or f"Upload fairport port ({len(listing)} files)"
    last = None
    for attempt in range(1, retries + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=v if isinstance(v, bytes) else str(v))
                   for name, v in sorted(contents.items())]
            info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, create_pr=create_pr,
                                     repo_type="model")
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
                raise FairportError(f"the Hub answered {status}: {first_line(e)[:200]}") from None
            last = e
        except Exception as e:
            if not is_network_error(e):
                raise
            last = e
        if attempt < retries:
            out(f"transient Hub error ({first_line(last)[:200]}); retrying ({attempt}/{retries - 1}) ...")
            time.sleep(min(2 ** attempt, 10) * 0.1)
    raise FairportError(f"upload failed after {retries} attempts: {first_line(last)[:200]}")
