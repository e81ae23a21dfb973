"""Batches laid out as fairseq lays them out: sources left-padded, targets right-padded."""

from __future__ import annotations

import torch


def pad_batch(seqs: list[list[int]], pad: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s):] = torch.tensor(s)
        else:
            out[i, :len(s)] = torch.tensor(s)
    return out
