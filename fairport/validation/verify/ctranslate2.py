"""CTranslate2 as a side of `fairport verify`: its own conversion of the checkpoint (`ct2-fairseq-converter`) or a
ready model folder, decoded and scored on the same inputs as the original and the port.

Does that conversion decode like fairseq? verify answers as it does for the port: generation exact match (every
mismatch explained: the original alone, or the two models' teacher-forced scores of both outputs), and
teacher-forced log-probabilities against the original's. CTranslate2's search runs inside its C++ library and
cannot be traced step by step, so a mismatch is judged on the outputs' own scores (docs/verify.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.util import first_line


def convert(checkpoint: Path, out: Path, quantization: str = "float32") -> Path:
    """`ct2-fairseq-converter` (it imports fairseq: its own process) into `out`, in float32 or int8."""
    try:
        proc = subprocess.run(["ct2-fairseq-converter", "--model_path", str(checkpoint), "--data_dir",
                               str(checkpoint.parent), "--output_dir", str(out), "--quantization", quantization,
                               "--force", "--unsafe_deserialization"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
    except FileNotFoundError:
        raise FairportError("the ctranslate2 side needs CTranslate2: pip install 'fairport[ctranslate2]'") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        raise FairportError(f"ct2-fairseq-converter could not convert {checkpoint.name}: {tail[-1] if tail else ''}")
    return out


def frame_for_task(folder: Path, model) -> str | None:
    """Set a CTranslate2 model's config.json for a task whose framing its fairseq converter does not record (what
    a user deploying it must do too): a generator that starts from and ends with a language token (mBART
    translation: decoder start and end token `[ro_RO]`), a source that does not end with `</s>` (`x </s> [en_XX]`:
    the source is given whole, `add_source_eos` off). `model`: the fairport folder. Returns what was set."""
    config = json.loads((folder / "config.json").read_text())
    _, target = vocabularies(folder)
    changed = []
    eos = model.generation.get("eos")
    if eos is not None:
        config["decoder_start_token"] = config["eos_token"] = target[eos]
        changed.append(f"decoder start and end token {target[eos]}")
    if model.meta.get("source_suffix") is not None:
        config["add_source_eos"] = False
        changed.append("add_source_eos false (the source given whole)")
    if changed:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return ", ".join(changed) or None


def vocabularies(folder: Path) -> tuple[list[str], list[str]]:
    """A CTranslate2 model's (source, target) vocabularies: shared, or one file each."""
    if (folder / "shared_vocabulary.json").exists():
        shared = json.loads((folder / "shared_vocabulary.json").read_text())
        return shared, shared
    source, target = (json.loads((folder / f"{side}_vocabulary.json").read_text()) for side in ("source", "target"))
    return source, target


class CTranslate2Side:
    """A CTranslate2 model speaking fairseq ids: its vocabularies are the fairseq dictionaries, in order. Its search
    masks banned tokens (EOS before min_decoding_length, repeated n-grams) before the softmax: measured on the
    trained fixture, the score it returns for a hypothesis is its teacher-forced log-probabilities plus
    -log(1 - banned mass) at each step, to 1e-5 (docs/verify.md, "search rule")."""

    renormalises_bans = True

    def __init__(self, folder: Path, device: str, threads: int):
        try:
            import ctranslate2
        except ImportError:
            raise FairportError("the ctranslate2 side needs CTranslate2: pip install 'fairport[ctranslate2]'") from None
        self.folder = folder
        t0 = time.perf_counter()
        try:
            self.translator = ctranslate2.Translator(str(folder), device="cuda" if device.startswith("cuda") else "cpu",
                                                     inter_threads=1, intra_threads=threads)
        except (RuntimeError, ValueError) as e:
            raise FairportError(f"{folder} is not a CTranslate2 model: {first_line(e)}") from None
        self.load_seconds = time.perf_counter() - t0
        self.source, self.target = vocabularies(folder)
        self.index = {t: i for i, t in enumerate(self.target)}
        config = json.loads((folder / "config.json").read_text())
        self.add_source_eos = config.get("add_source_eos", True)
        self.eos = self.index[config.get("eos_token", "</s>")]  # fairseq ids of its end token

    def _sources(self, src: torch.Tensor, pad: int, eos: int) -> list[list[str]]:
        """Left-padded fairseq ids -> tokens, without the final </s> where CTranslate2 adds its own."""
        rows = []
        for row in src.tolist():
            ids = [i for i in row if i != pad]
            if self.add_source_eos and ids and self.source[ids[-1]] == "</s>":
                ids = ids[:-1]
            rows.append([self.source[i] for i in ids])
        return rows

    def generate(self, src: torch.Tensor, options: dict, pad: int, eos: int, forced: int | None,
                 max_positions: int) -> tuple[list, float]:
        """The top hypothesis of each row as fairseq ids ending in </s> (as fairseq returns them), and the time.
        The length limit is fairseq's: max_len_a * padded width + max_len_b, below the model's positions."""
        max_len = min(int(options.get("max_len_a", 0) * src.size(1) + options.get("max_len_b", 200)), max_positions - 1)
        prefix = [[self.target[forced]]] * src.size(0) if forced is not None else None
        t0 = time.perf_counter()
        out = self.translator.translate_batch(
            self._sources(src, pad, eos), beam_size=options.get("beam", 5), length_penalty=options.get("lenpen", 1.0),
            max_decoding_length=max_len, min_decoding_length=options.get("min_len", 1),
            no_repeat_ngram_size=options.get("no_repeat_ngram_size", 0), target_prefix=prefix,
            return_end_token=True, return_scores=True)
        seconds = time.perf_counter() - t0
        hyps = []  # at max_len fairseq forces </s>; CTranslate2 stops: the same hypothesis once </s> is added
        for r in out:
            ids = [self.index[t] for t in r.hypotheses[0]]
            hyps.append({"tokens": ids if ids and ids[-1] == eos else ids + [eos], "score": float(r.scores[0])})
        return hyps, seconds

    def score(self, src: torch.Tensor, targets: list[list[int]], pad: int, eos: int) -> list[list[float]]:
        """Teacher-forced log-probabilities of each target's tokens (its </s> included)."""
        tgt = [[self.target[i] for i in (t[:-1] if t and t[-1] == eos else t)] for t in targets]
        return [list(r.log_probs) for r in self.translator.score_batch(self._sources(src, pad, eos), tgt)]
