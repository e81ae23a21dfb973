"""Run the fairseq original in its own process and bring its outputs back as plain tensors.

fairseq 0.12 under torch >= 2.6 can only load checkpoints with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`
(unsafe unpickling). That switch is set only in this worker's environment, for a file the user asked to
compare against; fairport's converter never sees it. Results travel back as a tensors-only file, read
with `weights_only=True`.

Worker: `python -m fairport.validation.original JOB.json`. JOB: {"checkpoints": [...], "data": DIR,
"inputs": INPUTS.pt, "out": OUT.pt, "requests": [{"kind": "logits"} | {"kind": "predict", "head": H}]}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fairport.errors import FairportError


def run(checkpoints: list[str | Path], data: str | Path, inputs: dict[str, torch.Tensor],
        requests: list[dict], timeout: float = 600, device: str = "cpu",
        overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """Run fairseq on `inputs` in a subprocess; returns {request key: tensor}. `overrides`: fairseq options
    given when loading (a many-to-many model's direction, its dictionary and language list files)."""
    with tempfile.TemporaryDirectory(prefix="fairport-original-") as tmp:
        tmp = Path(tmp)
        torch.save(inputs, tmp / "inputs.pt")
        job = {"checkpoints": [str(c) for c in checkpoints], "data": str(data), "inputs": str(tmp / "inputs.pt"),
               "out": str(tmp / "out.pt"), "requests": requests, "device": device, "overrides": overrides or {}}
        (tmp / "job.json").write_text(json.dumps(job))
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, "-m", "fairport.validation.original", str(tmp / "job.json")],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise FairportError(f"the fairseq original failed to run:\n{tail}")
        return torch.load(tmp / "out.pt", weights_only=True)


def _load(job: dict):
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        job["checkpoints"], arg_overrides={"data": job["data"], "load_checkpoint_heads": True,
                                           **job.get("overrides", {})})
    for m in models:
        m.eval().float().to(job.get("device", "cpu"))
    _fix_task_args(task)
    return models, cfg, task


def _fix_task_args(task) -> None:
    """fairseq 0.12's translation_from_pretrained_bart reads `self.args` (source/target language) in
    build_generator and build_dataset_for_inference, but 0.12 tasks only set `self.cfg`: both raise
    AttributeError (fairseq issues #3169, #4479; the unmerged fix, PR #4487, reads `self.cfg`). The task's
    config carries the same fields, so it stands in, as in the fairseq versions mBART was released with."""
    if not hasattr(task, "args") and hasattr(task, "cfg"):
        task.args = task.cfg


def _logits(model, inputs) -> torch.Tensor:
    src, prev = inputs["src_tokens"], inputs["prev_output_tokens"]
    lengths = src.ne(model.encoder.padding_idx).sum(1)
    with torch.no_grad():
        return model(src, lengths, prev)[0]


def _predict(model, cfg, task, inputs, head: str) -> torch.Tensor:
    from fairseq.models.bart.hub_interface import BARTHubInterface

    hub = BARTHubInterface(cfg, task, model).eval()
    with torch.no_grad():
        return hub.predict(head, inputs["src_tokens"], return_logits=True)


def task_eos(models, task) -> int:
    """The EOS fairseq's own task gives its generator (mBART translation: the target language token)."""
    from argparse import Namespace

    return int(task.build_generator(models, Namespace(beam=1)).eos)


def _generate(models, task, inputs, req: dict) -> dict[str, torch.Tensor]:
    """fairseq's SequenceGenerator with the request's options and the task's EOS; hypotheses flattened."""
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    o = req["options"]
    tgt_dict = task.target_dictionary
    strategy = (search.Sampling(tgt_dict, o.get("sampling_topk", -1), o.get("sampling_topp", -1.0))
                if o.get("sampling") else None)
    gen = SequenceGenerator(
        models, tgt_dict, beam_size=o.get("beam", 5), max_len_a=o.get("max_len_a", 0),
        max_len_b=o.get("max_len_b", 200), min_len=o.get("min_len", 1), len_penalty=o.get("lenpen", 1.0),
        unk_penalty=o.get("unkpen", 0.0), temperature=o.get("temperature", 1.0),
        match_source_len=o.get("match_source_len", False), no_repeat_ngram_size=o.get("no_repeat_ngram_size", 0),
        search_strategy=strategy, eos=task_eos(models, task))
    if req.get("fixed_ngram_blocking"):
        _fix_ngram_blocking()
    src = inputs["src_tokens"]
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(tgt_dict.pad()).sum(1)}}
    prefix = inputs.get("prefix_tokens") if req.get("prefix") else None
    if "seed" in req:
        torch.manual_seed(req["seed"])
    with torch.no_grad():  # the task's inference step: a many-to-many task forces its target language token
        hypos = task.inference_step(gen, models, sample, prefix_tokens=prefix)
    out = {}
    for i, hs in enumerate(hypos):
        for j, h in enumerate(hs):
            out[f"{i}/{j}/tokens"] = h["tokens"]
            out[f"{i}/{j}/score"] = h["score"].reshape(1)
            out[f"{i}/{j}/positional_scores"] = h["positional_scores"]
    return out


def _fix_ngram_blocking() -> None:
    """fairseq 0.12's Python n-gram blocker compares the padded tail of the whole token buffer, so it never
    blocks. Passing it only the tokens generated so far gives the blocking of fairseq 0.10.2 and of its
    CUDA kernel, which fairseq's published results used."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    if getattr(NGramRepeatBlock, "_fairport_fixed", False):
        return
    NGramRepeatBlock._fairport_fixed = True
    original = NGramRepeatBlock._no_repeat_ngram

    def fixed(self, tokens, lprobs, bsz, beam_size, step):
        return original(self, tokens[:, : step + 1], lprobs, bsz, beam_size, step)

    NGramRepeatBlock._no_repeat_ngram = fixed


# fairport's names for the BPE files -> fairseq's option names
HUB_FILE_OPTIONS = {"encoder_json": "gpt2_encoder_json", "vocab_bpe": "gpt2_vocab_bpe", "bpecodes": "bpe_codes",
                    "sentencepiece_model": "sentencepiece_model"}


def _hub(job: dict, req: dict) -> list:
    """fairseq's own hub interface, text in and text out, with the folder's `--tokenizer`/`--bpe` and files:
    BART's hub where fairport frames text as BART's hub does, fairseq's generic GeneratorHubInterface
    (what TransformerModel.from_pretrained returns; it frames inputs with the task) otherwise."""
    folder = Path(job["data"])
    spec = req["text"]
    overrides = {**job.get("overrides", {}), "bpe": spec.get("bpe"), "tokenizer": spec.get("tokenizer"),
                 **{HUB_FILE_OPTIONS[k]: v for k, v in req.get("files", {}).items()}}
    if spec.get("bart"):
        from fairseq.models.bart import BARTModel

        hub = BARTModel.from_pretrained(str(folder), checkpoint_file=str(Path(job["checkpoints"][0])), **overrides)
    else:
        from fairseq import hub_utils

        x = hub_utils.from_pretrained(str(folder), checkpoint_file=":".join(str(Path(c).name) for c in
                                                                            job["checkpoints"]),
                                      data_name_or_path=str(folder), archive_map={}, **overrides)
        _fix_task_args(x["task"])
        hub = hub_utils.GeneratorHubInterface(x["args"], x["task"], x["models"])
    hub.eval()
    method = req.get("method", "sample")
    with torch.no_grad():
        if method == "roundtrip":
            return [hub.decode(hub.encode(s)) for s in req["sentences"]]
        if method == "encode":  # what the model is fed: the task's inference framing included
            ids = [hub.encode(s) for s in req["sentences"]]
            if not spec.get("bart"):
                ids = [hub.task.build_dataset_for_inference([t], [t.numel()])[0]["source"] for t in ids]
            return [t.tolist() for t in ids]
        if method in ("generate", "interactive"):
            encoded = [hub.encode(s) for s in req["sentences"]]
            if spec.get("bart"):
                hyps = hub.generate(encoded, **req.get("options", {}))
            else:
                hyps = _interactive_generate(hub, encoded, req.get("options", {}))
            if method == "generate":
                return [h[0]["tokens"].tolist() for h in hyps]
            # fairseq-interactive's output: the generator's symbols stripped (its EOS, a many-to-many task's
            # target language token), then BPE removal and detokenizer
            from argparse import Namespace

            gen = hub.task.build_generator(hub.models, Namespace(beam=1))
            strip = getattr(gen, "symbols_to_strip_from_output", None) or {gen.eos}
            return [hub.detokenize(hub.remove_bpe(hub.tgt_dict.string(h[0]["tokens"], extra_symbols_to_ignore=strip)))
                    for h in hyps]
        if spec.get("bart"):
            return hub.sample(req["sentences"], **req.get("options", {}))
        hyps = _interactive_generate(hub, [hub.encode(s) for s in req["sentences"]], req.get("options", {}))
        return [hub.decode(h[0]["tokens"]) for h in hyps]  # the hub's sample(): decode() of the best


def _interactive_generate(hub, encoded: list[torch.Tensor], options: dict) -> list:
    """GeneratorHubInterface.generate as fairseq-interactive runs it: the task builds the generator (without
    the hub's `prefix_allowed_tokens_fn` argument, which 0.12's many-to-many task does not accept), frames
    the batches (build_dataset_for_inference) and runs its own inference step."""
    import copy

    from fairseq import utils

    gen_args = copy.deepcopy(hub.cfg.generation)
    for k, v in options.items():
        setattr(gen_args, k, v)
    generator = hub.task.build_generator(hub.models, gen_args)
    results = []
    for batch in hub._build_batches(encoded, False):
        batch = utils.apply_to_sample(lambda t: t.to(hub.device), batch)
        for i, hypos in zip(batch["id"].tolist(), hub.task.inference_step(generator, hub.models, batch)):
            results.append((i, hypos))
    return [hypos for _, hypos in sorted(results, key=lambda x: x[0])]


# fairseq's intermediate outputs, by the reference's names (see EncoderDecoder.forward(hiddens=...))
def _hiddens(model, src, prev) -> dict[str, torch.Tensor]:
    lengths = src.ne(model.encoder.padding_idx).sum(1)
    enc = model.encoder(src, src_lengths=lengths, return_all_hiddens=True)
    states = enc["encoder_states"]
    out = {"encoder.embed": states[0]}
    out.update({f"encoder.layers.{i}": h for i, h in enumerate(states[1:])})
    if getattr(model.encoder, "layer_norm", None) is not None:
        out["encoder.layer_norm"] = enc["encoder_out"][0]
    logits, extra = model.decoder(prev, encoder_out=enc, return_all_hiddens=True)
    inner = extra["inner_states"]
    out["decoder.embed"] = inner[0]
    out.update({f"decoder.layers.{i}": h for i, h in enumerate(inner[1:])})
    if getattr(model.decoder, "layer_norm", None) is not None:
        out["decoder.layer_norm"] = model.decoder.layer_norm(inner[-1])
    out = {k: v.transpose(0, 1) for k, v in out.items()}  # fairseq is time-major: (T, B, C) -> (B, T, C)
    out["decoder.logits"] = logits
    return out


def _verify_logits(model, inputs, req) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for i in range(req["n"]):
            src, prev = inputs[f"src.{i}"], inputs[f"prev.{i}"]
            if i == req.get("hiddens_batch", -1):
                for k, v in _hiddens(model, src, prev).items():
                    out[f"hidden.{k}"] = v
                out[f"logits.{i}"] = out["hidden.decoder.logits"]
            else:
                out[f"logits.{i}"] = model(src, src.ne(model.encoder.padding_idx).sum(1), prev)[0]
    return out


def _verify_generate(models, task, inputs, req) -> dict[str, torch.Tensor]:
    """Generation over batches, timed (model already loaded and warmed up by a first batch)."""
    import time

    out: dict[str, torch.Tensor] = {}
    seen = 0
    total = 0.0
    ntok = 0
    warm = {"src_tokens": inputs["gsrc.0"][:1]}
    if req.get("prefix"):
        warm["prefix_tokens"] = torch.full((1, 1), task.target_dictionary.bos(), device=warm["src_tokens"].device)
    _generate(models, task, warm, {**req, "prefix": bool(req.get("prefix"))})  # warm-up, untimed
    for i in range(req["n"]):
        sub = {"src_tokens": inputs[f"gsrc.{i}"]}
        if req.get("prefix"):
            sub["prefix_tokens"] = torch.full((sub["src_tokens"].size(0), 1), task.target_dictionary.bos(),
                                              device=sub["src_tokens"].device)
        t0 = time.perf_counter()
        res = _generate(models, task, sub, {**req, "prefix": bool(req.get("prefix"))})
        total += time.perf_counter() - t0
        for k, v in res.items():
            j, rest = k.split("/", 1)
            out[f"{req['key']}:{seen + int(j)}/{rest}"] = v
            if rest.startswith("0/tokens"):
                ntok += v.numel()
        seen += sub["src_tokens"].size(0)
    out[f"{req['key']}#seconds"] = torch.tensor(total)
    out[f"{req['key']}#tokens"] = torch.tensor(ntok)
    return out


def unpack_hypotheses(out: dict[str, torch.Tensor], key: str = "") -> list[list[dict]]:
    """The inverse of the flattening in `_generate`."""
    result: dict[int, dict[int, dict]] = {}
    for k, v in out.items():
        if (key and not k.startswith(key + ":")) or "#" in k:
            continue
        i, j, field = k.split(":", 1)[-1].split("/")
        result.setdefault(int(i), {}).setdefault(int(j), {})[field] = v.squeeze(0) if field == "score" else v
    return [[result[i][j] for j in sorted(result[i])] for i in sorted(result)]


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    inputs = torch.load(job["inputs"], weights_only=True)
    if all(r["kind"] == "hub" for r in job["requests"]):
        out = {r["key"]: _hub(job, r) for r in job["requests"]}
        torch.save(out, job["out"])
        return
    models, cfg, task = _load(job)
    inputs = {k: v.to(job.get("device", "cpu")) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out = {}
    for req in job["requests"]:
        if req["kind"] == "logits":
            out["logits"] = _logits(models[0], inputs)
        elif req["kind"] == "generate":
            out.update({f"{req['key']}:{k}": v for k, v in _generate(models, task, inputs, req).items()})
        elif req["kind"] == "verify_logits":
            out.update(_verify_logits(models[0], inputs, req))
        elif req["kind"] == "verify_generate":
            out.update(_verify_generate(models, task, inputs, req))
        elif req["kind"] == "hub":
            out[req["key"]] = _hub(job, req)
        elif req["kind"] == "predict":
            out[f"predict.{req['head']}"] = _predict(models[0], cfg, task, inputs, req["head"])
        else:
            raise ValueError(f"unknown request {req}")
    import resource

    out["peak_rss_mb"] = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    torch.save({k: v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v for k, v in out.items()},
               job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
