"""`fairport verify SRC DST`: run the fairseq original and the port on the same inputs; write a report.

Sides: the fairseq original (its own process, see original.py), fairport's reference model, and
transformers when the folder is transformers-compatible. Checks, each with a threshold:
logits, the per-layer divergence curve, teacher-forced NLL, generation (greedy and the folder's beam
settings), tokenizer ids, quality (BLEU/ROUGE), the precision matrix, speed and memory (reported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fairport import __version__
from fairport.converters.convert import ensemble_members, find_sources, sha256
from fairport.converters.checkpoint import load_checkpoint
from fairport.converters.text import BPE_FILES
from fairport.errors import FairportError
from fairport.reference import load
from fairport.reference.folder import ModelFolder
from fairport.reference.tokenizer import Framing
from fairport.validation import data as vdata
from fairport.validation import original
from fairport.validation.inputs import pad_batch

SCHEMA = "fairport.verify/1"
# logits tolerance per dtype, relative to the largest |logit| of the fp32 original (fp32: absolute);
# int8 = float32 model with int8 linear layers (dynamic quantization)
DTYPE_TOL = {"float32": None, "float16": 2e-2, "bfloat16": 1e-1, "int8": 1e-1}
NGRAM_DEVIATION = ("fairseq 0.12's Python no-repeat-ngram fallback compares the padded tail of its token "
                   "buffer and never blocks (fairseq issues #5206, #4709); the original side here blocks as "
                   "fairseq 0.10.2 and its CUDA kernel do, which is what fairport implements.")
TASK_ARGS_DEVIATION = ("fairseq 0.12's translation_from_pretrained_bart reads `self.args` in build_generator and "
                       "build_dataset_for_inference, which 0.12 no longer sets (AttributeError; fairseq issues "
                       "#3169, #4479); the original side here gives the task its own cfg as `args` (the fix of "
                       "fairseq PR #4487), so the generator ends with the target language token as in the "
                       "fairseq versions mBART was released with.")


@dataclass
class VerifyOptions:
    data: Path | None = None
    fairseq_data: Path | None = None
    split: str = "test"
    limit: int | None = 100
    device: str = "cpu"
    dtypes: tuple[str, ...] = ("float32",)
    out: Path | None = None
    seed: int = 0
    batch_size: int = 16
    logits_tol: float = 1e-4
    layer_tol: float = 1e-4
    exact_match: float = 1.0
    score_tol: float = 1e-4
    nll_tol: float = 1e-4
    gpt2_encoder_json: Path | None = None
    gpt2_vocab_bpe: Path | None = None
    bpecodes: Path | None = None
    sentencepiece_model: Path | None = None
    source_lang: str | None = None  # many-to-many models: the direction to verify
    target_lang: str | None = None
    progress: bool = True


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

    def add(self, name, passed, value, threshold, detail=""):
        self.checks.append(Check(name, bool(passed), value, threshold, detail))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _say(opts: VerifyOptions, msg: str) -> None:
    if opts.progress:
        print(f"[verify] {msg}", flush=True)


def _batches(seqs: list[list[int]], size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, len(seqs)))) for i in range(0, len(seqs), size)]


def _checkpoints(src: Path) -> tuple[list[Path], Path]:
    members = ensemble_members(src)
    paths = [find_sources(m).checkpoint for m in members]
    for p in paths:  # a clear error for a missing/truncated/unsafe source before fairseq sees it
        load_checkpoint(p)
    return paths, paths[0].parent


def original_overrides(dst: Path, source_lang: str, target_lang: str) -> dict:
    """fairseq options for running a many-to-many original in one direction, with the files the converter
    found (a recorded --fixed-dictionary / --lang-dict path is usually the trainer's)."""
    prov = json.loads((dst / "provenance.json").read_text()) if (dst / "provenance.json").exists() else {}
    inputs = prov.get("inputs", {})
    out = {"source_lang": source_lang, "target_lang": target_lang}
    if inputs.get("lang_dict"):  # the list the converter read (fairseq refuses --langs next to it)
        out |= {"lang_dict": inputs["lang_dict"], "langs": None}
    if (ModelFolder.open(dst).meta.get("multilingual") or {}).get("fixed_dictionary") and inputs.get("src_dict"):
        out["fixed_dictionary"] = inputs["src_dict"]
    return out


def hub_request(dst: Path, method: str, sentences: list[str], key: str = "ids", options: dict | None = None,
                files: dict | None = None) -> dict | None:
    """A request for fairseq's hub with the folder's text pipeline and the original's BPE files (as recorded in
    provenance.json, or `files`); None when the folder has no text pipeline or those files are gone."""
    spec = ModelFolder.open(dst).text
    if not spec:
        return None
    prov = json.loads((dst / "provenance.json").read_text()) if (dst / "provenance.json").exists() else {}
    inputs = prov.get("inputs", {})
    need = BPE_FILES.get(spec.get("bpe") or "", {})
    found = {k: str((files or {}).get(k) or inputs.get(k)) for k in need if (files or {}).get(k) or inputs.get(k)}
    if set(need) - {k for k, v in found.items() if Path(v).exists()}:
        return None
    return {"kind": "hub", "key": key, "method": method, "sentences": sentences, "text": spec, "files": found,
            **({"options": options} if options is not None else {})}


def _nll(logits: torch.Tensor, target: torch.Tensor, pad: int) -> tuple[float, int]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    mask = target.ne(pad)
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask]
    return float(nll.sum()), int(mask.sum())


def _bleu(hyps: list[str], refs: list[str]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    return round(float(sacrebleu.corpus_bleu(hyps, [refs]).score), 4)


def _rouge_l(hyps: list[str], refs: list[str]) -> float | None:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return round(100 * sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / max(len(hyps), 1), 4)


def verify(src: str | Path, dst: str | Path, opts: VerifyOptions) -> Report:
    dst = Path(dst)
    folder = ModelFolder.open(dst)
    cfg, meta = folder.config, folder.meta
    ckpts, src_dir = _checkpoints(Path(src))
    report = Report()
    torch.manual_seed(opts.seed)
    port = load(dst, device=opts.device, dtype=torch.float32)
    tok = None
    try:
        tok = port.tokenizer
    except FairportError:
        pass

    # ---- the direction (many-to-many models) and the task's framing
    # without a text pipeline, no BART hub framing either: the ids are the dataset's
    framing = tok.framing if tok is not None else dataclasses.replace(Framing.from_folder(folder), bart=False)
    multi = framing.multi
    src_lang, tgt_lang = opts.source_lang or meta.get("source_lang"), opts.target_lang or meta.get("target_lang")
    overrides = {}
    if multi:
        if src_lang is None or tgt_lang is None:
            pair = (multi["lang_pairs"] or [f"{multi['langs'][0]}-{multi['langs'][-1]}"])[0].split("-")
            src_lang, tgt_lang = src_lang or pair[0], tgt_lang or pair[1]
            report.sections.setdefault("notes", []).append(
                f"many-to-many model: verified {src_lang}-{tgt_lang} (choose with --source-lang/--target-lang)")
        framing.check_direction(src_lang, tgt_lang)
        overrides = original_overrides(dst, src_lang, tgt_lang)
    forced = framing.forced_prefix(tgt_lang)  # the first generated token the task forces

    # ---- inputs
    if opts.data:
        if tok is None:
            raise FairportError("--data is text, but the folder has no tokenizer files; use --fairseq-data")
        inputs = vdata.from_text_file(opts.data, tok, opts.limit, cfg.max_source_positions, src_lang, tgt_lang)
    elif opts.fairseq_data:
        inputs = vdata.from_fairseq_data(opts.fairseq_data, opts.split, src_lang, tgt_lang, opts.limit)
    else:
        inputs = vdata.random_inputs(cfg.src_vocab_size, cfg.tgt_vocab_size, opts.limit or 32, opts.seed, cfg.eos)
    gen_defaults = port.generation_defaults()
    if not opts.data:  # binarized/random ids (each ending in </s>) framed as the task's dataset frames them
        inputs.src = [framing.task_source(s[:-1], src_lang, tgt_lang) for s in inputs.src]
        if inputs.refs:
            inputs.refs = [framing.task_target(r[:-1], tgt_lang) for r in inputs.refs]
    n = len(inputs.src)
    _say(opts, f"{n} inputs from {inputs.origin}")
    prefix_bos = framing.bart  # the original forces <s> itself (its own dictionary's)
    beam_opts = {k: gen_defaults[k] for k in ("beam", "lenpen", "max_len_a", "max_len_b", "min_len",
                                               "no_repeat_ngram_size", "unkpen", "eos") if k in gen_defaults}
    settings = {"greedy": {**beam_opts, "beam": 1}, "beam": beam_opts}
    gbatches = _batches(inputs.src, opts.batch_size)
    worker_inputs = {}
    for i, idx in enumerate(gbatches):
        worker_inputs[f"gsrc.{i}"] = pad_batch([inputs.src[j] for j in idx], cfg.pad, left=True)

    # ---- generation on the original first (its greedy output is the teacher-forcing target without refs)
    _say(opts, f"fairseq original: generation ({', '.join(settings)}), in its own process ...")
    reqs = [{"kind": "verify_generate", "key": k, "options": o, "n": len(gbatches), "prefix": prefix_bos,
             "fixed_ngram_blocking": True} for k, o in settings.items()]
    t0 = time.time()
    orig_gen = original.run(ckpts, src_dir, worker_inputs, reqs, timeout=3600, device=opts.device,
                            overrides=overrides)
    _say(opts, f"  done in {time.time() - t0:.1f}s")
    theirs = {k: original.unpack_hypotheses(orig_gen, k) for k in settings}

    targets = inputs.refs or [h[0]["tokens"].tolist() for h in theirs["greedy"]]
    target_kind = "references" if inputs.refs else "the original's greedy outputs"
    lbatches = _batches(inputs.src, opts.batch_size)
    for i, idx in enumerate(lbatches):
        worker_inputs[f"src.{i}"] = pad_batch([inputs.src[j] for j in idx], cfg.pad, left=True)
        start = gen_defaults.get("eos", cfg.eos)  # fairseq moves the target's last token (its EOS) to the front
        worker_inputs[f"prev.{i}"] = pad_batch([[start] + targets[j][:-1] for j in idx], cfg.pad, left=False)
        worker_inputs[f"tgt.{i}"] = pad_batch([targets[j] for j in idx], cfg.pad, left=False)
    _say(opts, "fairseq original: teacher-forced logits and per-layer outputs ...")
    orig_logits = original.run(ckpts, src_dir, worker_inputs,
                               [{"kind": "verify_logits", "n": len(lbatches), "hiddens_batch": 0}], timeout=3600,
                               device=opts.device, overrides=overrides)
    ensemble = len(ckpts) > 1
    if ensemble:
        report.sections["notes"] = ["ensemble: logits and layer checks use the first member"]

    # ---- 1. logits and 3. NLL, per side
    sides = {"reference": port if not ensemble else port.members[0]}
    hf_model = None
    if meta.get("transformers"):
        try:
            import transformers
            from transformers import AutoModelForSeq2SeqLM

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            hf_model = AutoModelForSeq2SeqLM.from_pretrained(dst, dtype=torch.float32).eval().to(opts.device)
        except Exception as e:  # transformers missing or failing is reported, not fatal
            report.sections.setdefault("notes", []).append(f"transformers side skipped: {type(e).__name__}: {e}")
    logit_stats = {}
    nll = {"original": [0.0, 0]}
    max_ref = 0.0
    for side in list(sides) + (["transformers"] if hf_model is not None else []):
        diffs, nll[side] = [], [0.0, 0]
        for i, idx in enumerate(lbatches):
            src_b, prev_b, tgt_b = (worker_inputs[f"{k}.{i}"].to(opts.device) for k in ("src", "prev", "tgt"))
            ref = orig_logits[f"logits.{i}"]
            with torch.no_grad():
                if side == "transformers":
                    logits = _hf_logits(hf_model, src_b, prev_b, cfg.pad)
                else:
                    logits = sides[side](src_b, prev_b).cpu()
            keep = prev_b.cpu().ne(cfg.pad)
            diffs.append((logits.float() - ref).abs()[keep])
            s, c = _nll(logits, tgt_b.cpu(), cfg.pad)
            nll[side][0] += s
            nll[side][1] += c
            if side == "reference":
                s, c = _nll(ref, tgt_b.cpu(), cfg.pad)
                nll["original"][0] += s
                nll["original"][1] += c
                max_ref = max(max_ref, float(ref.abs()[keep].max()))
        d = torch.cat(diffs)
        logit_stats[side] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "positions": int(d.numel())}
        report.add(f"logits: {side} vs original (fp32)", logit_stats[side]["max_abs"] <= opts.logits_tol,
                   logit_stats[side]["max_abs"], opts.logits_tol, f"mean |Δ| {logit_stats[side]['mean_abs']:.2e}")
    report.sections["logits"] = logit_stats
    nll_out = {k: {"nll": v[0] / max(v[1], 1), "ppl": math.exp(v[0] / max(v[1], 1)), "tokens": v[1]}
               for k, v in nll.items()}
    report.sections["nll"] = {"target": target_kind, **nll_out}
    d_nll = abs(nll_out["reference"]["nll"] - nll_out["original"]["nll"])
    report.add("teacher-forced NLL: reference vs original", d_nll <= opts.nll_tol, d_nll, opts.nll_tol,
               f"on {target_kind}")

    # ---- 2. per-layer divergence (first batch)
    with torch.no_grad(), layer_outputs(sides["reference"]) as hid:
        sides["reference"](worker_inputs["src.0"].to(opts.device), worker_inputs["prev.0"].to(opts.device))
    curve = []
    first_bad = None
    src_keep = worker_inputs["src.0"].ne(cfg.pad)
    tgt_keep = worker_inputs["prev.0"].ne(cfg.pad)
    for name, mine in hid.items():
        theirs_h = orig_logits.get(f"hidden.{name}")
        if theirs_h is None:
            continue
        keep = src_keep if name.startswith("encoder") else tgt_keep
        delta = float((mine.cpu().float() - theirs_h.float()).abs()[keep].max())
        scale = max(1.0, float(theirs_h.abs()[keep].max()))
        ok = delta <= opts.layer_tol * scale
        curve.append({"module": name, "max_abs": delta, "tolerance": opts.layer_tol * scale, "ok": ok})
        if not ok and first_bad is None:
            first_bad = name
    report.sections["layers"] = {"curve": curve, "first_divergent": first_bad}
    report.add("per-layer outputs match", first_bad is None, first_bad or "none diverge", f"{opts.layer_tol} x scale",
               f"first module whose output differs: {first_bad}" if first_bad else "")

    # ---- 4. generation, with speed
    gen_section = {}
    mine_gen = {}
    speed = {}
    for key, o in settings.items():
        _say(opts, f"reference: generation ({key}) ...")
        hyps, seconds = _port_generate(port, worker_inputs, len(gbatches), o, forced, opts.device)
        mine_gen[key] = hyps
        same = [a[0]["tokens"].tolist() == b[0]["tokens"].tolist() for a, b in zip(hyps, theirs[key])]
        score_d = [abs(float(a[0]["score"]) - float(b[0]["score"])) for a, b, s in zip(hyps, theirs[key], same) if s]
        rate = sum(same) / max(len(same), 1)
        mism = [{"input": i, "source": inputs.src_text[i] if inputs.src_text else inputs.src[i],
                 "original": _text(tok, theirs[key][i][0]["tokens"]), "port": _text(tok, hyps[i][0]["tokens"])}
                for i, s in enumerate(same) if not s]
        gen_section[key] = {"options": o, "exact_match": rate, "max_score_abs": max(score_d, default=0.0),
                            "mismatches": mism}
        report.add(f"generation ({key}): top hypothesis exact match", rate >= opts.exact_match, rate, opts.exact_match,
                   f"{len(mism)} of {len(same)} differ")
        report.add(f"generation ({key}): score |Δ| on matches", max(score_d, default=0.0) <= opts.score_tol,
                   max(score_d, default=0.0), opts.score_tol)
        otoks = int(orig_gen[f"{key}#tokens"])
        mtoks = sum(len(h[0]["tokens"]) for h in hyps)
        speed[key] = {"original": {"seconds": float(orig_gen[f"{key}#seconds"]), "sentences_per_s": n / max(float(
            orig_gen[f"{key}#seconds"]), 1e-9), "tokens_per_s": otoks / max(float(orig_gen[f"{key}#seconds"]), 1e-9)},
            "reference": {"seconds": seconds, "sentences_per_s": n / max(seconds, 1e-9),
                          "tokens_per_s": mtoks / max(seconds, 1e-9)}}
        speed[key]["ratio_reference_to_original"] = speed[key]["original"]["seconds"] / max(seconds, 1e-9)
    report.sections["generation"] = gen_section
    speed["peak_rss_mb"] = {"original_process": float(orig_gen["peak_rss_mb"]),
                            "verify_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if opts.device.startswith("cuda") and torch.cuda.is_available():
        speed["peak_cuda_mb"] = {"reference": torch.cuda.max_memory_allocated() / 2**20}
    report.sections["speed"] = speed

    # ---- tokenizer ids (text inputs only)
    if tok is not None and inputs.src_text:
        files = {"encoder_json": opts.gpt2_encoder_json, "vocab_bpe": opts.gpt2_vocab_bpe, "bpecodes": opts.bpecodes,
                 "sentencepiece_model": opts.sentencepiece_model}
        req = hub_request(dst, "encode", inputs.src_text[:200], files={k: v for k, v in files.items() if v})
        if req is None:
            report.sections.setdefault("notes", []).append("tokenizer check skipped: BPE files of the original not found")
        else:
            hub_ids = original.run(ckpts, src_dir, {}, [req], timeout=1800, overrides=overrides)["ids"]
            ours = [tok.encode(s, cfg.max_source_positions, src_lang, tgt_lang).tolist()
                    for s in inputs.src_text[:200]]
            bad = [i for i, (a, b) in enumerate(zip(ours, hub_ids)) if a != b]
            report.sections["tokenizer"] = {"sentences": len(ours), "mismatches": bad[:50]}
            report.add("tokenizer: ids equal the original's encoder", not bad, len(bad), 0,
                       f"{len(bad)} of {len(ours)} sentences differ")

    # ---- 5. quality
    if tok is not None:
        quality = {}
        hyp_o = [_text(tok, h[0]["tokens"]) for h in theirs["beam"]]
        hyp_m = [_text(tok, h[0]["tokens"]) for h in mine_gen["beam"]]
        if inputs.ref_text or inputs.refs:
            refs = inputs.ref_text or [_text(tok, torch.tensor(r)) for r in inputs.refs]
            quality["bleu"] = {"original": _bleu(hyp_o, refs), "reference": _bleu(hyp_m, refs)}
            quality["rougeL"] = {"original": _rouge_l(hyp_o, refs), "reference": _rouge_l(hyp_m, refs)}
        quality["bleu_between_sides"] = _bleu(hyp_m, hyp_o)
        report.sections["quality"] = quality

    # ---- 6. precision matrix
    precision = []
    for name in opts.dtypes:
        if name not in DTYPE_TOL:
            raise FairportError(f"--dtypes: unknown dtype {name!r} (choose from {', '.join(DTYPE_TOL)})")
        _say(opts, f"precision: reference in {name} ...")
        m = port if name == "float32" else load(dst, device=opts.device, dtype=name)
        first = m if not ensemble else m.members[0]
        diffs = []
        for i, idx in enumerate(lbatches):
            with torch.no_grad():
                lg = first(worker_inputs[f"src.{i}"].to(opts.device), worker_inputs[f"prev.{i}"].to(opts.device)).cpu()
            keep = worker_inputs[f"prev.{i}"].ne(cfg.pad)
            diffs.append((lg.float() - orig_logits[f"logits.{i}"]).abs()[keep])
        d = torch.cat(diffs)
        hyps, _ = _port_generate(m, worker_inputs, len(gbatches), settings["beam"], forced, opts.device)
        pairs = list(zip(hyps, theirs["beam"]))
        same = sum(a[0]["tokens"].tolist() == b[0]["tokens"].tolist() for a, b in pairs) / max(n, 1)
        # how far the top hypothesis' score moves (fp32 original -> this dtype), over all sentences
        score_d = [abs(float(a[0]["score"]) - float(b[0]["score"])) for a, b in pairs]
        tol = opts.logits_tol if DTYPE_TOL[name] is None else DTYPE_TOL[name] * max_ref
        entry = {"dtype": name, "logits_max_abs": float(d.max()), "logits_mean_abs": float(d.mean()),
                 "tolerance": tol, "beam_exact_match": same,
                 "score_mean_abs_delta": sum(score_d) / max(len(score_d), 1), "score_max_abs_delta": max(score_d, default=0.0)}
        if tok is not None and (inputs.ref_text or inputs.refs):
            refs = inputs.ref_text or [_text(tok, torch.tensor(r)) for r in inputs.refs]
            entry["bleu"] = _bleu([_text(tok, h[0]["tokens"]) for h in hyps], refs)
            base = _bleu([_text(tok, h[0]["tokens"]) for h in theirs["beam"]], refs)
            if entry["bleu"] is not None and base is not None:
                entry["bleu_delta_vs_original"] = round(entry["bleu"] - base, 4)
        precision.append(entry)
        report.add(f"precision {name}: logits vs fp32 original", float(d.max()) <= tol, float(d.max()), tol,
                   f"beam exact match {same:.1%}")
    report.sections["precision"] = precision

    # ---- 8. environment
    report.sections["environment"] = _environment(ckpts, dst, opts)
    report.sections["inputs"] = {"origin": inputs.origin, "count": n, "teacher_forcing_target": target_kind}
    return report


@contextlib.contextmanager
def layer_outputs(model):
    """Collect every stage's output (B, T, C) by name while the model runs, with forward hooks: encoder.embed,
    encoder.layers.{i}, encoder.layer_norm, decoder.embed, decoder.layers.{i}, decoder.layer_norm,
    decoder.logits (the names the original's worker uses for fairseq's intermediate outputs)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name, pre=False):
        if pre:  # the first layer's input is the embedding stage's output
            return lambda module, args: out.__setitem__(name, args[0])
        return lambda module, args, result: out.__setitem__(name, result)

    for side in ("encoder", "decoder"):
        stack = getattr(model, side)
        if len(stack.layers):
            hooks.append(stack.layers[0].register_forward_pre_hook(keep(f"{side}.embed", pre=True)))
        for i, layer in enumerate(stack.layers):
            hooks.append(layer.register_forward_hook(keep(f"{side}.layers.{i}")))
        if stack.layer_norm is not None:
            hooks.append(stack.layer_norm.register_forward_hook(keep(f"{side}.layer_norm")))
    hooks.append(model.decoder.output_projection.register_forward_hook(keep("decoder.logits")))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


def _hf_logits(model, src, prev, pad) -> torch.Tensor:
    """transformers row by row, unpadded (its BART/mBART positions ignore padding); pads stay zero."""
    rows = []
    for i in range(src.size(0)):
        s = src[i][src[i].ne(pad)][None]
        p = prev[i][prev[i].ne(pad)][None]
        rows.append(model(input_ids=s, decoder_input_ids=p, use_cache=False).logits[0].float().cpu())
    out = torch.zeros(prev.size(0), prev.size(1), rows[0].size(-1))
    for i, r in enumerate(rows):
        out[i, : r.size(0)] = r
    return out


def _port_generate(model, worker_inputs, nb, o, forced, device):
    warm = worker_inputs["gsrc.0"][:1].to(device)  # warm-up, untimed (as on the original's side)
    model.generate(warm, prefix_tokens=torch.full((1, 1), forced, device=device) if forced is not None else None, **o)
    hyps = []
    t0 = time.perf_counter()
    for i in range(nb):
        src = worker_inputs[f"gsrc.{i}"].to(device)
        prefix = torch.full((src.size(0), 1), forced, device=device) if forced is not None else None
        hyps += model.generate(src, prefix_tokens=prefix, **o)
    return hyps, time.perf_counter() - t0


def _text(tok, ids) -> str | list[int]:
    ids = [int(i) for i in ids]
    return tok.decode(ids) if tok is not None else ids


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "fairport": __version__}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("ve-fairseq", "fairseq", "transformers", "sacrebleu", "sacremoses", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _environment(ckpts, dst, opts) -> dict:
    prov = json.loads((dst / "provenance.json").read_text()) if (dst / "provenance.json").exists() else {}
    return {"versions": _versions(), "device": opts.device, "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(), "seed": opts.seed,
            "source_sha256": {str(p): sha256(p) for p in ckpts},
            "output_sha256": prov.get("files", {}),
            "known_deviations": [NGRAM_DEVIATION] + ([TASK_ARGS_DEVIATION] if prov.get("task") ==
                                                      "translation_from_pretrained_bart" else [])}
