"""fairport bench on the tiny preset: all sides time the same inputs; the reference's outputs are checked
against fairseq's while timed. (Timings themselves are measured by the benchmark, never asserted here.)"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import needs_ctranslate2, needs_fairseq, run_cli


def bench(*args):
    return run_cli("bench", *args)


HAVE_CTRANSLATE2 = importlib.util.find_spec("ctranslate2") is not None


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> tuple:
    """One bench run on the tiny preset that the tests below read (it is the costly part): the reference in three
    precisions, fairseq, transformers and, where installed, CTranslate2 (converted by its own converter, fp32 and
    int8), at 1 and 2 threads; a 48-sentence corpus in token-budget batches; the corpus on 1 and 2 processes."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "b.json"
    sides = "reference,fairseq,transformers" + (",ctranslate2" if HAVE_CTRANSLATE2 else "")
    proc = bench("tiny", "--workdir", tmp / "w", "--steps", "4", "--repeats", "1", "--batch", "1,3",
                 "--beam", "1,3", "--dtype", "float32,bfloat16,int8", "--warmup", "0", "--threads", "1,2",
                 "--sides", sides, "--out", out, "--procs", "1,2", "--corpus", "48", "--max-tokens", "256")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, out, json.loads(out.read_text())


@needs_fairseq
def test_bench_tiny_preset_checks_outputs_while_timing(tiny_bench):
    _, out, res = tiny_bench
    keys = {r["key"] for r in res["runs"]}
    assert keys == {f"{d}/b{b}/beam{k}" for d in ("float32", "bfloat16", "int8") for b in (1, 3) for k in (1, 3)}
    for row in res["runs"]:
        ref = row["sides"]["reference"]
        assert ref["ms_per_step"] > 0 and ref["peak_rss_mb"] > 0
        assert "fairseq" in row["sides"] and "speedup_vs_fairseq_fp32" in ref
        if row["dtype"] == "float32":
            assert ref["outputs_equal_fairseq"] is True, row["key"]
        if row["dtype"] == "int8":  # the reference's alone; its agreement with fairseq is measured, not assumed
            assert "transformers" not in row["sides"] and 0 <= ref["exact_match_rate"] <= 1
    roof = res["roofline"]
    assert roof["memory_read_gbps"] > 0 and roof["weight_read_gbps"]["torch:float32"] > 0
    assert roof["weight_read_gbps"]["packed:float32"] > 0
    # bf16 is packed only where this oneDNN can pack it on this processor (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)
    from fairport.reference.fast import pack_linear

    bf16_packs = pack_linear(torch.nn.Linear(64, 64).to(torch.bfloat16), min_numel=0) is not None
    assert ("packed:bfloat16" in roof["weight_read_gbps"]) == bf16_packs
    assert not bf16_packs or roof["weight_read_gbps"]["packed:bfloat16"] > 0
    assert any(k.startswith("torch:bfloat16:") for k in roof["matmul_gflops"])
    assert roof["weight_read_gbps"]["int8:int8"] > 0
    assert 0 < res["batch1_int8_bound_ms_per_step"] < res["batch1_bound_ms_per_step"]
    greedy1 = {r["key"]: r["sides"] for r in res["runs"]}
    assert greedy1["float32/b1/beam1"]["reference"]["over_batch1_bound"] > 1
    assert greedy1["int8/b1/beam1"]["reference"]["over_batch1_bound"] > 1
    assert "over_batch1_bound" not in greedy1["int8/b1/beam1"]["fairseq"]  # fairseq's is its fp32 run
    assert 0 < res["batch1_bound_ms_per_step"] < min(r["sides"]["reference"]["ms_per_step"] for r in res["runs"])
    assert res["conversion"]["peak_rss_mb"] > 0 and res["conversion"]["checkpoint_mb"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    one, two = res["throughput"]  # the same corpus on 1 process of 2 threads, and on 2 of 1 (torch.distributed)
    assert (one["processes"], two["processes"]) == (1, 2) and one["sentences_per_s"] > 0 and two["sentences_per_s"] > 0
    assert sum(r["sentences"] for r in two["per_rank"]) == 64 and all(r["sentences"] for r in two["per_rank"])
    assert two["threads_per_process"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_cuda_says_not_measured_without_a_gpu(tmp_path):
    proc = bench("tiny", "--device", "cuda", "--workdir", tmp_path / "w", "--out", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    assert "not measured" in proc.stdout
    assert json.loads((tmp_path / "b.json").read_text())["status"].startswith("not measured")


@needs_fairseq
@needs_ctranslate2
def test_bench_times_ctranslate2_on_its_own_conversion(tiny_bench):
    """CTranslate2 beside the others: converted by its own ct2-fairseq-converter (fp32 and int8), timed at each
    thread count on the same sources for the same number of decoder steps, its outputs compared with fairseq's,
    its load time and its process's own peak memory reported."""
    proc, _, res = tiny_bench
    assert set(res["ctranslate2_conversion"]) == {"float32", "int8"}
    # the corpus: every engine on the same 48 sources with its own token-budget batching, against fairseq's
    corpus = res["corpus"]
    assert corpus["sentences"] == 48 and corpus["max_tokens"] == 256
    assert set(corpus["sides"]) == {"reference/float32", "reference/bfloat16", "reference/int8", "fairseq/float32",
                                    "ctranslate2/float32", "ctranslate2/int8"}
    for key, r in corpus["sides"].items():
        assert r["sentences_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0, key
        assert set(r["seconds_by_threads"]) == {"1", "2"} and 0 <= r["exact_match_vs_fairseq"] <= 1, key
    assert corpus["sides"]["reference/float32"]["exact_match_vs_fairseq"] == 1.0  # fp32: fairseq's tokens
    assert corpus["sides"]["reference/float32"]["speedup_vs_fairseq"] > 0 and "times_ctranslate2" in \
        corpus["sides"]["reference/int8"]
    for row in res["runs"]:
        if row["dtype"] == "bfloat16":  # CTranslate2 on the CPU: float32 and int8
            assert "ctranslate2" not in row["sides"]
            continue
        ct2 = row["sides"]["ctranslate2"]
        assert ct2["ms_per_step"] > 0 and set(ct2["ms_per_step_by_threads"]) == {"1", "2"}
        assert ct2["threads"] in (1, 2) and ct2["load_seconds"] > 0 and 0 < ct2["peak_rss_mb"] < 2000
        assert 0 <= ct2["exact_match_rate"] <= 1
        assert row["sides"]["reference"]["load_seconds"] > 0
        if row["dtype"] == "float32":  # fp32 on these tiny random weights: the same tokens as fairseq
            assert ct2["exact_match_rate"] >= 0.5, row["key"]
    assert "ctranslate2" in proc.stdout


def test_preset_names_are_the_clis():
    """The CLI names the presets without importing torch (options.PRESETS); bench builds them from presets.py."""
    from fairport.options import PRESETS as NAMES
    from fairport.validation.bench.presets import PRESETS

    assert tuple(PRESETS) == NAMES
    assert all({"arch", "task", "dict_lines", "src_len", "flags", "gen"} <= set(spec) for spec in PRESETS.values())
