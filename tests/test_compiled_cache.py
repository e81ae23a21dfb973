"""The compiled decoder step kept for later processes, and equal to the eager step, fairseq-free: on small
checkpoints in fairseq's format whose flags between them set every ModelConfig flag the step reads. The
compilations start when the session's tests are collected (conftest) and these tests run last, so the compiler
works while the other tests run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers
from fairport.reference import compiled, load
from helpers import run_cli

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


COMPILED_AHEAD = "compiled-ahead"  # conftest.SESSION / this: the compilations started at collection


def start_compiling(root: Path):
    """For each of STEP_FLAGS, `root/NAME/port`: a small checkpoint in fairseq's format with those flags,
    converted; and a process started that compiles their steps (kept in `root/cache`) and generates. conftest
    starts it when the session's tests are collected, so it compiles while the other tests run (one
    compilation at a time, one compiler thread: mostly one core). What it prints goes to `root/stdout` and
    `root/stderr`, and its exit status to `root/returncode` when it ends, where any of the session's
    processes finds them. Returns the process, or None when `root` existed (started already)."""
    import os
    import subprocess
    import sys
    import threading

    from helpers import tiny_checkpoint

    try:
        root.mkdir()
    except FileExistsError:  # another of the session's processes started them
        return None
    for name, flags in STEP_FLAGS.items():
        proc = run_cli("convert", tiny_checkpoint(root / name / "release", **flags), root / name / "port")
        assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "FAIRPORT_CACHE": str(root / "cache"), "PYTHONWARNINGS": "ignore",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    args = [str(torch.get_num_threads()), *(str(root / name / "port") for name in STEP_FLAGS)]
    with open(root / "stdout", "w") as out, open(root / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", COMPILE_AND_GENERATE, *args], stdout=out, stderr=err,
                                text=True, env=env)

    def note_the_end():
        code = proc.wait()
        (root / "returncode.part").write_text(str(code))
        os.replace(root / "returncode.part", root / "returncode")

    threading.Thread(target=note_the_end, daemon=True).start()
    return proc


@pytest.fixture(scope="module")
def compiled_once() -> tuple:
    """(root, {name of STEP_FLAGS: what the process that compiled its step printed})."""
    import time

    from conftest import SESSION

    root = SESSION / COMPILED_AHEAD
    start_compiling(root)  # unless started at collection (conftest)
    deadline = time.monotonic() + helpers.PROCESS_TIMEOUT
    while not (root / "returncode").exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the compilations started ahead ran past {helpers.PROCESS_TIMEOUT:.0f}s")
        time.sleep(0.2)
    stdout, stderr = (root / "stdout").read_text(), (root / "stderr").read_text()
    assert (root / "returncode").read_text() == "0", stderr
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
