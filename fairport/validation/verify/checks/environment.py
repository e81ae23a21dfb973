"""What the run was: versions, machine, the sources' and the folder's hashes, the installed fairseq's known
deviations from the fairseq the models were published with, the inputs."""

from __future__ import annotations

import contextlib
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from fairport import __version__
from fairport.reference.folder import sha256

NAME = "environment"
NGRAM_DEVIATION = ("fairseq 0.12's Python no-repeat-ngram fallback compares the padded tail of its token "
                   "buffer and never blocks (fairseq issues #5206, #4709); the original side here blocks as "
                   "fairseq 0.10.2 and its CUDA kernel do, which is what fairport implements.")
TASK_ARGS_DEVIATION = ("fairseq 0.12's translation_from_pretrained_bart reads `self.args` in build_generator and "
                       "build_dataset_for_inference, which 0.12 no longer sets (AttributeError; fairseq issues "
                       "#3169, #4479); the original side here gives the task its own cfg as `args` (the fix of "
                       "fairseq PR #4487), so the generator ends with the target language token as in the "
                       "fairseq versions mBART was released with.")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "fairport": __version__}
    for pkg in ("ve-fairseq", "fairseq", "transformers", "sacrebleu", "sacremoses", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def report(run) -> None:
    s = run.setup
    deviations = [NGRAM_DEVIATION]
    if s.folder.meta.get("task") == "translation_from_pretrained_bart":
        deviations.append(TASK_ARGS_DEVIATION)
    run.report.sections[NAME] = {
        "versions": versions(), "device": s.device, "machine": platform.machine(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "processes": s.ranks.world, "seed": s.opts.seed,
        "source_sha256": {p.name: sha256(p) for p in s.checkpoints},
        "output_sha256": s.folder.provenance.get("files", {}), "known_deviations": deviations}
    run.report.sections["inputs"] = {"origin": s.inputs.origin, "count": len(s.inputs.src),
                                     "teacher_forcing_target": run.report.sections["nll"]["target"],
                                     "batches": len(s.batches), "batch_size": s.opts.batch_size}
