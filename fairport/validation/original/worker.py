"""The fairseq original's side of every comparison, run in its own process: `python -m
fairport.validation.original.worker DIR` (started by protocol.py's `Original`). It loads the checkpoint(s) with
fairseq itself and answers typed requests (protocol.py) through one handler each (HANDLERS). This is the only
process that imports fairseq with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, which fairseq 0.12 needs under torch >= 2.6.

Two fixes to the installed fairseq 0.12 are applied here, both reported by `fairport verify`:
- n-gram blocking (`fix_ngram_blocking`): 0.12's Python fallback never blocks; the fixed one blocks as
  fairseq 0.10.2 and its CUDA kernel do (what its published results used, and what fairport implements);
- `translation_from_pretrained_bart` (`_fix_task_args`): 0.12's task reads `self.args`, which 0.12 no longer
  sets; the task's own cfg stands in (the fix of fairseq PR #4487).
"""

from __future__ import annotations

import copy
import sys
import time
import traceback
from argparse import Namespace
from pathlib import Path

import torch

from fairport.converters.text import TEXT_FILES
from fairport.reference.generate import GenerationOptions
from fairport.util import peak_rss_mb
from fairport.validation.original.protocol import (
    REQUESTS,
    Forward,
    Generate,
    Generated,
    Hub,
    Layers,
    Logits,
    Memory,
    Predict,
    Score,
    Scored,
    plain,
)


def reset_beam_size(models) -> None:
    """fairseq's SequenceGenerator leaves BART's cross-attention "beam size" set after a beam search, and a later
    forward of another shape fails: every use starts from beam size 1 (a generator sets its own)."""
    for m in models:
        if hasattr(m, "set_beam_size"):  # BART's (its decoder's own setter caches a stale value)
            m.set_beam_size(1)


class State:
    """The job (checkpoints, data folder, device, option overrides) and the models, loaded on first use."""

    def __init__(self, job: dict):
        self.job = job
        self._loaded = None

    @property
    def loaded(self):
        """(models, cfg, task), every request starting from beam size 1 (`reset_beam_size`)."""
        if self._loaded is not None:
            reset_beam_size(self._loaded[0])
        if self._loaded is None:
            from fairseq import checkpoint_utils

            job = self.job
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
                job["checkpoints"], arg_overrides={"data": job["data"], "load_checkpoint_heads": True,
                                                   **job["overrides"]})
            for m in models:
                m.eval().float().to(job["device"])
            _fix_task_args(task)
            self._loaded = models, cfg, task
        return self._loaded

    def to_device(self, t):
        return t.to(self.job["device"]) if isinstance(t, torch.Tensor) else t


def _fix_task_args(task) -> None:
    """fairseq 0.12's translation_from_pretrained_bart reads `self.args` (source/target language) in
    build_generator and build_dataset_for_inference, but 0.12 tasks only set `self.cfg`: both raise
    AttributeError (fairseq issues #3169, #4479; the unmerged fix, PR #4487, reads `self.cfg`). The task's
    config carries the same fields, so it stands in, as in the fairseq versions mBART was released with."""
    if not hasattr(task, "args") and hasattr(task, "cfg"):
        task.args = task.cfg


def fix_ngram_blocking(enabled: bool = True) -> None:
    """fairseq 0.12's Python n-gram blocker compares the padded tail of the whole token buffer, so it never
    blocks. Passing it only the tokens generated so far gives the blocking of fairseq 0.10.2 and of its
    CUDA kernel, which fairseq's published results used. `enabled=False` restores 0.12's own behaviour."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    if not hasattr(NGramRepeatBlock, "_fairport_original"):
        NGramRepeatBlock._fairport_original = NGramRepeatBlock._no_repeat_ngram

        def blocker(self, tokens, lprobs, bsz, beam_size, step):
            if NGramRepeatBlock._fairport_fixed:
                tokens = tokens[:, : step + 1]
            return NGramRepeatBlock._fairport_original(self, tokens, lprobs, bsz, beam_size, step)

        NGramRepeatBlock._no_repeat_ngram = blocker
    NGramRepeatBlock._fairport_fixed = enabled


def task_eos(models, task) -> int:
    """The EOS fairseq's own task gives its generator (mBART translation: the target language token)."""
    return int(task.build_generator(models, Namespace(beam=1)).eos)


def sequence_generator(models, task, options: dict):
    """fairseq's SequenceGenerator with fairport's GenerationOptions (their fairseq defaults where not given)
    and the task's EOS."""
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    o = GenerationOptions(**{k: v for k, v in options.items() if k != "eos"})
    tgt_dict = task.target_dictionary
    strategy = search.Sampling(tgt_dict, o.sampling_topk, o.sampling_topp) if o.sampling else None
    return SequenceGenerator(
        models, tgt_dict, beam_size=o.beam, max_len_a=o.max_len_a, max_len_b=o.max_len_b, min_len=o.min_len,
        normalize_scores=o.normalize_scores, len_penalty=o.lenpen, unk_penalty=o.unkpen,
        temperature=o.temperature, match_source_len=o.match_source_len,
        no_repeat_ngram_size=o.no_repeat_ngram_size, search_strategy=strategy, eos=task_eos(models, task))


def trace_search(generator) -> list[dict]:
    """Record, at each step, what fairseq's search saw (the hypotheses entering the step, by original sentence)
    and chose (its 2*beam candidates with their scores); fairport/validation/verify/mismatch.py reads it."""
    steps: list[dict] = []
    step_fn = generator.search.step

    def step(step, lprobs, scores, prev_output_tokens=None, original_batch_idxs=None):
        cand_scores, cand_indices, cand_beams = step_fn(step, lprobs, scores, prev_output_tokens, original_batch_idxs)
        steps.append({"sentences": original_batch_idxs.clone().cpu(), "prev": prev_output_tokens.clone().cpu(),
                      "cand_scores": cand_scores.clone().cpu(), "cand_indices": cand_indices.clone().cpu(),
                      "cand_beams": cand_beams.clone().cpu()})
        return cand_scores, cand_indices, cand_beams

    generator.search.step = step
    return steps


# ---- handlers: one per request kind (protocol.py) --------------------------------------------------------

def logits(state: State, r: Logits) -> Forward:
    model = state.loaded[0][0]  # an ensemble's first member
    src, prev = state.to_device(r.src), state.to_device(r.prev)
    with torch.no_grad():
        return Forward(model(src, src.ne(model.encoder.padding_idx).sum(1), prev)[0])


def layers(state: State, r: Layers) -> Forward:
    """fairseq's intermediate outputs, by the reference's module names (verify's forward hooks use the same)."""
    model = state.loaded[0][0]
    src, prev = state.to_device(r.src), state.to_device(r.prev)
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=src.ne(model.encoder.padding_idx).sum(1), return_all_hiddens=True)
        states = enc["encoder_states"]
        out = {"encoder.embed": states[0]}
        out.update({f"encoder.layers.{i}": h for i, h in enumerate(states[1:])})
        if getattr(model.encoder, "layer_norm", None) is not None:
            out["encoder.layer_norm"] = enc["encoder_out"][0]
        logits_, extra = model.decoder(prev, encoder_out=enc, return_all_hiddens=True)
        inner = extra["inner_states"]
        out["decoder.embed"] = inner[0]
        out.update({f"decoder.layers.{i}": h for i, h in enumerate(inner[1:])})
        if getattr(model.decoder, "layer_norm", None) is not None:
            out["decoder.layer_norm"] = model.decoder.layer_norm(inner[-1])
    out = {k: v.transpose(0, 1) for k, v in out.items()}  # fairseq is time-major: (T, B, C) -> (B, T, C)
    out["decoder.logits"] = logits_
    return Forward(logits_, out)


def score(state: State, r: Score) -> Scored:
    model = state.loaded[0][0]
    pad = model.encoder.padding_idx
    targets = r.targets
    width = max(len(t) for t in targets)
    prev = torch.full((len(targets), width), pad, dtype=torch.long)
    tgt = torch.full((len(targets), width), pad, dtype=torch.long)
    for i, t in enumerate(targets):
        prev[i, : len(t)] = torch.tensor([r.start] + t[:-1])
        tgt[i, : len(t)] = torch.tensor(t)
    src, prev = state.to_device(r.src), state.to_device(prev)
    with torch.no_grad():
        lp = torch.log_softmax(model(src, src.ne(pad).sum(1), prev)[0].float(), dim=-1).cpu()
    picked = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return Scored([picked[i, : len(t)].tolist() for i, t in enumerate(targets)])


def predict(state: State, r: Predict) -> torch.Tensor:
    from fairseq.models.bart.hub_interface import BARTHubInterface

    models, cfg, task = state.loaded
    hub = BARTHubInterface(cfg, task, models[0]).eval()
    with torch.no_grad():
        return hub.predict(r.head, state.to_device(r.src), return_logits=True)


def generate(state: State, r: Generate) -> Generated:
    models, _, task = state.loaded
    generator = sequence_generator(models, task, r.options)
    fix_ngram_blocking(r.fixed_ngram_blocking)
    steps = trace_search(generator) if r.trace else None
    src = state.to_device(r.src)
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(task.target_dictionary.pad()).sum(1)}}
    prefix = state.to_device(r.prefix)
    if r.force_bos:  # BART's hub: its own dictionary's <s> first
        prefix = torch.full((src.size(0), 1), task.target_dictionary.bos(), device=src.device)
    if r.seed is not None:
        torch.manual_seed(r.seed)
    t0 = time.perf_counter()
    with torch.no_grad():  # the task's inference step: a many-to-many task forces its target language token
        hypos = task.inference_step(generator, models, sample, prefix_tokens=prefix)
    seconds = time.perf_counter() - t0
    hyps = [[{"tokens": h["tokens"].cpu(), "score": h["score"].reshape(()).float().cpu(),
              "positional_scores": h["positional_scores"].cpu()} for h in sentence] for sentence in hypos]
    return Generated(hyps, seconds, steps)


def hub(state: State, r: Hub) -> list:
    """fairseq's own hub interface, text in and text out, with the folder's `--tokenizer`/`--bpe` and files:
    BART's hub where fairport frames text as BART's hub does, fairseq's generic GeneratorHubInterface
    (what TransformerModel.from_pretrained returns; it frames inputs with the task) otherwise."""
    job = state.job
    folder = Path(job["data"])
    spec = r.text
    overrides = {**job["overrides"], "bpe": spec.get("bpe"), "tokenizer": spec.get("tokenizer"),
                 **{TEXT_FILES[k].option: v for k, v in r.files.items()}}
    if spec.get("bart"):
        from fairseq.models.bart import BARTModel

        h = BARTModel.from_pretrained(str(folder), checkpoint_file=str(Path(job["checkpoints"][0])), **overrides)
    else:
        from fairseq import hub_utils

        x = hub_utils.from_pretrained(str(folder), checkpoint_file=":".join(Path(c).name for c in job["checkpoints"]),
                                      data_name_or_path=str(folder), archive_map={}, **overrides)
        _fix_task_args(x["task"])
        h = hub_utils.GeneratorHubInterface(x["args"], x["task"], x["models"])
    h.eval()
    method, sentences, options = r.method, r.sentences, r.options or {}
    with torch.no_grad():
        if method == "roundtrip":
            return [h.decode(h.encode(s)) for s in sentences]
        if method == "encode":  # what the model is fed: the task's inference framing included
            ids = [h.encode(s) for s in sentences]
            if not spec.get("bart"):
                ids = [h.task.build_dataset_for_inference([t], [t.numel()])[0]["source"] for t in ids]
            return [t.tolist() for t in ids]
        if method in ("generate", "interactive"):
            encoded = [h.encode(s) for s in sentences]
            hyps = h.generate(encoded, **options) if spec.get("bart") else _interactive_generate(h, encoded, options)
            if method == "generate":
                return [x[0]["tokens"].tolist() for x in hyps]
            # fairseq-interactive's output: the generator's symbols stripped (its EOS, a many-to-many task's
            # target language token), then BPE removal and detokenizer
            gen = h.task.build_generator(h.models, Namespace(beam=1))
            strip = getattr(gen, "symbols_to_strip_from_output", None) or {gen.eos}
            return [h.detokenize(h.remove_bpe(h.tgt_dict.string(x[0]["tokens"], extra_symbols_to_ignore=strip)))
                    for x in hyps]
        if spec.get("bart"):
            return h.sample(sentences, **options)
        hyps = _interactive_generate(h, [h.encode(s) for s in sentences], options)
        return [h.decode(x[0]["tokens"]) for x in hyps]  # the hub's sample(): decode() of the best


def _interactive_generate(hub_interface, encoded: list[torch.Tensor], options: dict) -> list:
    """GeneratorHubInterface.generate as fairseq-interactive runs it: the task builds the generator (without
    the hub's `prefix_allowed_tokens_fn` argument, which 0.12's many-to-many task does not accept), frames
    the batches (build_dataset_for_inference) and runs its own inference step."""
    from fairseq import utils

    h = hub_interface
    gen_args = copy.deepcopy(h.cfg.generation)
    for k, v in options.items():
        setattr(gen_args, k, v)
    generator = h.task.build_generator(h.models, gen_args)
    results = []
    for batch in h._build_batches(encoded, False):
        batch = utils.apply_to_sample(lambda t: t.to(h.device), batch)
        for i, hypos in zip(batch["id"].tolist(), h.task.inference_step(generator, h.models, batch)):
            results.append((i, hypos))
    return [hypos for _, hypos in sorted(results, key=lambda x: x[0])]


def memory(state: State, r: Memory) -> float:
    return peak_rss_mb()


HANDLERS = {Logits: logits, Layers: layers, Score: score, Predict: predict, Generate: generate, Hub: hub,
            Memory: memory}


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cpu(v) for v in value]
    return value


def main(folder: str) -> None:
    tmp = Path(folder)
    job = torch.load(tmp / "job.pt", weights_only=True)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    state = State(job)
    for line in sys.stdin:
        n = line.strip()
        try:
            data = torch.load(tmp / f"request-{n}.pt", weights_only=True)
            (tmp / f"request-{n}.pt").unlink()
            request = REQUESTS[data.pop("kind")](**data)
            value = plain(HANDLERS[type(request)](state, request))
            torch.save({"value": _cpu(value)}, tmp / f"result-{n}.pt")
            print(f"{n} ok", flush=True)
        except Exception:  # reported to the caller through stderr's tail; the worker stays up
            traceback.print_exc()
            sys.stderr.flush()
            print(f"{n} error", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
