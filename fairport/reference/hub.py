"""Text in, text out on a loaded model: the verbs of fairseq's hub interface."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fairport.errors import FairportError
from fairport.reference.batching import pad_batch


class HubMixin:
    """`encode`, `decode`, `sample`/`translate` with the folder's tokenizer and generation defaults.
    Needs `self.folder`, `self.config` and `self.generate(src_tokens, **opts)`."""

    _tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fairport.reference.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    def encode(self, text: str, source_lang: str | None = None, target_lang: str | None = None) -> torch.Tensor:
        """Text -> the ids the model is fed (a many-to-many model needs the direction, unless the folder
        records one)."""
        return self.tokenizer.encode(text, self.config.max_source_positions, source_lang, target_lang)

    def decode(self, ids, target_lang: str | None = None) -> str:
        return self.tokenizer.decode(ids, target_lang)

    def generation_defaults(self) -> dict:
        """The folder's generation_config.json, fairseq's names (beam, lenpen, max_len_b, ...)."""
        from fairport.reference.generate import GenerationOptions

        fields = set(GenerationOptions.__dataclass_fields__)
        path = Path(self.folder) / "generation_config.json"
        fairseq = json.loads(path.read_text()).get("fairseq", {}) if path.exists() else {}
        return {k: v for k, v in fairseq.items() if k in fields}

    def hub_generate(self, sentences: list[str], batch_size: int = 32, seed: int | None = None, progress=None,
                     source_lang: str | None = None, target_lang: str | None = None, **gen) -> list[list[dict]]:
        """fairseq hub `generate([encode(s) for s in sentences], **gen)`: hypotheses per sentence, in input
        order. Batches are length-sorted as fairseq's hub builds them. The task's first token is forced as
        fairseq forces it (<s> for BART, the target language token for many-to-many models)."""
        opts = {**self.generation_defaults(), **gen}
        if seed is not None:
            torch.manual_seed(seed)
        device = next(self.parameters()).device
        encoded = [self.encode(s, source_lang, target_lang) for s in sentences]
        forced = self.tokenizer.framing.forced_prefix(target_lang)
        too_long = [i for i, e in enumerate(encoded) if e.numel() > self.config.max_source_positions]
        if too_long:  # fairseq's hub refuses these too ("Size of sample #i is invalid")
            i = too_long[0]
            raise FairportError(f"{len(too_long)} input(s) longer than the model's {self.config.max_source_positions} "
                                f"source positions (input {i}: {encoded[i].numel()} tokens)")
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # stable, ascending like fairseq
        out: list = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            src = pad_batch([encoded[i].tolist() for i in idx], self.config.pad, left=True).to(device)
            prefix = None
            if forced is not None:
                prefix = torch.full((len(idx), 1), forced, dtype=torch.long, device=device)
            for i, h in zip(idx, self.generate(src, prefix_tokens=prefix, **opts)):
                out[i] = h
            if progress is not None:
                progress.update(len(idx))
        return out

    def sample(self, sentences: str | list[str], batch_size: int = 32, seed: int | None = None,
               progress=None, source_lang: str | None = None, target_lang: str | None = None,
               **gen) -> str | list[str]:
        """Generate for raw sentences (str or list); the best hypothesis of each, decoded to text."""
        single = isinstance(sentences, str)
        hyps = self.hub_generate([sentences] if single else list(sentences), batch_size, seed, progress,
                                 source_lang, target_lang, **gen)
        out = [self.decode(h[0]["tokens"].tolist(), target_lang) for h in hyps]
        return out[0] if single else out

    translate = sample
