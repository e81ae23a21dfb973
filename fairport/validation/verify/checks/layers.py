"""The layer curve: every module's output against the original's on the first batch, and the first that
differs (where a wrong port goes wrong)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fairport.validation.verify.batch import Batch

NAME = "layers"


@dataclass
class Result:
    curve: list[dict]  # per module in forward order: module, max_abs, tolerance, ok


def measure(run, batch: Batch) -> Result | None:
    if batch.layers is None:  # the first batch only
        return None
    s = run.setup
    with torch.no_grad(), layer_outputs(s.first_member) as mine:
        s.first_member(batch.src.to(s.device), batch.prev.to(s.device))
    return Result(curve_of(mine, batch.layers, batch.src.ne(s.folder.config.pad), batch.keep, s.opts.layer_tol))


@contextlib.contextmanager
def layer_outputs(model):
    """Collect every stage's output (B, T, C) by name while the model runs, with forward hooks: encoder.embed,
    encoder.layers.{i}, encoder.layer_norm, decoder.embed, decoder.layers.{i}, decoder.layer_norm,
    decoder.logits (the names the original's worker gives fairseq's intermediate outputs)."""
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


def curve_of(mine: dict, theirs: dict, src_keep, tgt_keep, tol: float) -> list[dict]:
    curve = []
    for name, m in mine.items():
        if name not in theirs:
            continue
        keep = src_keep if name.startswith("encoder") else tgt_keep
        t = theirs[name].float()
        delta = float((m.cpu().float() - t).abs()[keep].max())
        scale = max(1.0, float(t.abs()[keep].max()))
        curve.append({"module": name, "max_abs": delta, "tolerance": tol * scale, "ok": delta <= tol * scale})
    return curve


def report(run) -> None:
    curve = run.records()[0].checks[NAME].curve
    first_bad = next((r["module"] for r in curve if not r["ok"]), None)
    run.report.sections["layers"] = {"curve": curve, "first_divergent": first_bad,
                                     "batch_inputs": len(run.setup.batches[0])}
    run.report.add("per-layer outputs match", first_bad is None, first_bad or "none diverge",
                   f"{run.setup.opts.layer_tol} x scale",
                   f"first module whose output differs: {first_bad}" if first_bad else "")
