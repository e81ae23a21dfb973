"""The compiled decoder step (reference/compiled.py) against fairseq and against the eager reference, on the same
inputs in the same session: identical tokens, scores within the generation tolerance. Each compiled model costs
one compilation (~30 s here), so the models are session fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_generation import CASES, SEED, assert_same, source_batch

import helpers
from fairport.reference import compiled, load
from fairport.validation.original.protocol import Generate, run
from fairport.validation.verify.inputs import random_batch
from helpers import needs_fairseq, run_cli


@pytest.fixture(scope="session")
def compiled_single(trained_converted):
    model = load(trained_converted / "single", compile=True)
    assert model.compiled_step is not None
    return model


@needs_fairseq
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_matches_fairseq(case, compiled_single, fairseq_generations):
    """Every search fairseq offers, on the trained fixture whose hypotheses end at varied lengths: sentences
    leave the batch and beams reorder the fixed caches."""
    src, out = fairseq_generations
    assert_same(compiled_single.generate(src, seed=SEED, **CASES[case]), out[case])


@needs_fairseq
@pytest.mark.parametrize("options", [dict(beam=1), dict(beam=5, lenpen=0.6), dict(beam=4, max_len_b=3)],
                         ids=["greedy", "beam5", "short"])
def test_compiled_step_equals_the_eager_reference(options, compiled_single, trained_converted, trained_dir):
    eager = load(trained_converted / "single", pack=False)
    for n in (1, 5, 12):  # one row (specialised sizes stay dynamic), some padding, the whole batch
        src = source_batch(trained_dir, n=n)
        mine, ref = compiled_single.generate(src, **options), eager.generate(src, **options)
        assert [[h["tokens"].tolist() for h in s] for s in mine] == [[h["tokens"].tolist() for h in s] for s in ref]
        for a, b in zip(mine, ref):
            for x, y in zip(a, b):
                assert (x["positional_scores"] - y["positional_scores"]).abs().max().item() <= 1e-5


OTHER_ARCHITECTURES = ["bart_base_mnli", "mbart_cfg"]


@pytest.fixture(scope="module")
def other_architectures_compiled(converted) -> None:
    """Both models' steps compiled at once, a process each (a compilation is mostly one core), into the session's
    cache, from which the tests' loads take them."""
    import subprocess
    import sys

    code = ("import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\nfrom fairport.reference import load\n"
            "load(sys.argv[2], compile=True)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(torch.get_num_threads()), str(converted(name))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for name in OTHER_ARCHITECTURES]
    for proc in procs:
        _, stderr = proc.communicate(timeout=helpers.PROCESS_TIMEOUT)
        assert proc.returncode == 0, stderr[-2000:]


@needs_fairseq
@pytest.mark.parametrize("name", OTHER_ARCHITECTURES)
def test_compiled_step_on_other_architectures(name, fixtures_dir, converted, other_architectures_compiled):
    """Learned positions, an embedding layer norm, GELU, pre-norm with final norms, BART's forced <s>."""
    model = load(converted(name), compile=True)
    assert model.compiled_step.from_cache  # compiled by the fixture, as a later process would find it
    cfg = model.config
    src = random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=4, seed=5)["src_tokens"]
    prefix = torch.full((src.size(0), 1), cfg.bos)
    opts = {"beam": 4, "max_len_b": 9, "lenpen": 1.3}
    [out] = run([fixtures_dir / name / "model.pt"], fixtures_dir / name, Generate(src, opts, prefix=prefix))
    assert_same(model.generate(src, prefix_tokens=prefix, **opts), out.hypotheses)


@needs_fairseq
def test_generate_compile_writes_the_eager_output(trained_converted, trained_dir, tmp_path):
    lines = (trained_dir / "test.en").read_text().splitlines()[:8]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    outs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"out{len(flag)}.txt"
        proc = run_cli("generate", trained_converted / "single", "--input", tmp_path / "in.txt", "--output", out,
                       "--beam", "4", "--quiet", *flag)
        assert proc.returncode == 0, proc.stderr
        outs[len(flag)] = out.read_text()
    assert outs[1] == outs[0] and len(outs[0].splitlines()) == len(lines)


def test_packed_and_int8_layers_are_refused(tmp_path):
    from fairport.errors import FairportError
    from fairport.reference import fast
    from fairport.reference.config import ModelConfig
    from fairport.reference.model import EncoderDecoder

    cfg = ModelConfig(src_vocab_size=20, tgt_vocab_size=20, encoder_embed_dim=8, encoder_ffn_dim=16, encoder_layers=1,
                      encoder_heads=2, decoder_embed_dim=8, decoder_input_embed_dim=8, decoder_output_dim=8,
                      decoder_ffn_dim=16, decoder_layers=1, decoder_heads=2)
    model = fast.quantize(EncoderDecoder(cfg).eval().requires_grad_(False))
    with pytest.raises(FairportError, match="plain layers"):
        compiled.compile_step(model)


@needs_fairseq
def test_verify_checks_the_compiled_step(trained_dir, trained_converted, tmp_path):
    from fairport.validation.verify.run import VerifyOptions, verify

    rep = verify(trained_dir, trained_converted / "single", VerifyOptions(
        limit=8, fairseq_data=trained_dir / "bin", compile=True, out=tmp_path / "verify", progress=False))
    assert rep.passed
    assert any("compiled decoder step" in n for n in rep.sections["notes"])


# between them, every ModelConfig flag the decoder step reads (sinusoidal positions: the fairseq tests above)
STEP_FLAGS = {
    "learned-positions-layernorm-embedding-projected-post-norm": dict(
        decoder_learned_pos=True, layernorm_embedding=True, decoder_input_embed_dim=12, decoder_output_dim=20,
        scale_embedding=False, activation_fn="gelu", share_all_embeddings=False,
        share_decoder_input_output_embed=False, decoder_layers=2),
    "no-positions-pre-norm-final-norm-tied-output": dict(
        positional_embeddings=False, decoder_normalize_before=True, decoder_final_norm=True),
}
# the product search (CPU_OPTIONS' max_autotune) left out: the same computation, compiled in ~15 s instead of ~30
OPTIONS = {"freezing": True}
# one process compiles every folder named on its command line (each kept in the cache), and generates with it
COMPILE_AND_GENERATE = f"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from fairport.reference import compiled, load
options = {OPTIONS!r}
for folder in sys.argv[2:]:
    m = compiled.compile_step(load(folder, pack=False), options=options)
    hyps = m.generate(torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 12, 2]]), beam=3, max_len_b=6)
    again = compiled.compile_step(load(folder, pack=False), options=options)  # this process's second load
    print(json.dumps({{"cached": m.compiled_step.from_cache, "tokens": [h[0]["tokens"].tolist() for h in hyps],
                      "again_cached": again.compiled_step.from_cache}}))
"""


def start_compiling(root: Path) -> tuple:
    """For each of STEP_FLAGS, `root/NAME/port`: a small checkpoint in fairseq's format with those flags,
    converted; and a process started that compiles their steps (kept in `root/cache`) and generates. conftest
    starts it when the session's tests are collected, so it compiles while the other tests run (one
    compilation at a time, one compiler thread: mostly one core). Returns (root, process)."""
    import os
    import subprocess
    import sys

    from helpers import tiny_checkpoint

    for name, flags in STEP_FLAGS.items():
        proc = run_cli("convert", tiny_checkpoint(root / name / "release", **flags), root / name / "port")
        assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "FAIRPORT_CACHE": str(root / "cache"), "PYTHONWARNINGS": "ignore",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    args = [str(torch.get_num_threads()), *(str(root / name / "port") for name in STEP_FLAGS)]
    return root, subprocess.Popen([sys.executable, "-c", COMPILE_AND_GENERATE, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def compiled_once(request, tmp_path_factory) -> tuple:
    """(root, {name of STEP_FLAGS: what the process that compiled its step printed})."""
    root, proc = getattr(request.config, "compiling_ahead", None) or start_compiling(tmp_path_factory.mktemp("c"))
    stdout, stderr = proc.communicate(timeout=helpers.PROCESS_TIMEOUT)
    assert proc.returncode == 0, stderr
    return root, dict(zip(STEP_FLAGS, map(json.loads, stdout.strip().splitlines()[-len(STEP_FLAGS):])))


@pytest.mark.parametrize("name", STEP_FLAGS)
def test_the_compiled_step_is_compiled_once_and_computes_the_eager_step(name, compiled_once, monkeypatch):
    """fairseq-free, on a small checkpoint in fairseq's format with these flags. A first process compiled the
    step and generated; this process loads the step that one kept in the cache (keyed by the folder's hashes,
    the versions, the processor, dtype and threads) instead of compiling it; the compiled state and the eager
    state (generate.StepState both) give the same log-probabilities step after step, through a beam reorder and
    a sentence leaving the batch, and the eager search the first process's tokens. The first process's own
    second load of the folder was found in the cache as well (the compiler once changed the options it was given,
    and so the key). A folder whose weights changed compiles again."""
    from fairport.reference.generate import DecoderState
    from helpers import rewrite_weights

    root, printed = compiled_once
    folder, cache, first = root / name / "port", root / "cache", printed[name]
    assert not first["cached"] and first["again_cached"]  # a second load in the compiling process finds it too
    assert len(list((cache / "compiled").glob("*.pt2"))) == len(STEP_FLAGS)

    monkeypatch.setenv("FAIRPORT_CACHE", str(cache))
    model = compiled.compile_step(load(folder, pack=False), options=OPTIONS)
    assert model.compiled_step.from_cache
    eager = load(folder, pack=False)
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 12, 2]])
    assert [h[0]["tokens"].tolist() for h in eager.generate(src, beam=3, max_len_b=6)] == first["tokens"]

    cfg = model.config
    torch.manual_seed(0)
    src = torch.randint(4, cfg.src_vocab_size, (3, 7))
    src[:, -1] = cfg.eos
    src[0, :2] = cfg.pad  # left-padded
    beam, steps = 2, 6
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        states = [DecoderState(eager, src), model.compiled_step.state(src, src.size(0) * beam, steps)]
        tokens = torch.full((src.size(0) * beam, 1), cfg.eos)
        for t in range(steps):
            if t == 2:  # each sentence's two beams swap
                order = torch.tensor([1, 0, 3, 2, 5, 4])
                for s in states:
                    s.reorder(order)
            if t == 4:  # the second sentence finished: its rows leave
                for s in states:
                    s.keep_sentences(torch.tensor([0, 2]))
                    s.reorder(torch.tensor([0, 1, 4, 5]))
                tokens = tokens[torch.tensor([0, 1, 4, 5])]
            expected, mine = (s.step(tokens, t, 1.0) for s in states)
            assert (expected - mine).abs().max() < 1e-5, (t, (expected - mine).abs().max())
            tokens = torch.randint(4, cfg.tgt_vocab_size, (tokens.size(0), 1), generator=g)

    key = compiled.cache_key(eager, OPTIONS)
    rewrite_weights(folder, lambda w: w["decoder.layers.0.fc1.weight"].mul_(1.01))
    assert compiled.cache_key(load(folder, pack=False), OPTIONS) != key  # compiled again
