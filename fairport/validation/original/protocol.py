"""Talking to the fairseq original: typed requests, and `Original`, which runs it in its own process.

fairseq 0.12 under torch >= 2.6 can only load checkpoints with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` (unsafe
unpickling). That switch is set only in the worker process's environment, for a file the user asked to compare
against; fairport's converter never sees it. Requests and results travel as tensors-only files, read with
`weights_only=True`. This module imports no fairseq.

    with Original([checkpoint], data_dir) as fairseq:
        logits = fairseq(Logits(src, prev)).logits
        hyps = fairseq(Generate(src, {"beam": 5})).hypotheses

Each request type has its result type (RESULTS; the others answer a plain value); the worker dispatches on the
request's type and returns that type (validation/original/worker.py). The worker is a fresh interpreter, or,
where the environment names a fork server (forkserver.py: the test suite), a process forked from one that has
imported fairseq already.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from fairport.converters.text import BPE_FILES
from fairport.errors import FairportError
from fairport.reference.folder import ModelFolder
from fairport.validation.original import forkserver


@dataclass
class Forward:
    """Teacher-forced logits (B, T, V), and with Layers every stage's output (B, T, C) by name."""

    logits: torch.Tensor
    layers: dict[str, torch.Tensor] | None = None


@dataclass
class Generated:
    """Per sentence, its hypotheses best first ({"tokens", "score", "positional_scores"}), the generation's wall
    time, and when asked the search's trace: per step, what fairseq's search saw and chose (see
    fairport/validation/verify/mismatch.py)."""

    hypotheses: list[list[dict]]
    seconds: float
    trace: list[dict] | None = None


@dataclass
class Scored:
    """Teacher-forced log-probabilities of each target's tokens (one list per target)."""

    log_probs: list[list[float]]


@dataclass
class Logits:
    """Teacher-forced logits (B, T, V) of one batch (Forward)."""

    src: torch.Tensor  # (B, S) left-padded
    prev: torch.Tensor  # (B, T) decoder inputs, right-padded


@dataclass
class Layers(Logits):
    """Logits plus every stage's output (B, T, C), by the reference's module names (encoder.embed,
    encoder.layers.{i}, encoder.layer_norm, decoder.embed, ..., decoder.logits) (Forward)."""


@dataclass
class Score:
    """Teacher-forced log-probabilities of each target's tokens under the original (an ensemble's first member)
    (Scored)."""

    src: torch.Tensor  # (B, S) left-padded
    targets: list[list[int]]  # one per row, each ending in the generator's EOS
    start: int  # the decoder's first input (the generator's EOS)


@dataclass
class Predict:
    """BART's classification head: hub.predict(head, src, return_logits=True)."""

    src: torch.Tensor
    head: str


@dataclass
class Generate:
    """fairseq's SequenceGenerator on one batch through the task's inference step (a many-to-many task forces
    its target language token), with the task's generator EOS (Generated)."""

    src: torch.Tensor
    options: dict  # GenerationOptions' names (beam, lenpen, ...)
    prefix: torch.Tensor | None = None  # forced first tokens (B, P)
    force_bos: bool = False  # BART's hub: the task dictionary's <s> forced first
    seed: int | None = None  # seeds sampling
    fixed_ngram_blocking: bool = True  # n-gram blocking as fairseq 0.10.2 / its CUDA kernel (see worker.py)
    trace: bool = False


@dataclass
class Hub:
    """Text through fairseq's own hub interface, with the folder's --tokenizer/--bpe and the original's files.
    method: encode (framed ids), generate (ids), interactive (fairseq-interactive's text), roundtrip, sample."""

    method: str
    sentences: list[str]
    text: dict  # the folder's text pipeline spec (tokenizer, bpe, bart)
    files: dict[str, str] = field(default_factory=dict)  # TEXT_FILES field -> path
    options: dict | None = None


@dataclass
class Memory:
    """The worker process's own peak resident memory (VmHWM), in MB."""


REQUESTS = {cls.__name__: cls for cls in (Logits, Layers, Score, Predict, Generate, Hub, Memory)}
RESULTS = {Logits: Forward, Layers: Forward, Score: Scored, Generate: Generated}  # the others: a plain value


def plain(value):
    """A result as the tensors-only files carry it (a dataclass as a dict of its fields)."""
    return {f.name: getattr(value, f.name) for f in fields(value)} if is_dataclass(value) else value


class Original:
    """The fairseq original (one checkpoint, or an ensemble), loaded once in its own process."""

    def __init__(self, checkpoints: list[str | Path], data: str | Path, device: str = "cpu",
                 overrides: dict | None = None, timeout: float = 3600, threads: int | None = None):
        self.timeout = timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="fairport-original-"))
        self.count = 0
        job = {"checkpoints": [str(c) for c in checkpoints], "data": str(data), "device": device,
               "overrides": overrides or {}, "threads": threads}
        torch.save(job, self.tmp / "job.pt")
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
        self.stderr = open(self.tmp / "stderr.txt", "w")  # noqa: SIM115 (the worker's, open until close())
        self.proc = forkserver.start(self.tmp, env, self.stderr) or subprocess.Popen(
            [sys.executable, "-m", "fairport.validation.original.worker", str(self.tmp)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)

    def __enter__(self) -> Original:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, request):
        """Send one request; its result (tensors, lists, numbers), or a FairportError with fairseq's error."""
        if self.proc.poll() is not None:
            raise FairportError(f"the fairseq original is not running:\n{self._tail()}")
        self.count += 1
        n = self.count
        torch.save({"kind": type(request).__name__, **{f.name: getattr(request, f.name) for f in fields(request)}},
                   self.tmp / f"request-{n}.pt")
        try:
            self.proc.stdin.write(f"{n}\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            reply = self.proc.stdout.readline().strip() if ready else "timeout"
        except (BrokenPipeError, OSError):
            reply = ""
        if reply == "timeout":
            self.proc.kill()
            raise FairportError(f"the fairseq original did not answer a {type(request).__name__} request within "
                                f"{self.timeout:.0f}s")
        if reply != f"{n} ok":
            self.proc.poll()
            tail = self._tail()
            cause = tail.splitlines()[-1] if tail else f"the worker exited with code {self.proc.returncode}"
            raise FairportError(f"the fairseq original failed on a {type(request).__name__} request: {cause}")
        value = torch.load(self.tmp / f"result-{n}.pt", weights_only=True)["value"]
        (self.tmp / f"result-{n}.pt").unlink()
        typed = RESULTS.get(type(request))
        return typed(**value) if typed else value

    def _tail(self, lines: int = 15) -> str:
        self.stderr.flush()
        text = (self.tmp / "stderr.txt").read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run(checkpoints: list[str | Path], data: str | Path, *requests, device: str = "cpu",
        overrides: dict | None = None) -> list:
    """Start the original, answer `requests` in order, stop it."""
    with Original(checkpoints, data, device, overrides) as original:
        return [original(r) for r in requests]


def _folder(folder) -> ModelFolder:
    return folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder)


def direction_overrides(folder, source_lang: str, target_lang: str) -> dict:
    """fairseq options for loading a many-to-many original in one direction, with the files the converter
    used (a recorded --fixed-dictionary / --lang-dict path is usually the trainer's, gone here)."""
    folder = _folder(folder)
    inputs = folder.inputs
    out = {"source_lang": source_lang, "target_lang": target_lang}
    if inputs.get("lang_dict"):  # the list the converter read (fairseq refuses --langs next to it)
        out |= {"lang_dict": inputs["lang_dict"], "langs": None}
    if (folder.meta.get("multilingual") or {}).get("fixed_dictionary") and inputs.get("src_dict"):
        out["fixed_dictionary"] = inputs["src_dict"]
    return out


def hub_request(folder, method: str, sentences: list[str], options: dict | None = None,
                files: dict | None = None) -> Hub | None:
    """A Hub request with the folder's text pipeline and the original's BPE files (`files` by TEXT_FILES
    field, else those conversion read, per provenance.json); None when the folder has no text pipeline or
    those files are gone."""
    folder = _folder(folder)
    spec = folder.text
    if not spec:
        return None
    given = {k: str(v) for k, v in (files or {}).items() if v}
    need = BPE_FILES.get(spec.get("bpe") or "", {})
    found = {k: given.get(k) or folder.inputs.get(k) for k in need}
    if not all(v and Path(v).exists() for v in found.values()):
        return None
    return Hub(method, list(sentences), spec, found, options)
