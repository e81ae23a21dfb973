"""Token batches laid out as fairseq lays them out: sources left-padded, targets right-padded."""

from __future__ import annotations

import torch

from fairport.reference.batching import pad_batch  # noqa: F401  (re-exported for tests and tools)


def random_batch(src_vocab: int, tgt_vocab: int, batch: int = 5, min_len: int = 2, max_len: int = 14,
                 pad: int = 1, eos: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid ids (specials excluded), unequal lengths. Sources end in </s>; decoder inputs start
    with </s> (fairseq's prev_output_tokens); `target` is the matching right-padded reference."""
    g = torch.Generator().manual_seed(seed)
    src, prev, tgt = [], [], []
    for i in range(batch):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        m = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        s = torch.randint(4, src_vocab, (n,), generator=g).tolist()
        t = torch.randint(4, tgt_vocab, (m,), generator=g).tolist()
        src.append(s + [eos])
        prev.append([eos] + t)
        tgt.append(t + [eos])
    return {"src_tokens": pad_batch(src, pad, left=True), "prev_output_tokens": pad_batch(prev, pad, left=False),
            "target": pad_batch(tgt, pad, left=False)}
