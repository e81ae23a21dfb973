"""The reference model without fairseq: tiny random configs, one per combination of ModelConfig's flags.

Where transformers reproduces the family (BART, mBART, FSMT, M2M-100), its model loaded with the same weights
(renamed by reference/names.py, as the converter stores them) gives the same logits. Every config is also
checked against itself: incremental decoding equals the full forward, the fused q/k/v, oneDNN-packed and int8
layers (reference/fast.py) equal or approach the plain model, an ensemble of one is the model. Runs in
seconds; fairseq parity is tests/test_parity.py's job.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fairport.converters import hf
from fairport.converters.weights import transformers_extras
from fairport.reference import fast
from fairport.reference.config import ModelConfig
from fairport.reference.ensemble import Ensemble
from fairport.reference.generate import generate
from fairport.reference.load import build, tied_names
from fairport.reference.model import EncoderDecoder, LayerCache
from fairport.reference.names import to_hf_name
from fairport.validation.verify.inputs import random_batch
from helpers import assert_close, needs_transformers

TINY = dict(src_vocab_size=60, tgt_vocab_size=60, encoder_embed_dim=32, encoder_ffn_dim=48, encoder_layers=2,
            encoder_heads=4, decoder_embed_dim=32, decoder_input_embed_dim=32, decoder_output_dim=32,
            decoder_ffn_dim=40, decoder_layers=2, decoder_heads=4, max_source_positions=64, max_target_positions=64)
POST, PRE = dict(encoder_normalize_before=False, decoder_normalize_before=False), \
    dict(encoder_normalize_before=True, decoder_normalize_before=True, encoder_final_norm=True, decoder_final_norm=True)
LEARNED = dict(encoder_learned_pos=True, decoder_learned_pos=True)
TIED = dict(share_all_embeddings=True, share_decoder_input_output_embed=True)

# name -> (ModelConfig flags, the transformers family that must reproduce it, or None)
CONFIGS = {
    "bart": ({**POST, **LEARNED, **TIED, "layernorm_embedding": True, "scale_embedding": False,
              "activation_fn": "gelu", "family": "bart"}, "bart"),
    "bart_scaled_relu": ({**POST, **LEARNED, **TIED, "layernorm_embedding": True, "activation_fn": "relu"}, "bart"),
    "mbart": ({**PRE, **LEARNED, **TIED, "layernorm_embedding": True, "activation_fn": "gelu"}, "mbart"),
    "fsmt_separate": ({**POST, "tgt_vocab_size": 50}, "fsmt"),
    "fsmt_joined": ({**POST, **TIED}, "fsmt"),
    "m2m_100": ({**PRE, **TIED, "activation_fn": "relu"}, "m2m_100"),
    # variants only the reference has
    "prenorm_no_final_norms": ({"encoder_normalize_before": True, "decoder_normalize_before": True}, None),
    "project_in_out": ({"decoder_input_embed_dim": 24, "decoder_output_dim": 24}, None),
    "no_positions": ({"positional_embeddings": False, **TIED, "activation_fn": "gelu_accurate"}, None),
    "decoder_tied_only": ({"share_decoder_input_output_embed": True, "activation_fn": "swish"}, None),
    "head_width_16": ({"encoder_heads": 2, "decoder_heads": 2, "layernorm_embedding": True}, None),
    "classification_head": ({**POST, **LEARNED, **TIED, "layernorm_embedding": True,
                             "classification_heads": {"mnli": {"inner_dim": 32, "num_classes": 3}}}, "bart"),
}


def tiny_model(name: str, seed: int = 0, **build_options) -> EncoderDecoder:
    """A reference model of config `name` with random weights (layer norms and biases too), built as load()
    builds one from a folder's tensors (`build_options`: build()'s, as load() passes them)."""
    cfg = ModelConfig(**{**TINY, **CONFIGS[name][0]})
    with torch.device("meta"):
        shapes = EncoderDecoder(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in shapes.items() if k not in tied_names(cfg)}
    for k in sd:
        if k.endswith("embed_tokens.weight"):
            sd[k][cfg.pad] = 0  # fairseq zeroes the padding row
    return build(cfg, sd.items(), **build_options)


def batch_for(model, seed=1):
    c = model.config
    return random_batch(c.src_vocab_size, c.tgt_vocab_size, batch=4, seed=seed)


def logits(model, batch):
    with torch.no_grad():
        return model(batch["src_tokens"], batch["prev_output_tokens"])


@needs_transformers
@pytest.mark.parametrize("name", [n for n, (_, family) in CONFIGS.items() if family])
def test_transformers_reproduces_the_families_it_has(name):
    """The reference's tensors, under transformers' names (as the converter stores them), loaded into
    transformers' class for the family: the same logits, row by row (transformers' BART positions ignore left
    padding, so each row goes unpadded)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    model = tiny_model(name)
    cfg = model.config
    family = CONFIGS[name][1]
    assert hf.hf_family(cfg)[0] == family
    fields = hf.hf_config(family, cfg, {"langs": ["src", "tgt"]})
    theirs = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(**fields)).eval()
    sd = {to_hf_name(family, k): v for k, v in model.state_dict().items() if to_hf_name(family, k) is not None}
    extra, _ = transformers_extras(sd, family, cfg)
    missing, unexpected = theirs.load_state_dict(sd | extra, strict=False)
    # BART's classification heads are kept for fairport's predict(); the seq2seq class has none
    assert all(k.startswith("classification_heads.") for k in unexpected), unexpected
    tied = ("embed_tokens.weight", "lm_head.weight", "embed_positions.weights", "output_projection.weight")
    assert all(k.endswith(tied) for k in missing), missing  # transformers ties these; nothing else left out
    theirs.tie_weights()
    batch = batch_for(model)
    mine = logits(model, batch)
    for i in range(batch["src_tokens"].size(0)):
        src = batch["src_tokens"][i][batch["src_tokens"][i].ne(cfg.pad)][None]
        prev = batch["prev_output_tokens"][i][batch["prev_output_tokens"][i].ne(cfg.pad)][None]
        with torch.no_grad():
            out = theirs(input_ids=src, decoder_input_ids=prev, use_cache=False).logits[0]
        assert_close(out, mine[i, : prev.size(1)], 1e-4, f"{name} row {i}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_equals_the_full_forward(name):
    """Feeding the target one token at a time through the layer caches gives, at every step, the logits the
    full (teacher-forced) forward gives at that position."""
    model = tiny_model(name)
    batch = batch_for(model)
    src, prev = batch["src_tokens"], batch["prev_output_tokens"]
    prev = prev.masked_fill(prev.eq(model.config.pad), 5)  # incremental decoding has no target padding
    with torch.no_grad():
        full = model(src, prev)
        tol = 1e-5 * max(1.0, full.abs().max().item())  # fp32 rounding, relative to the logits' scale
        enc = model.encoder(src)
        caches = [LayerCache() for _ in model.decoder.layers]
        for t in range(prev.size(1)):
            step = model.decoder(prev[:, t: t + 1], enc, caches, t)
            assert_close(step[:, 0], full[:, t], tol, f"{name} step {t}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_paths_equal_the_plain_model(name):
    """fuse_qkv and pack change how products are computed, not what they compute; int8 stays near."""
    plain = tiny_model(name)
    batch = batch_for(plain)
    want = logits(plain, batch)
    tol = 1e-5 * max(1.0, want.abs().max().item())  # fp32 rounding, relative to the logits' scale
    fused = fast.fuse_qkv(tiny_model(name))
    assert not any(hasattr(layer.self_attn, "q_proj") for layer in fused.encoder.layers)
    assert_close(logits(fused, batch), want, tol, f"{name} fused")
    packed = fast.pack(fast.fuse_qkv(tiny_model(name)), min_numel=0)
    assert fast.packed(packed) or not fast.onednn_available()
    assert_close(logits(packed, batch), want, tol, f"{name} packed")
    assert_close(logits(fast.unpack(packed), batch), want, tol, f"{name} unpacked again")
    if fast.int8_available():
        int8 = fast.quantize(fast.fuse_qkv(tiny_model(name)))
        assert fast.quantized(int8) and not any(type(m) is nn.Linear for m in int8.modules())
        assert_close(logits(int8, batch), want, 0.1 * want.abs().max().item(), f"{name} int8")


@pytest.mark.skipif(not fast.int8_available(), reason="this torch has no quantized dynamic linear")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["fsmt_separate", "fsmt_joined", "decoder_tied_only", "project_in_out"])
def test_int8_load_equals_quantizing_the_loaded_model(name, threads):
    """load(dtype="int8") quantizes each layer as it is read, on `threads` threads, the token embeddings too (a
    tied output projection from the float32 table first): the same model as quantize() of the float32 one,
    exactly, with no float32 matrix or table left and shared embeddings still shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded = tiny_model(name, fuse=True, finish=fast.Int8Linear, int8_embeddings=True)
    finally:
        torch.set_num_threads(before)
    quantized = fast.quantize(fast.fuse_qkv(tiny_model(name)))
    batch = batch_for(quantized)
    assert torch.equal(logits(loaded, batch), logits(quantized, batch))
    for model in (loaded, quantized):
        assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
        assert all(p.dim() == 1 for p in model.parameters())  # layer norms only: no float32 matrix is kept
        enc, dec = model.encoder.embed_tokens, model.decoder.embed_tokens
        assert isinstance(dec, fast.Int8Embedding) and (enc is dec) == model.config.share_all_embeddings
        assert dec.qweight.dtype == torch.int8 and not dec.qweight[model.config.pad].any()
    plain = tiny_model(name)
    assert_close(logits(loaded, batch), logits(plain, batch), 0.1 * logits(plain, batch).abs().max().item(), name)


@pytest.mark.parametrize("name", ["fsmt_joined", "mbart"])
def test_an_ensemble_of_one_is_the_model(name):
    model = tiny_model(name)
    batch = batch_for(model)
    ensemble = Ensemble([model])
    assert_close(ensemble(batch["src_tokens"], batch["prev_output_tokens"]),
                 torch.log_softmax(logits(model, batch).float(), dim=-1), 1e-6, "ensemble forward")
    for options in (dict(beam=1, max_len_b=8), dict(beam=3, max_len_b=8, lenpen=1.3)):
        ours = generate(ensemble, batch["src_tokens"], **options)
        theirs = generate(model, batch["src_tokens"], **options)
        assert [[h["tokens"].tolist() for h in s] for s in ours] == [[h["tokens"].tolist() for h in s] for s in theirs]


def test_search_trace_records_each_step_of_the_search():
    """generate(trace=...) records, per step, the rows entering the step and the 2*beam candidates chosen from
    them, in the form the original's worker records fairseq's search (verify/mismatch.py reads both)."""
    model = tiny_model("fsmt_joined")
    src = batch_for(model)["src_tokens"]
    trace: list = []
    hyps = generate(model, src, trace=trace, beam=3, max_len_b=6, min_len=6)
    assert len(trace) == 7  # one record per step: max_len + 1 (the last only allows EOS)
    for t, rec in enumerate(trace):
        assert rec["prev"].shape == (src.size(0) * 3, t + 1) and rec["cand_scores"].shape == (src.size(0), 6)
        assert torch.equal(rec["sentences"], torch.arange(src.size(0)))
        assert (rec["cand_scores"][:, :-1] >= rec["cand_scores"][:, 1:]).all()  # ranked
    assert all(len(h[0]["tokens"]) == 7 for h in hyps)


def test_classification_head_reads_the_last_eos_state():
    model = tiny_model("classification_head")
    src = batch_for(model)["src_tokens"]
    out = model.predict("mnli", src)
    assert out.shape == (src.size(0), 3) and torch.isfinite(out).all()
    with pytest.raises(KeyError, match="no classification head 'sst'"):
        model.predict("sst", src)


def test_configs_cover_every_flag():
    """Each boolean flag of ModelConfig is on in some config and off in another (the combinations tested)."""
    flags = [f.name for f in dataclasses.fields(ModelConfig) if f.type in (bool, "bool")]
    seen = {flag: {ModelConfig(**{**TINY, **spec}).__dict__[flag] for spec, _ in CONFIGS.values()} for flag in flags}
    assert all(values == {True, False} for values in seen.values()), {k: v for k, v in seen.items() if len(v) < 2}
