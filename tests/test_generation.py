"""Generation parity against fairseq's SequenceGenerator, run on the same inputs in the same session:
tokens identical, scores within 1e-4."""

from __future__ import annotations

import pytest
import torch

from fairport.reference import fast, load
from fairport.reference.batching import pad_batch
from fairport.reference.dictionary import Dictionary
from fairport.reference.ensemble import Ensemble
from fairport.validation.original.protocol import Generate, run
from fairport.validation.verify.inputs import random_batch
from helpers import needs_fairseq

SCORE_TOL = 1e-4

CASES = {
    "greedy": dict(beam=1),
    "beam4": dict(beam=4),
    "beam5": dict(beam=5),
    "lenpen": dict(beam=5, lenpen=0.6),
    "lenpen_long": dict(beam=4, lenpen=2.0, min_len=6),
    "min_max_len": dict(beam=4, min_len=4, max_len_b=7),
    "max_len_a": dict(beam=4, max_len_a=1.2, max_len_b=2),
    "unkpen": dict(beam=4, unkpen=-3.0),
    "ngram": dict(beam=4, no_repeat_ngram_size=2),
    "sampling_topk": dict(beam=3, sampling=True, sampling_topk=5),
    "sampling_topp": dict(beam=2, sampling=True, sampling_topp=0.7, temperature=0.8),
    "sampling_plain": dict(beam=1, sampling=True, temperature=1.5),
}
SEED = 11


def load_packed(folder):
    """Every linear weight packed for oneDNN (load() packs only large ones; these fixtures are tiny)."""
    return fast.pack(load(folder, pack=False), min_numel=0)


def assert_same(mine, theirs):
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert len(a) == len(b), f"sentence {i}: {len(a)} vs {len(b)} hypotheses"
        for h, (x, y) in enumerate(zip(a, b)):
            assert x["tokens"].tolist() == y["tokens"].tolist(), f"sentence {i} hypothesis {h}"
            assert abs(float(x["score"]) - float(y["score"])) <= SCORE_TOL
            assert (x["positional_scores"] - y["positional_scores"]).abs().max().item() <= SCORE_TOL


def source_batch(folder, n=12):
    d = Dictionary.load(folder / "dict.en.txt")
    lines = (folder / "test.en").read_text().splitlines()[:n]
    return pad_batch([[d.index(w) for w in line.split()] + [d.eos] for line in lines], d.pad, left=True)


@needs_fairseq
def test_trained_fixture_ends_hypotheses_at_varied_lengths(trained_converted, trained_dir):
    model = load(trained_converted / "single")
    hyps = model.generate(source_batch(trained_dir), beam=4)
    lengths = {len(h[0]["tokens"]) for h in hyps}
    assert len(lengths) >= 4, lengths
    assert all(h[0]["tokens"][-1].item() == model.config.eos for h in hyps)


@needs_fairseq
@pytest.mark.parametrize("case", list(CASES))
def test_generation_matches_fairseq(case, trained_converted, fairseq_generations):
    src, out = fairseq_generations
    model = load_packed(trained_converted / "single")
    mine = model.generate(src, seed=SEED, **CASES[case])
    assert_same(mine, out[case])


@needs_fairseq
def test_ensemble_of_two_matches_fairseq(trained_converted, trained_dir):
    src = source_batch(trained_dir)
    ens = load_packed(trained_converted / "ensemble")
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    [out] = run([trained_dir / "model.pt", trained_dir / "model2.pt"], trained_dir,
                Generate(src, {"beam": 4, "lenpen": 1.2}))
    assert_same(ens.generate(src, beam=4, lenpen=1.2), out.hypotheses)


@needs_fairseq
def test_installed_fairseq_ngram_fallback_never_blocks(trained_dir):
    """The deviation fairport corrects: fairseq 0.12's Python fallback returns exactly what no blocking
    returns, while the corrected blocking (0.10.2 / CUDA kernel behaviour) changes the output."""
    src = source_batch(trained_dir)
    none, bug = (r.hypotheses for r in run(
        [trained_dir / "model.pt"], trained_dir,
        Generate(src, {"beam": 4, "max_len_b": 30}, fixed_ngram_blocking=False),
        Generate(src, {"beam": 4, "max_len_b": 30, "no_repeat_ngram_size": 2}, fixed_ngram_blocking=False)))
    assert [[h["tokens"].tolist() for h in s] for s in none] == [[h["tokens"].tolist() for h in s] for s in bug]
    [out] = run([trained_dir / "model.pt"], trained_dir,
                Generate(src, {"beam": 4, "max_len_b": 30, "no_repeat_ngram_size": 2}, fixed_ngram_blocking=True))
    fixed = out.hypotheses
    assert [[h["tokens"].tolist() for h in s] for s in fixed] != [[h["tokens"].tolist() for h in s] for s in none]
    for sent in fixed:  # bigram blocking: no bigram twice (the start token </s> counts, as in fairseq)
        toks = [2] + sent[0]["tokens"].tolist()
        bigrams = list(zip(toks, toks[1:]))
        assert len(bigrams) == len(set(bigrams))


@needs_fairseq
@pytest.mark.parametrize("name", ["bart_base_mnli", "mbart_cfg", "t2t_prenorm_old_decoder", "wmt_separate_cfg_fp16"])
def test_prefix_forcing_and_random_fixtures(name, fixtures_dir, converted):
    """BART's hub forces <s> first and scores it; random-weight fixtures cover the other architectures."""
    model = load(converted(name), dtype=torch.float32)
    cfg = model.config
    src = random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=4, seed=5)["src_tokens"]
    prefix = torch.full((src.size(0), 1), cfg.bos)
    opts = {"beam": 4, "max_len_b": 9, "lenpen": 1.3}
    [out] = run([fixtures_dir / name / "model.pt"], fixtures_dir / name, Generate(src, opts, prefix=prefix))
    mine = model.generate(src, prefix_tokens=prefix, **opts)
    assert all(h["tokens"][0].item() == cfg.bos for s in mine for h in s)
    assert_same(mine, out.hypotheses)


@needs_fairseq
def test_cached_decoding_equals_full_recompute(trained_converted, trained_dir):
    """The incremental cache is an optimisation only: greedy decoding without it gives the same tokens."""
    model = load_packed(trained_converted / "single")
    src = source_batch(trained_dir, n=6)
    hyps = model.generate(src, beam=1, max_len_b=20)
    with torch.no_grad():
        enc = model.encoder(src)
        prev = torch.full((src.size(0), 1), model.config.eos)
        done = torch.zeros(src.size(0), dtype=torch.bool)
        for _ in range(21):
            logits = model.decoder(prev, enc)[:, -1, :].float()
            logits[:, model.config.pad] = -float("inf")
            nxt = logits.argmax(-1).masked_fill(done, model.config.pad)
            prev = torch.cat([prev, nxt[:, None]], dim=1)
            done |= nxt.eq(model.config.eos)
            if done.all():
                break
    for i, h in enumerate(hyps):
        toks = prev[i, 1:][prev[i, 1:].ne(model.config.pad)].tolist()
        assert toks == h[0]["tokens"].tolist()


@needs_fairseq
@pytest.mark.parametrize("case", ["greedy", "beam5", "ngram", "sampling_topk"])
def test_unpacked_path_matches_fairseq(case, trained_converted, fairseq_generations):
    """torch's default matrix products (CUDA, fp16, or load(pack=False)) give fairseq's output too."""
    src, out = fairseq_generations
    model = load(trained_converted / "single", pack=False)
    assert not fast.packed(model)
    assert_same(model.generate(src, seed=SEED, **CASES[case]), out[case])


@needs_fairseq
def test_packed_layers_hold_only_their_packed_copy(trained_converted):
    """A packed layer keeps no float32 weight beside its oneDNN copy; the exact weight comes back from it (by an
    identity product), so products and unpack() are exact; moving a packed model is refused in one line."""
    import torch.nn.functional as F

    from fairport.errors import FairportError
    from fairport.reference.fast import PackedLinear

    plain = load(trained_converted / "single", pack=False)
    model = load_packed(trained_converted / "single")
    assert not fast.packed(load(trained_converted / "single"))  # small: not worth packing
    layer, ref = model.decoder.layers[0], plain.decoder.layers[0]
    fc1, attn = layer.fc1, layer.self_attn
    assert isinstance(fc1, PackedLinear) and isinstance(attn.qkv_proj, PackedLinear)
    assert [n for n, _ in fc1.named_parameters()] == ["bias"]  # no float32 weight kept beside the packed one
    assert not hasattr(attn, "q_proj")  # fused into qkv_proj: q/k/v are one matrix, packed once
    assert torch.equal(fc1.weight(), ref.fc1.weight)
    x = torch.randn(5, ref.fc1.in_features, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fc1(x), F.linear(x, ref.fc1.weight, ref.fc1.bias), atol=1e-5)
    with pytest.raises(FairportError, match="stays on the CPU"):
        model.to(torch.bfloat16)
    fast.unpack(model)
    assert type(model.decoder.layers[0].fc1) is torch.nn.Linear
    assert torch.equal(model.decoder.layers[0].fc1.weight, ref.fc1.weight)
    fused = model.decoder.layers[0].self_attn.qkv_proj
    assert torch.equal(fused.weight, plain.decoder.layers[0].self_attn.qkv_proj.weight)


def test_int8_weights(trained_converted, trained_dir):
    """int8: every linear layer multiplies through int8 weights only (its float32 copy released), every token
    embedding is int8 rows and scales, the product stays within int8's error of the fp32 one, and a model that
    cannot hold int8 says so."""
    import torch.nn.functional as F

    from fairport.errors import FairportError
    from fairport.reference.fast import Int8Linear

    fp32 = load(trained_converted / "single")
    model = load(trained_converted / "single", dtype="int8")
    assert fast.quantized(model) and not fast.packed(model)
    for name, m in model.named_modules():
        assert type(m) is not torch.nn.Linear, f"{name} was not quantized"
        if isinstance(m, Int8Linear):
            assert not list(m.parameters()), f"{name} kept a float32 weight"
    for side in (model.encoder, model.decoder):
        assert isinstance(side.embed_tokens, fast.Int8Embedding), "a token embedding stayed float32"
    layer, ref = model.decoder.layers[0], fp32.decoder.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear)
    x = torch.randn(7, ref.fc1.in_features, generator=torch.Generator().manual_seed(0))
    exact = F.linear(x, ref.fc1.weight, ref.fc1.bias)
    err = (layer.fc1(x) - exact).abs().max().item()
    assert 0 < err <= 0.02 * exact.abs().max().item()  # quantized (not the fp32 product), and close to it
    src = source_batch(trained_dir, n=6)
    prev = torch.cat([torch.full((6, 1), 2), src[:, :-1].clamp(min=4)], dim=1)
    with torch.no_grad():
        a, b = fp32(src, prev), model(src, prev)
    assert (a - b).abs().max().item() <= 0.1 * a.abs().max().item()
    assert len(model.generate(src, beam=3)) == 6
    with pytest.raises(FairportError, match="int8 model stays on the CPU in float32"):
        model.to(torch.bfloat16)
    with pytest.raises(FairportError, match="int8 needs the model on the CPU in float32"):
        fast.quantize(load(trained_converted / "single", dtype="bfloat16"))


def test_generate_returns_ordinary_tensors(trained_converted, trained_dir):
    """generate() runs under inference_mode, but what it returns can be edited and used like any tensor."""
    hyps = load(trained_converted / "single").generate(source_batch(trained_dir, n=3), beam=2)
    for h in (h for sentence in hyps for h in sentence):
        assert not any(v.is_inference() for v in h.values())
        h["positional_scores"].add_(0.0)  # in place: refused on an inference tensor outside inference mode


def test_attention_scale_inside_the_kernel_gives_fairseqs_bits():
    """fairseq multiplies q by the scale before q.k; for a power-of-two scale the reference lets SDPA scale
    q.k instead (one multiplication fewer): the same bits, in fp32 and bf16, masked or not."""
    import torch.nn.functional as F

    from fairport.reference.model import Attention

    g = torch.Generator().manual_seed(0)
    for dim, heads, power_of_two in ((64, 4, True), (256, 4, True), (128, 4, False), (96, 3, False)):
        attn = Attention(dim, heads)
        assert attn.scale_in_kernel == power_of_two
        if not power_of_two:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(6, heads, n, dim // heads, generator=g).to(dtype) for n in (3, 9, 9))
            mask = torch.zeros(6, 1, 1, 9, dtype=dtype)
            mask[:2, ..., :4] = float("-inf")
            for m in (None, mask):
                fairseq_way = F.scaled_dot_product_attention(q * attn.scaling, k, v, attn_mask=m, scale=1.0)
                assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=attn.scaling),
                                   fairseq_way)


def test_layer_cache_equals_concatenate_and_reorder():
    """The preallocated cache (in-place writes, spare-buffer reorders, growth, batch shrinking) holds what
    fairseq's concatenate-then-index_select holds."""
    from fairport.reference.model import LayerCache

    g = torch.Generator().manual_seed(0)
    cache, k_ref, v_ref = LayerCache(), None, None
    rows = 6
    for step in range(75):
        if step and step % 3 == 0:
            order = torch.randint(0, rows, (rows,), generator=g)
            if step == 45:  # sentences leave the batch
                rows = 4
                order = order[:rows]
            cache.reorder(order)
            k_ref, v_ref = k_ref.index_select(0, order), v_ref.index_select(0, order)
        T = 2 if step == 10 else 1
        k, v = torch.randn(rows, 3, T, 5, generator=g), torch.randn(rows, 3, T, 5, generator=g)
        k_ref = k if k_ref is None else torch.cat([k_ref, k], dim=2)
        v_ref = v if v_ref is None else torch.cat([v_ref, v], dim=2)
        got_k, got_v = cache.append(torch.stack([k, v], dim=2).transpose(1, 3))  # (rows, T, 2, 3, 5)
        assert torch.equal(got_k, k_ref) and torch.equal(got_v, v_ref), step
