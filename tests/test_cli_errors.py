"""Every verb of the command line, given bad values: one line (`fairport: error: ...`) naming what is wrong and
how to put it right, a non-zero exit, no traceback, and no work done first (nothing written)."""

from __future__ import annotations

import subprocess

import pytest

from fairport.cli import main
from helpers import assert_one_error_line, run_cli


@pytest.fixture(scope="module")
def folder(tiny_made):
    """A converted model folder (from a checkpoint written in fairseq's format, no fairseq needed), and an input."""
    (tiny_made / "in.txt").write_text("w4 w5 w6\nw7 w8\n")
    return tiny_made


CASES = {
    "convert: shard size": (["convert", "{release}", "{new}", "--max-shard-size", "lots"], ["--max-shard-size",
                                                                                           "not a size"]),
    "convert: beam 0": (["convert", "{release}", "{new}", "--beam", "0"], ["--beam", "positive integer"]),
    "convert: a bad dtype": (["convert", "{release}", "{new}", "--dtype", "fp8"], ["--dtype", "fp8"]),
    "convert: no source": (["convert", "{root}/nothing.pt", "{new}"], ["source not found"]),
    "convert: bad --bpe": (["convert", "{release}", "{new}", "--bpe", "wordpiece"], ["--bpe must be one of"]),
    "generate: beam 0": (["generate", "{port}", "--beam", "0"], ["--beam", "positive integer"]),
    "generate: cuda here": (["generate", "{port}", "--device", "cuda"], ["no CUDA device"]),
    "generate: a device torch does not know": (["generate", "{port}", "--device", "gpu"], ["not a device"]),
    "generate: negative max length": (["generate", "{port}", "--max-len-b", "-1"], ["--max-len-b"]),
    "generate: no such input": (["generate", "{port}", "--input", "{root}/missing.txt"], ["cannot read --input"]),
    "generate: a direction for a one-direction model": (["generate", "{port}", "--input", "{root}/in.txt",
                                                         "--target-lang", "fr"], ["not a many-to-many model"]),
    "generate: not a model folder": (["generate", "{root}"], ["not a fairport model folder"]),
    "generate: compiled int8": (["generate", "{port}", "--compile", "--dtype", "int8"], ["--compile", "int8"]),
    "verify: gpu": (["verify", "{release}", "{port}", "--device", "gpu"], ["--device", "not a device"]),
    "verify: a dtype typo, before any work": (["verify", "{release}", "{port}", "--dtypes", "float32,bf16"],
                                              ["unknown dtype bf16", "bfloat16"]),
    "verify: two inputs": (["verify", "{release}", "{port}", "--data", "x", "--fairseq-data", "y"],
                           ["not allowed with"]),
    "verify: tie rate above 1": (["verify", "{release}", "{port}", "--max-tie-rate", "3"], ["from 0 to 1"]),
    "verify: limit 0": (["verify", "{release}", "{port}", "--limit", "0"], ["--limit", "positive integer"]),
    "card: not a model folder": (["card", "{root}"], ["not a fairport model folder"]),
    "upload: a bad repository id": (["upload", "{port}", "not a repo!", "--dry-run"], ["not a Hub repository id"]),
    "upload: not a model folder": (["upload", "{root}", "me/model"], ["not a fairport model folder"]),
    "upload: no parity report": (["upload", "{port}", "me/model"], ["no parity report", "--allow-unverified"]),
    "bench: an unknown dtype": (["bench", "tiny", "--dtype", "float32,fp8", "--workdir", "{new}"], ["fp8"]),
    "bench: batch 0": (["bench", "tiny", "--batch", "0", "--workdir", "{new}"], ["--batch"]),
    "bench: an unknown side": (["bench", "tiny", "--sides", "reference,onnx", "--workdir", "{new}"], ["onnx"]),
    "bench: neither preset nor folder": (["bench", "wmt99", "--workdir", "{new}"], ["neither a converted folder"]),
    "a verb that does not exist": (["translate", "x"], ["invalid choice"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_get_one_line(case, folder, tmp_path, capsys):
    """In-process (fast): an unexpected exception would escape main() and fail the test as a traceback."""
    args, words = CASES[case]
    paths = {"release": folder / "release", "port": folder / "port", "root": folder, "new": tmp_path / "new"}
    try:
        code = main([a.format(**paths) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    assert_one_error_line(subprocess.CompletedProcess(args, code, out.out, out.err), *words)
    assert not (tmp_path / "new").exists(), "work was done before the bad value was refused"


def test_a_bad_value_in_a_real_process(folder, tmp_path):
    proc = run_cli("convert", folder / "release", tmp_path / "new", "--max-shard-size", "lots")
    assert_one_error_line(proc, "--max-shard-size")
    assert "Traceback" not in proc.stderr and not (tmp_path / "new").exists()


def test_upload_with_the_network_down_is_retried_then_one_line(folder):
    """huggingface_hub's network errors are its HTTP library's, not OSError: they are retried, then reported."""
    proc = run_cli("upload", folder / "port", "me/model", "--allow-unverified",
                   env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x", "HF_HUB_DISABLE_XET": "1",
                        "HF_HUB_OFFLINE": "0"})
    assert_one_error_line(proc, "upload failed after 3 attempts")
    assert proc.stdout.count("retrying") == 2
