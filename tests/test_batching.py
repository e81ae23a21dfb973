"""`fairport generate --max-tokens`: batches by token budget as fairseq-generate's --max-tokens builds them
(length-sorted, each batch's longest input x its inputs within the budget), outputs in input order. fairseq-free."""

from __future__ import annotations

import pytest

from fairport.errors import FairportError
from fairport.reference.hub import length_sorted_batches
from helpers import assert_one_error_line, run_cli, tiny_checkpoint


def test_token_budget_batches():
    lengths = [5, 3, 9, 3, 7, 2, 9, 4]
    batches = length_sorted_batches(lengths, None, max_tokens=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every input, once
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # shortest first
    assert all(max(lengths[i] for i in b) * len(b) <= 12 for b in batches)
    # greedy as fairseq's batch_by_size: each batch is as full as the budget allows before the next starts
    assert [len(b) for b in batches] == [3, 2, 1, 1, 1]  # 2 3 3 | 4 5 | 7 | 9 | 9
    assert all(len(b) <= 2 for b in length_sorted_batches(lengths, 2, max_tokens=100))
    assert length_sorted_batches(lengths, 3) == [[5, 1, 3], [7, 0, 4], [2, 6]]  # by count, as before
    with pytest.raises(FairportError, match="more than --max-tokens 8"):
        length_sorted_batches(lengths, None, max_tokens=8)


def test_generate_with_a_token_budget_writes_the_same_file(tmp_path):
    folder = tmp_path / "port"
    assert run_cli("convert", tiny_checkpoint(tmp_path / "release"), folder).returncode == 0
    src = tmp_path / "in.txt"
    src.write_text("".join(" ".join(f"w{4 + (i * 7 + j) % 30}" for j in range(1 + i % 6)) + "\n" for i in range(20)))
    outs = {}
    for name, flags in (("count", []), ("budget", ["--max-tokens", "16"])):
        proc = run_cli("generate", folder, "--input", src, "--output", tmp_path / name, "--quiet", "--beam", "2",
                       "--max-len-b", "5", *flags)
        assert proc.returncode == 0, proc.stderr
        outs[name] = (tmp_path / name).read_text().splitlines()
    assert len(outs["budget"]) == 20 and outs["budget"] == outs["count"]
    assert_one_error_line(run_cli("generate", folder, "--input", src, "--max-tokens", "3", "--quiet"),
                          "--max-tokens 3")
