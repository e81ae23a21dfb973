"""Logits parity: the reference (and transformers, where it reproduces the model) against fairseq,
run on the same left-padded batch of unequal lengths in the same test session."""

from __future__ import annotations

import pytest
import torch

from fairport.reference import fast, load
from fairport.validation.original.fixtures import FIXTURES
from fairport.validation.original.protocol import Logits, Predict, run
from fairport.validation.verify.inputs import random_batch
from helpers import HAVE_TRANSFORMERS, needs_fairseq

TOL = 1e-4


def fairseq_outputs(fixtures_dir, name, batch, heads=()):
    src = batch["src_tokens"]
    logits, *preds = run([fixtures_dir / name / "model.pt"], fixtures_dir / name,
                         Logits(src, batch["prev_output_tokens"]), *[Predict(src, h) for h in heads])
    return {"logits": logits.logits, **{f"predict.{h}": p for h, p in zip(heads, preds)}}


@needs_fairseq
@pytest.mark.parametrize("name", list(FIXTURES))
def test_reference_logits_match_fairseq(name, fixtures_dir, converted):
    model = load(converted(name), dtype=torch.float32)
    cfg = model.config
    batch = random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=5, seed=len(name))
    assert batch["src_tokens"].eq(cfg.pad).any(), "the batch must exercise left padding"
    ref = fairseq_outputs(fixtures_dir, name, batch, heads=list(cfg.classification_heads))
    packed = fast.pack(load(converted(name), dtype=torch.float32, pack=False), min_numel=0)  # the oneDNN path
    for m in (model, packed):
        with torch.no_grad():
            mine = m(batch["src_tokens"], batch["prev_output_tokens"])
        assert mine.shape == ref["logits"].shape
        keep = batch["prev_output_tokens"].ne(cfg.pad)
        assert (mine - ref["logits"]).abs()[keep].max().item() <= TOL
        for head in cfg.classification_heads:
            with torch.no_grad():
                pred = m.predict(head, batch["src_tokens"])
            assert (pred - ref[f"predict.{head}"]).abs().max().item() <= TOL


@needs_fairseq
def test_fixtures_cover_the_formats(fixtures_dir):
    """The fixture set has every checkpoint format the converter claims to read."""
    specs = FIXTURES.values()
    assert {s["format"] for s in specs} == {"args", "cfg", "cfg_plain"}
    assert any(s.get("legacy_names") for s in specs) and any(s.get("legacy_serialization") for s in specs)
    assert any(s.get("fp16") for s in specs) and any(s.get("head") for s in specs)
    assert {s["dicts"] for s in specs} == {"joined", "separate", "gpt2", "spm"}
    raw = (fixtures_dir / "iwslt_legacy_2019" / "model.pt").read_bytes()[:2]
    assert raw != b"PK", "the 2019 fixture must use torch's legacy (non-zip) serialization"


@needs_fairseq
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("name,family", [("bart_base_mnli", "bart"), ("mbart_cfg", "mbart"),
                                         ("wmt_big_joined", "fsmt"), ("wmt_separate_cfg_fp16", "fsmt"),
                                         ("iwslt_legacy_2019", "fsmt"), ("m2m_multilingual", "m2m_100"),
                                         ("mbart_en_ro_spm", "mbart"), ("mbart50_multilingual", "mbart")])
def test_transformers_logits_match_fairseq(name, family, fixtures_dir, converted):
    """transformers' BART/mBART use arange positions that ignore padding, so rows go one at a time,
    unpadded (see NOTES); FSMT needs use_cache=False for a causal teacher-forced forward."""
    import json

    from transformers import AutoModelForSeq2SeqLM

    folder = converted(name)
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    hf = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()  # its defaults, as users load it
    model = load(folder, dtype=torch.float32)
    cfg = model.config
    batch = random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=4, seed=7)
    ref = fairseq_outputs(fixtures_dir, name, batch)["logits"]
    for i in range(batch["src_tokens"].size(0)):
        src = batch["src_tokens"][i][batch["src_tokens"][i].ne(cfg.pad)][None]
        prev = batch["prev_output_tokens"][i][batch["prev_output_tokens"][i].ne(cfg.pad)][None]
        with torch.no_grad():
            logits = hf(input_ids=src, decoder_input_ids=prev, use_cache=False).logits
        assert (logits[0] - ref[i, :prev.size(1)]).abs().max().item() <= TOL


@needs_fairseq
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.25), (torch.float16, 0.05)])
def test_reduced_precision_paths_run_close_to_fp32(dtype, tol, converted):
    """The fp16/bf16 paths run on CPU and stay near the fp32 logits (tolerances per dtype)."""
    folder = converted("wmt_big_joined")
    fp32 = load(folder, dtype=torch.float32)
    batch = random_batch(fp32.config.src_vocab_size, fp32.config.tgt_vocab_size, seed=3)
    keep = batch["prev_output_tokens"].ne(fp32.config.pad)
    with torch.no_grad():
        a = fp32(batch["src_tokens"], batch["prev_output_tokens"])
    for low in (load(folder, dtype=dtype), fast.pack(load(folder, dtype=dtype, pack=False), min_numel=0)):
        assert next(low.parameters()).dtype == dtype
        with torch.no_grad():
            b = low(batch["src_tokens"], batch["prev_output_tokens"])
        assert b.dtype == dtype
        err = (a - b.float()).abs()[keep]
        assert torch.isfinite(err).all() and err.max().item() <= tol * a.abs()[keep].max().item()
