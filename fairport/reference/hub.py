"""Text in, text out: fairseq's hub verbs (encode, decode, generate, translate) on a loaded folder.

`load()` returns a `PortedModel` (an EncoderDecoder with these verbs) or a `PortedEnsemble`: the model
classes stay plain nn.Modules; the verbs compose the model, the folder's tokenizer and its generation
defaults.
"""

from __future__ import annotations

import functools

import torch

from fairport.errors import FairportError
from fairport.reference.batching import pad_batch
from fairport.reference.ensemble import Ensemble
from fairport.reference.folder import ModelFolder
from fairport.reference.generate import GenerationOptions, generate
from fairport.reference.model import EncoderDecoder
from fairport.reference.tokenizer import Tokenizer


class HubVerbs:
    """fairseq's hub interface on a model that has `folder` (its ModelFolder) and `config`."""

    folder: ModelFolder

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(self.folder)

    def generation_defaults(self) -> dict:
        """The folder's generation options (generation_config.json, fairseq's names: beam, lenpen, ...)."""
        return {k: v for k, v in self.folder.generation.items() if k in GenerationOptions.names()}

    def generate(self, src_tokens: torch.Tensor, seed: int | None = None, **options) -> list[list[dict]]:
        """fairseq's SequenceGenerator on ids (see reference/generate.py); options use fairseq's names
        (beam, lenpen, max_len_a, max_len_b, min_len, no_repeat_ngram_size, prefix_tokens, sampling, ...);
        `seed` seeds sampling."""
        if seed is not None:
            torch.manual_seed(seed)
        return generate(self, src_tokens, **options)

    def encode(self, text: str, source_lang: str | None = None, target_lang: str | None = None) -> torch.Tensor:
        """Text -> the ids the model is fed (a many-to-many model needs the direction, unless the folder
        records one)."""
        return self.tokenizer.encode(text, self.config.max_source_positions, source_lang, target_lang)

    def decode(self, ids, target_lang: str | None = None) -> str:
        return self.tokenizer.decode(ids, target_lang)

    def hub_generate(self, sentences: list[str], batch_size: int = 32, seed: int | None = None, progress=None,
                     source_lang: str | None = None, target_lang: str | None = None, **gen) -> list[list[dict]]:
        """fairseq hub `generate([encode(s) for s in sentences], **gen)`: hypotheses per sentence, in input
        order. Batches are length-sorted as fairseq's hub builds them. The task's first token is forced as
        fairseq forces it (<s> for BART, the target language token for many-to-many models)."""
        encoded = self.encode_all(sentences, source_lang, target_lang)
        batches = length_sorted_batches([len(e) for e in encoded], batch_size)
        return self.generate_batches(encoded, batches, seed, progress, target_lang, **gen)

    def encode_all(self, sentences: list[str], source_lang: str | None = None,
                   target_lang: str | None = None) -> list[torch.Tensor]:
        """Every sentence encoded; inputs longer than the model's source positions are refused, as fairseq's
        hub refuses them ("Size of sample #i is invalid")."""
        encoded = [self.encode(s, source_lang, target_lang) for s in sentences]
        limit = self.config.max_source_positions
        too_long = [i for i, e in enumerate(encoded) if e.numel() > limit]
        if too_long:
            i = too_long[0]
            raise FairportError(f"{len(too_long)} input(s) longer than the model's {limit} source positions "
                                f"(input {i}: {encoded[i].numel()} tokens)")
        return encoded

    def generate_batches(self, encoded: list[torch.Tensor], batches: list[list[int]], seed: int | None = None,
                         progress=None, target_lang: str | None = None, **gen) -> list[list[dict] | None]:
        """Generate for the inputs in `batches` (lists of indices into `encoded`), the folder's generation
        defaults overridden by `gen`; None for inputs in no batch (another process's share)."""
        opts = {**self.generation_defaults(), **gen}
        if seed is not None:
            torch.manual_seed(seed)
        device = next(self.parameters()).device
        forced = self.tokenizer.framing.forced_prefix(target_lang)
        out: list = [None] * len(encoded)
        for idx in batches:
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


def length_sorted_batches(lengths: list[int], batch_size: int | None, max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches, shortest first (a stable sort), as fairseq batches them: at most `batch_size` inputs
    (None: no bound), and with `max_tokens` at most that many padded source tokens (the batch's longest input x
    its inputs, fairseq's --max-tokens rule)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if max_tokens is None:
        size = batch_size or len(order) or 1
        return [order[i: i + size] for i in range(0, len(order), size)]
    too_long = next((i for i in order if lengths[i] > max_tokens), None)
    if too_long is not None:
        raise FairportError(f"input {too_long} has {lengths[too_long]} tokens, more than --max-tokens {max_tokens}: "
                            f"raise --max-tokens")
    batches: list[list[int]] = []
    for i in order:  # ascending lengths: input i is the widest of the batch it joins
        if batches and (len(batches[-1]) + 1) * lengths[i] <= max_tokens and \
                (batch_size is None or len(batches[-1]) < batch_size):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class PortedModel(HubVerbs, EncoderDecoder):
    """What `load()` returns for a single model: the reference model plus the hub verbs of its folder."""


class PortedEnsemble(HubVerbs, Ensemble):
    """What `load()` returns for an ensemble folder."""

    def __init__(self, models: list[EncoderDecoder], folder: ModelFolder):
        super().__init__(models)
        self.folder = folder
