"""The compiled decoder step (reference/compiled.py) against fairseq and against the eager reference, on the same
inputs in the same session: identical tokens, scores within the generation tolerance. Each compiled model costs
one compilation (~30 s here), so the models are session fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from test_compiled_cache import OPTIONS
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
    cache, from which the tests' loads take them. Compiled with test_compiled_cache.OPTIONS, which leave out the
    default options' GEMM search (compiled_single compiles with the defaults)."""
    import subprocess
    import sys

    code = ("import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\n"
            "from fairport.reference import compiled, load\n"
            f"compiled.compile_step(load(sys.argv[2], pack=False), options={OPTIONS!r})")
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
    model = compiled.compile_step(load(converted(name), pack=False), options=OPTIONS)
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
