"""A damaged folder is named in one line (issue 21): by load(), generate and verify, and once for a run of two
ranks, whichever launcher started them. fairseq-free (helpers.tiny_checkpoint's folder, copied and spoiled)."""

from __future__ import annotations

import pytest

from fairport.errors import FairportError
from fairport.reference import load
from helpers import assert_one_error_line, run_cli, torchrun


def cut_short(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def bit_flipped(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(bytes(data))


def corrupt_header(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[9:20] = b"garbage!!!!"
    weights.write_bytes(bytes(data))


def missing(folder):
    (folder / "model.safetensors").unlink()


DAMAGE = {"cut short": (cut_short, "cut short"), "bit flipped": (bit_flipped, "sha256"),
          "corrupt header": (corrupt_header, "corrupt header"), "missing": (missing, "missing")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_folder_is_one_line_naming_the_file(damage, tiny_made, tiny_folder, tmp_path):
    spoil, what = DAMAGE[damage]
    spoil(tiny_folder)
    with pytest.raises(FairportError, match=what) as e:
        load(tiny_folder)
    assert "model.safetensors" in str(e.value) and "convert again" in str(e.value)
    src = tmp_path / "in.txt"
    src.write_text("w4 w5\n")
    assert_one_error_line(run_cli("generate", tiny_folder, "--input", src, "--output", tmp_path / "o"), what,
                          "model.safetensors", "convert again")
    assert not (tmp_path / "o").exists()
    assert_one_error_line(run_cli("verify", tiny_made / "release", tiny_folder, "--out", tmp_path / "r"), what,
                          "model.safetensors")


def test_a_missing_shard_is_named(tiny_made, tmp_path):
    proc = run_cli("convert", tiny_made / "release", tmp_path / "sharded", "--max-shard-size", "20KB")
    assert proc.returncode == 0, proc.stderr
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FairportError, match=f"{shard.name} is missing"):
        load(tmp_path / "sharded")


def test_a_damaged_folder_on_two_ranks_is_one_line(tiny_folder, tmp_path):
    """Every rank meets the damage; the run says it once, without advice to resume (no resume can fix it)."""
    bit_flipped(tiny_folder)
    src = tmp_path / "in.txt"
    src.write_text("w4 w5\nw6\n")
    proc = run_cli("generate", tiny_folder, "--input", src, "--output", tmp_path / "o", "--nproc", "2",
                   env={"OMP_NUM_THREADS": "1"})
    line = assert_one_error_line(proc, "sha256", "model.safetensors")
    assert "--resume" not in line
    proc = torchrun("-m", "fairport", "generate", tiny_folder, "--input", src, "--output", tmp_path / "o")
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("fairport: error:")]
    assert len(ours) == 1 and "sha256" in ours[0]
    # no rank printed a traceback: the one traceback is torchrun's own summary of the failed ranks
    assert proc.stderr.count("Traceback") <= 1 and ("Traceback" not in proc.stderr or "ChildFailedError" in proc.stderr)
