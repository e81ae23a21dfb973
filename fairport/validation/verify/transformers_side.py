"""transformers as a side of `fairport verify`, run as its users run it: `AutoModelForSeq2SeqLM.from_pretrained(DST)`
with its defaults (the folder's config.json says float32), and `generate()` with the folder's own
generation_config.json, no arguments (greedy: `num_beams=1`, the one argument a user changes), on right-padded
batches with an attention mask (what transformers' tokenizers give). Where the folder's generation config cannot
express a fairseq rule (converters/hf.py: `generation_fields`), verify passes what the card tells users to pass:
`forced_bos_token_id` for a many-to-many model's target language, `max_length` for fairseq's max_len_a.
"""

from __future__ import annotations

import time

import torch

from fairport.errors import FairportError
from fairport.util import first_line


class TransformersSide:
    """A transformers model speaking fairseq ids (the folder's ids are fairseq's dictionary indices)."""

    def __init__(self, folder, device: str):
        try:
            import transformers
            from transformers import AutoModelForSeq2SeqLM
        except ImportError:
            raise FairportError("the transformers side needs transformers: pip install 'fairport[hf]'") from None
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        t0 = time.perf_counter()
        try:
            self.model = AutoModelForSeq2SeqLM.from_pretrained(folder.path).eval()  # its defaults, as deployed
        except Exception as e:  # noqa: BLE001 - transformers failing to load the folder is reported as such
            raise FairportError(f"transformers could not load {folder.path}: {type(e).__name__}: {first_line(e)}") \
                from None
        self.model.to(device)
        self.load_seconds = time.perf_counter() - t0
        self.device, self.pad = device, folder.config.pad
        gen = self.model.generation_config
        self.eos, self.start = gen.eos_token_id, gen.decoder_start_token_id
        self.forced = getattr(gen, "forced_bos_token_id", None)
        self.rules = folder.transformers_rules

    def _rows(self, src: torch.Tensor) -> list[list[int]]:
        return [[i for i in row if i != self.pad] for row in src.tolist()]

    def logits(self, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits row by row, unpadded (transformers' BART/mBART positions ignore padding); the
        padded positions stay zero."""
        rows = []
        with torch.no_grad():
            for i in range(src.size(0)):
                s = src[i][src[i].ne(self.pad)][None].to(self.device)
                p = prev[i][prev[i].ne(self.pad)][None].to(self.device)
                rows.append(self.model(input_ids=s, decoder_input_ids=p, use_cache=False).logits[0].float().cpu())
        out = torch.zeros(prev.size(0), prev.size(1), rows[0].size(-1))
        for i, r in enumerate(rows):
            out[i, : r.size(0)] = r
        return out

    def generate(self, src: torch.Tensor, options: dict, forced: int | None, max_positions: int) -> tuple[list, float]:
        """`generate()` on the batch, right-padded: each row's output as fairseq ids (without the decoder start
        token, up to its first EOS), and the time. `options` are verify's setting (fairseq names): only what a
        user passes is passed (num_beams for greedy; forced_bos_token_id and max_length where the card says)."""
        rows = self._rows(src)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        kwargs: dict = {}
        if options.get("beam", 5) != self.model.generation_config.num_beams:
            kwargs["num_beams"] = options["beam"]
        if forced is not None and forced != self.forced:
            kwargs["forced_bos_token_id"] = forced
        if options.get("max_len_a"):  # fairseq's length rule for this batch (padded source width)
            kwargs["max_length"] = min(int(options["max_len_a"] * src.size(1) + options.get("max_len_b", 200)),
                                       max_positions - 1) + 2
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        seconds = time.perf_counter() - t0
        hyps = []
        for row in out.tolist():
            row = row[1:]  # the decoder start token
            end = row.index(self.eos) + 1 if self.eos in row else len(row)
            hyps.append({"tokens": row[:end], "score": 0.0})
        return hyps, seconds

    def score(self, src: torch.Tensor, targets: list[list[int]], pad: int, eos: int) -> list[list[float]]:
        """Teacher-forced log-probabilities of each target's tokens (its EOS included), decoder start first."""
        out = []
        with torch.no_grad():
            for row, t in zip(self._rows(src), targets):
                prev = torch.tensor([[self.start] + t[:-1]], device=self.device)
                lp = torch.log_softmax(self.model(input_ids=torch.tensor([row], device=self.device),
                                                  decoder_input_ids=prev, use_cache=False).logits[0].float(), -1)
                out.append(lp.gather(-1, torch.tensor(t, device=self.device)[:, None]).squeeze(-1).cpu().tolist())
        return out
