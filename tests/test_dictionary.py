"""fairseq dictionary semantics and GPT-2 vocabulary ids, against fairseq's own code."""

from __future__ import annotations

import json

import pytest

from fairport.converters.tokenizer_files import fsmt_vocab, gpt2_vocab
from fairport.errors import FairportError
from fairport.reference.dictionary import Dictionary
from helpers import SHARED, needs_fairseq, needs_shared


def fairseq_dictionary(path, additions=()):
    from fairseq.data import Dictionary as FairseqDictionary

    d = FairseqDictionary.load(str(path))
    for sym in additions:
        d.add_symbol(sym)
    return d


@needs_fairseq
def test_overwrite_fillers_and_additions_match_fairseq(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("hello 10\nworld 5\n<s> 3 #fairseq:overwrite\nhello 2 #fairseq:overwrite\n"
                    "madeupword0000 0\nmadeupword0001 0\n")
    adds = ["[en_XX]", "[ro_RO]", "<mask>", "hello"]
    ours = Dictionary.load(path)
    theirs = fairseq_dictionary(path)
    for sym in adds:
        ours.add_symbol(sym)
        theirs.add_symbol(sym)
    assert ours.symbols == theirs.symbols
    assert len(ours) == len(theirs)
    for sym in set(ours.symbols) | {"never-seen"}:
        assert ours.index(sym) == theirs.index(sym), sym
    assert (ours.bos, ours.pad, ours.eos, ours.unk) == (theirs.bos(), theirs.pad(), theirs.eos(), theirs.unk())


@needs_fairseq
def test_duplicate_without_overwrite_is_an_error_in_both(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("a 1\nb 1\na 1\n")
    with pytest.raises(RuntimeError):
        fairseq_dictionary(path)
    with pytest.raises(FairportError, match="duplicate word 'a'"):
        Dictionary.load(path)


def test_bad_line_is_one_clear_error(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("a 1\nnocount\n")
    with pytest.raises(FairportError, match=r"dict.txt:2: incorrect dictionary format"):
        Dictionary.load(path)


def test_written_dictionary_reloads_identically(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("x 4\ny 3\nx 1 #fairseq:overwrite\n")
    d = Dictionary.load(path)
    d.add_symbol("<mask>")
    d.write(tmp_path / "out.txt")
    again = Dictionary.load(tmp_path / "out.txt")
    assert again.symbols == d.symbols and again.indices == d.indices


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("lines,rows,mask", [(50260, 50265, 50264), (None, 51201, 51200)])
def test_gpt2_vocab_ids_equal_fairseq_for_every_token(lines, rows, mask, tmp_path):
    """bart.large: the first 50260 lines of dict.txt (+<mask>); bart.base: the whole file."""
    src = (SHARED / "gpt2" / "dict.txt").read_text().splitlines(keepends=True)
    path = tmp_path / "dict.txt"
    path.write_text("".join(src[:lines] if lines else src))
    ours = Dictionary.load(path)
    ours.add_symbol("<mask>")
    theirs = fairseq_dictionary(path, ["<mask>"])
    assert len(ours) == len(theirs) == rows
    assert ours.index("<mask>") == theirs.index("<mask>") == mask

    vocab = gpt2_vocab(SHARED / "gpt2" / "encoder.json", ours)
    encoder = json.loads((SHARED / "gpt2" / "encoder.json").read_text())
    checked = 0
    for token, gpt2_id in encoder.items():
        fairseq_id = theirs.index(str(gpt2_id))  # fairseq: BPE -> GPT-2 id string -> dictionary index
        if fairseq_id == theirs.unk():
            assert token not in vocab
            continue
        assert vocab[token] == fairseq_id, token
        checked += 1
    assert checked >= 50000  # (a handful of GPT-2 ids are absent from fairseq's dict and map to <unk>)
    for special in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):
        assert vocab[special] == theirs.index(special)


def test_fsmt_vocab_rewrites_continuations():
    d = Dictionary()
    for s in ("le@@", "tt@@", "er", "<unk>"):
        d.add_symbol(s)
    v = fsmt_vocab(d)
    assert v["le"] == 4 and v["tt"] == 5 and v["er</w>"] == 6 and v["<unk>"] == 3 and v["<s>"] == 0
