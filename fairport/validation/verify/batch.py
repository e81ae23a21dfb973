"""One batch of a verify run: what the original gives on it (measured once, read by every check), and the typed
results the checks return for it, kept in OUT/shards as plain data (`asdict`) and typed again by `revive`."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import TypedDict

import torch

from fairport.reference.batching import pad_batch
from fairport.validation.original.protocol import Generate, Layers, Logits


class Top(TypedDict):
    """A side's best hypothesis for one input, as plain numbers (what the report and the shards keep)."""

    tokens: list[int]
    score: float


def top(hyps: list[dict]) -> Top:
    return {"tokens": hyps[0]["tokens"].tolist(), "score": float(hyps[0]["score"])}


@dataclass
class Delta:
    """|a - b| over the compared values of one batch: summed (for the mean), counted, largest."""

    sum: float
    values: int
    max: float

    @classmethod
    def of(cls, mine: torch.Tensor, theirs: torch.Tensor, keep: torch.Tensor) -> Delta:
        d = (mine.float().cpu() - theirs).abs()[keep]
        return cls(float(d.double().sum()), d.numel(), float(d.max()))


@dataclass
class Outputs:
    """One side's top hypotheses on a batch in each setting, and the seconds each setting took."""

    top: dict[str, list[Top]]
    seconds: dict[str, float]


@dataclass
class OriginalBatch:
    """The original on one batch: its generations (timed), and its teacher-forced NLL of the targets."""

    outputs: Outputs
    max_ref_logit: float
    nll: list[float]  # [summed NLL, tokens]


@dataclass
class Record:
    """What one batch gave: its inputs, the original's part, and each check's typed result by check name."""

    inputs: list[int]
    original: OriginalBatch
    checks: dict[str, object]


@dataclass(frozen=True)
class Batch:
    """One batch while it runs: the tensors every check reads, the original's results on them."""

    index: int
    inputs: list[int]
    src: torch.Tensor  # left-padded sources
    prefix: torch.Tensor | None  # the forced first token of each row
    targets: list[list[int]]  # references, else the original's greedy outputs
    prev: torch.Tensor  # teacher-forcing decoder input (the target's EOS moved to the front)
    tgt: torch.Tensor
    keep: torch.Tensor  # prev's non-pad positions
    logits: torch.Tensor  # the original's teacher-forced logits (fp32)
    layers: dict | None  # the original's per-module outputs (first batch)
    original: OriginalBatch


def nll(logits: torch.Tensor, target: torch.Tensor, pad: int) -> list:
    lp = torch.log_softmax(logits.float(), dim=-1)
    mask = target.ne(pad)
    out = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask]
    return [float(out.double().sum()), int(mask.sum())]


def measure_original(run, b: int) -> Batch:
    """The original on batch b: both settings' generations, then its teacher-forced logits of the targets
    (with every module's output on the first batch, for the layer curve)."""
    s, cfg = run.setup, run.setup.folder.config
    idx, src = s.batches[b], s.src_batch(b)
    prefix = s.prefix(len(idx))
    top_of, seconds = {}, {}
    for key, options in s.settings.items():
        o = run.fairseq()(Generate(src, options, prefix=prefix, force_bos=s.framing.bart))
        top_of[key], seconds[key] = [top(h) for h in o.hypotheses], o.seconds
    targets = [s.inputs.refs[i] for i in idx] if s.inputs.refs else [h["tokens"] for h in top_of["greedy"]]
    start = s.settings["beam"].get("eos", cfg.eos)  # fairseq moves the target's last token (its EOS) to the front
    prev = pad_batch([[start] + t[:-1] for t in targets], cfg.pad, left=False)
    tgt = pad_batch(targets, cfg.pad, left=False)
    theirs = run.fairseq()(Layers(src, prev) if b == 0 else Logits(src, prev))
    ref, keep = theirs.logits.float(), prev.ne(cfg.pad)
    original = OriginalBatch(Outputs(top_of, seconds), float(ref.abs()[keep].max()), nll(ref, tgt, cfg.pad))
    return Batch(b, list(idx), src, prefix, targets, prev, tgt, keep, ref, theirs.layers, original)


def revive(cls, data):
    """A typed result again from the plain data a shard keeps (what `dataclasses.asdict` gave)."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _revive(hints[f.name], data[f.name]) for f in fields(cls)})


def _revive(tp, value):
    if value is None:
        return None
    if is_dataclass(tp):
        return revive(tp, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        return {k: _revive(args[1], v) for k, v in value.items()}
    if origin is list:
        return [_revive(args[0], v) for v in value]
    if origin in (typing.Union, types.UnionType):
        return _revive(next(a for a in args if a is not type(None)), value)
    return value
