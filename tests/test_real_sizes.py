"""Conversion at the released architecture sizes without weights: fairseq builds bart.large, the WMT19 en-de
transformer and M2M-100 418M on the meta device, and the converter must map every tensor at the right shape."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fairport.converters.convert import convert_state, expected_shapes
from fairport.converters.hf import hf_family
from fairport.converters.sources import Sources
from helpers import needs_fairseq

DTYPES = {"torch.float32": torch.float32, "torch.float16": torch.float16}


def meta_checkpoint(folder, fp16=False):
    shapes = json.loads((folder / "shapes.json").read_text())
    args = argparse.Namespace(**json.loads((folder / "args.json").read_text()))
    model = {k: torch.empty(shape, dtype=torch.float16 if fp16 else DTYPES[dt], device="meta")
             for k, (shape, dt) in shapes.items()}
    for k in model:
        if k.endswith(".version"):  # fairseq's version markers are real (tiny) values: 3 for current models
            model[k] = torch.tensor([3.0])
    return {"args": args, "model": model}, shapes


@needs_fairseq
@pytest.mark.parametrize("name,family,layers,dim,ffn,heads,vocab", [
    ("bart.large", "bart", (12, 12), 1024, 4096, 16, 50265),
    ("wmt19.en-de", "fsmt", (6, 6), 1024, 8192, 16, 42024),
    ("m2m100_418M", "m2m_100", (12, 12), 1024, 4096, 16, 128104),
])
def test_real_size_conversion_shapes_and_coverage(name, family, layers, dim, ffn, heads, vocab, real_sizes_dir):
    folder = real_sizes_dir / name
    state, shapes = meta_checkpoint(folder, fp16=True)
    conv = convert_state(state, Sources(folder / "model.pt", folder))
    c = conv.config
    assert (c.encoder_layers, c.decoder_layers) == layers
    assert (c.encoder_embed_dim, c.encoder_ffn_dim, c.encoder_heads) == (dim, ffn, heads)
    assert c.src_vocab_size == c.tgt_vocab_size == vocab
    assert hf_family(c)[0] == family
    # every fairseq tensor is either mapped at its shape or dropped with a reason
    for k, (shape, _) in shapes.items():
        if k in conv.state_dict:
            assert list(conv.state_dict[k].shape) == shape, k
        else:
            assert k in conv.dropped or k in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"), k
    # and the reference model needs exactly what was mapped
    assert set(expected_shapes(c)) == set(conv.state_dict)
    assert all(t.dtype == torch.float16 for t in conv.state_dict.values())


@needs_fairseq
def test_m2m100_release_rows_pad_the_dictionary(real_sizes_dir):
    """The released M2M-100 418M embeddings have 128112 rows: fairseq's 128104 symbols (128000 + 4 specials
    + 100 languages) padded to a multiple of 8 with madeupwordNNNN, as transformers' M2M100 config has it."""
    folder = real_sizes_dir / "m2m100_418M"
    state, _ = meta_checkpoint(folder, fp16=True)
    w = state["model"]["encoder.embed_tokens.weight"]
    state["model"]["encoder.embed_tokens.weight"] = torch.empty(128112, w.shape[1], dtype=w.dtype, device="meta")
    conv = convert_state(state, Sources(folder / "model.pt", folder))
    assert conv.config.src_vocab_size == conv.config.tgt_vocab_size == 128112
    assert conv.dicts.src.symbols[-8:] == [f"madeupword{i:04d}" for i in range(8)]
    assert conv.dicts.multilingual.meta(conv.dicts.src)["tokens"]["l00"] == 128004
    assert hf_family(conv.config)[0] == "m2m_100"
