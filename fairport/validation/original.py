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
        requests: list[dict], timeout: float = 600) -> dict[str, torch.Tensor]:
    """Run fairseq on `inputs` in a subprocess; returns {request key: tensor}."""
    with tempfile.TemporaryDirectory(prefix="fairport-original-") as tmp:
        tmp = Path(tmp)
        torch.save(inputs, tmp / "inputs.pt")
        job = {"checkpoints": [str(c) for c in checkpoints], "data": str(data), "inputs": str(tmp / "inputs.pt"),
               "out": str(tmp / "out.pt"), "requests": requests}
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
        job["checkpoints"], arg_overrides={"data": job["data"], "load_checkpoint_heads": True})
    for m in models:
        m.eval().float()
    return models, cfg, task


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


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    inputs = torch.load(job["inputs"], weights_only=True)
    models, cfg, task = _load(job)
    out = {}
    for req in job["requests"]:
        if req["kind"] == "logits":
            out["logits"] = _logits(models[0], inputs)
        elif req["kind"] == "predict":
            out[f"predict.{req['head']}"] = _predict(models[0], cfg, task, inputs, req["head"])
        else:
            raise ValueError(f"unknown request {req}")
    torch.save({k: v.detach().cpu().contiguous() for k, v in out.items()}, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
