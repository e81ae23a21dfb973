"""Every bad input: one clear error line, a non-zero exit, and nothing left at DST."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairport.converters.checkpoint import load_checkpoint
from fairport.errors import FairportError
from helpers import assert_one_error_line, needs_fairseq, run, run_cli


def fairport(*args) -> subprocess.CompletedProcess:
    return run_cli(*args)


def assert_clean_failure(proc: subprocess.CompletedProcess, dst: Path, *words: str) -> None:
    assert_one_error_line(proc, *words)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if "fairport-tmp" in p.name], "temporary folder left behind"


class Boom:
    """A pickle payload that would create a file if anything ran it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil" / "model.pt"
    ckpt.parent.mkdir()
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(arch="transformer"),
                "extra_state": Boom(marker)}, ckpt)
    with pytest.raises(FairportError, match=r"posix\.system|os\.system"):
        load_checkpoint(ckpt)
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", ckpt, dst), dst, "refusing to load", "system")
    assert not marker.exists(), "code from the pickle ran"


def test_legacy_serialization_pickle_is_restricted_too(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.pt"
    torch.save({"model": {}, "x": Boom(marker)}, ckpt, _use_new_zipfile_serialization=False)
    with pytest.raises(FairportError, match="refusing to load"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_text_file_named_model_pt(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_text("this is not a checkpoint\n")
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", ckpt, dst), dst, "not a PyTorch checkpoint")


@needs_fairseq
@pytest.mark.parametrize("name", ["wmt_big_joined", "iwslt_legacy_2019"])
def test_truncated_checkpoint(name, fixtures_dir, tmp_path):
    data = (fixtures_dir / name / "model.pt").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    for f in (fixtures_dir / name).glob("dict*.txt"):
        (src / f.name).write_bytes(f.read_bytes())
    (src / "model.pt").write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", src, dst), dst, "truncated or corrupt")


@needs_fairseq
def test_dictionary_does_not_match_embeddings(fixtures_dir, tmp_path):
    wrong = tmp_path / "dict.wrong.txt"
    wrong.write_text("".join(f"x{i} 1\n" for i in range(10)))
    dst = tmp_path / "out"
    proc = fairport("convert", fixtures_dir / "wmt_separate_cfg_fp16", dst, "--src-dict", wrong)
    assert_clean_failure(proc, dst, "dict.wrong.txt", "14 symbols", "78 rows")


@needs_fairseq
def test_all_unsupported_options_reported_at_once(fixtures_dir, tmp_path):
    state = torch.load(fixtures_dir / "wmt_big_joined" / "model.pt", weights_only=False)
    state["args"].adaptive_softmax_cutoff = "10,20"
    state["args"].cross_self_attention = True
    state["args"].activation_fn = "mystery"
    src = tmp_path / "src"
    src.mkdir()
    for f in (fixtures_dir / "wmt_big_joined").glob("dict*.txt"):
        (src / f.name).write_bytes(f.read_bytes())
    torch.save(state, src / "model.pt")
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", src, dst), dst, "adaptive_softmax_cutoff", "cross_self_attention",
                         "activation_fn")


@needs_fairseq
def test_unknown_architecture(fixtures_dir, tmp_path):
    state = torch.load(fixtures_dir / "wmt_big_joined" / "model.pt", weights_only=False)
    state["args"].arch = "lightconv_iwslt_de_en"
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", ckpt, dst), dst, "lightconv_iwslt_de_en", "not supported")


@needs_fairseq
def test_force_replaces_only_what_fairport_wrote(fixtures_dir, tmp_path):
    """--force never deletes a user's file: a folder fairport did not write is refused (with its files intact),
    so is a fairport folder holding a file fairport did not write; a previous fairport output is replaced."""
    src = fixtures_dir / "wmt_big_joined"
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("user data")
    proc = fairport("convert", src, dst)
    assert proc.returncode != 0 and "already exists" in proc.stderr and (dst / "notes.txt").exists()
    proc = fairport("convert", src, dst, "--force")
    assert proc.returncode != 0 and "not a fairport model folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (dst / "notes.txt").read_text() == "user data"
    (dst / "notes.txt").unlink()
    proc = fairport("convert", src, dst, "--force")  # an empty folder may be filled
    assert proc.returncode == 0, proc.stderr
    (dst / "notes.txt").write_text("user data")
    proc = fairport("convert", src, dst, "--force", "--beam", "3")
    assert proc.returncode != 0 and "notes.txt" in proc.stderr and (dst / "notes.txt").exists()
    (dst / "notes.txt").unlink()
    (dst / "verify").mkdir()
    (dst / "verify" / "report.md").write_text("# my notes on it")  # not a report verify wrote: kept
    proc = fairport("convert", src, dst, "--force", "--beam", "3")
    assert proc.returncode != 0 and "verify/" in proc.stderr and (dst / "verify" / "report.md").exists()
    (dst / "verify" / "report.md").write_text("# fairport verify: PASS\n")  # an old report: replaced
    proc = fairport("convert", src, dst, "--force", "--beam", "3")
    assert proc.returncode == 0, proc.stderr
    assert '"beam": 3' in (dst / "generation_config.json").read_text() and not (dst / "verify").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    file_dst = tmp_path / "a-file"
    file_dst.write_text("x")
    proc = fairport("convert", src, file_dst, "--force")
    assert proc.returncode != 0 and "not a folder" in proc.stderr and file_dst.read_text() == "x"


def test_demo_removes_only_what_it_created(tmp_path):
    """The demo refuses a folder it did not make, and on a rerun clears only the entries its marker lists."""
    from fairport import demo

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("years of work")
    proc = run([sys.executable, "-m", "fairport.demo", busy])
    assert proc.returncode != 0 and "not made by the demo" in proc.stderr
    assert (busy / "thesis.tex").read_text() == "years of work" and list(busy.iterdir()) == [busy / "thesis.tex"]
    out = tmp_path / "demo"
    demo.prepare(out)
    for name in demo.CREATED:
        (out / name).mkdir()
        (out / name / "x").write_text("made by the demo")
    (out / "mine.txt").write_text("the user's")
    demo.prepare(out)  # a rerun: the demo's entries go, the user's file stays
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER, "mine.txt"]


def test_missing_source(tmp_path):
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", tmp_path / "nope", dst), dst, "not found")


def test_plain_pickle_without_model_is_refused(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, ckpt)
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", ckpt, dst), dst, "not a fairseq checkpoint")


def test_restricted_unpickler_allows_plain_data():
    """The allowlist still reads what fairseq writes: OrderedDicts, Namespaces, tensors, numpy scalars."""
    import io

    import numpy as np

    from fairport.converters.checkpoint import RestrictedUnpickler

    data = {"a": argparse.Namespace(x=1), "n": np.float64(2.5), "s": {1, 2}}
    out = RestrictedUnpickler(io.BytesIO(pickle.dumps(data, protocol=2))).load()
    assert out["a"].x == 1 and out["n"] == 2.5 and out["s"] == {1, 2}


def test_bench_unknown_dtype_is_one_line_and_builds_nothing(tmp_path):
    work = tmp_path / "bench-work"
    assert_clean_failure(fairport("bench", "tiny", "--dtype", "float32,fp8", "--workdir", work), work, "fp8")


@needs_fairseq
def test_bad_text_pipeline_options_fail_cleanly(fixtures_dir, tmp_path):
    src = fixtures_dir / "transformer_spm_args"
    not_spm = tmp_path / "not.model"
    not_spm.write_text("these are not sentencepiece bytes")
    dst = tmp_path / "out"
    assert_clean_failure(fairport("convert", src, dst, "--sentencepiece-model", not_spm), dst,
                         "not a sentencepiece model")
    assert_clean_failure(fairport("convert", src, dst, "--bpe", "wordpiece"), dst, "--bpe must be one of",
                         "sentencepiece")
    assert_clean_failure(fairport("convert", src, dst, "--tokenizer", "nltk"), dst, "--tokenizer must be one of")
    assert_clean_failure(fairport("convert", src, dst, "--sentencepiece-model", tmp_path / "missing.model"), dst,
                         "file not found")


@needs_fairseq
def test_missing_bpe_file_gives_an_ids_only_folder_that_says_why(fixtures_dir, tmp_path):
    """The checkpoint records --bpe sentencepiece but its model file is gone: the weights still convert,
    provenance.json says what is missing and how to pass it, and asking for text names the flags."""
    import json
    import shutil

    from fairport.converters.convert import convert
    from fairport.reference import load

    src = tmp_path / "release"
    shutil.copytree(fixtures_dir / "transformer_spm_args", src)
    (src / "spm.model").unlink()
    convert(src, tmp_path / "out")
    notes = json.loads((tmp_path / "out" / "provenance.json").read_text())["notes"]
    assert any("sentencepiece" in n and "--sentencepiece-model" in n and "/home/trainer/data/spm.model" in n
               for n in notes), notes
    with pytest.raises(FairportError, match="takes token ids only.*--sentencepiece-model"):
        load(tmp_path / "out").translate("hello")
    # --bpe none: ids only, on purpose, with nothing to report
    convert(fixtures_dir / "transformer_spm_args", tmp_path / "ids", bpe="none")
    assert json.loads((tmp_path / "ids" / "config.json").read_text())["fairport"]["text"] is None
    assert not (tmp_path / "ids" / "sentencepiece.bpe.model").exists()


@needs_fairseq
def test_many_to_many_generate_needs_a_known_direction(converted, tmp_path):
    folder = converted("m2m_multilingual")
    src = tmp_path / "in.txt"
    src.write_text("hello world\n")
    out = tmp_path / "out.txt"
    assert_clean_failure(fairport("generate", folder, "--input", src, "--output", out), out,
                         "translates between en, de, fr", "--source-lang/--target-lang")
    assert_clean_failure(fairport("generate", folder, "--input", src, "--output", out, "--source-lang", "en",
                                  "--target-lang", "ro"), out, "'ro' is not one of this model's")
    proc = fairport("generate", folder, "--input", src, "--output", out, "--source-lang", "en", "--target-lang",
                    "de", "--max-len-b", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 1
