"""Models that share dictionaries, decoded together as fairseq's EnsembleModel does (generate.py sees an
ensemble by its `.members`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fairport.reference.model import EncoderDecoder


class Ensemble(nn.Module):
    def __init__(self, models: list[EncoderDecoder]):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.config = models[0].config

    def forward(self, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, V) log of the members' mean probabilities (what the ensemble scores tokens with)."""
        lps = [torch.log_softmax(m(src_tokens, prev_output_tokens).float(), dim=-1) for m in self.members]
        return torch.logsumexp(torch.stack(lps), dim=0) - math.log(len(lps))
