"""transformers tokenizer files for sentencepiece folders (converters/spm_tokenizer.py): `AutoTokenizer` on the
written files against fairseq's pipeline (sentencepiece pieces looked up in the fairseq dictionary, as fairport's
reference tokenizer does; that one is checked against fairseq itself in test_text.py) on the shared real sentences,
for a BPE and a unigram sentencepiece model, a dictionary in fairseq-preprocess's order (not the model's), language
tokens, <mask> and madeupword padding. Every sentence that differs must be explained by a named rule on its evidence."""

from __future__ import annotations

import random

import pytest

from fairport.converters import spm_tokenizer
from fairport.reference.dictionary import Dictionary
from fairport.reference.tokenizer import Tokenizer
from helpers import SHARED, needs_shared

pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")


def lines():
    return [ln for lang in ("en", "de", "ru")
            for ln in (SHARED / "text" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def spm_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"spm_{request.param}")
    (folder / "train.txt").write_text("\n".join(lines()[::2]) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(folder / "train.txt"), model_prefix=str(folder / "m"),
                                             vocab_size=700, model_type=request.param, num_threads=1,
                                             character_coverage=0.9995, minloglevel=2)
    return request.param, folder / "m.model"


def dictionary(model, drop: int) -> tuple[Dictionary, set[str]]:
    """Pieces in a shuffled order (fairseq-preprocess counts, it does not follow the model), `drop` of them left
    out, then an mBART-style language token, <mask>, and madeupwords to a multiple of 8."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    pieces = [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    random.Random(0).shuffle(pieces)
    d = Dictionary()
    for p in pieces[drop:]:
        d.add_symbol(p)
    for sym in ("[en_XX]", "<mask>"):
        d.add_symbol(sym)
    d.pad_to_multiple(8)
    return d, set(pieces[:drop])


@needs_shared
@pytest.mark.parametrize("drop", [0, 25])
def test_autotokenizer_gives_fairseq_ids_or_a_named_rule(spm_model, drop, tmp_path):
    from transformers import AutoTokenizer

    kind, model = spm_model
    d, dropped = dictionary(model, drop)
    (tmp_path / "sentencepiece.bpe.model").write_bytes(model.read_bytes())
    lang = d.index("[en_XX]")
    written, notes = spm_tokenizer.write(tmp_path, model, d, [], [d.eos, lang], 1024)
    assert written == ["tokenizer.json", "tokenizer_config.json"]
    assert bool(notes) == bool(drop)
    ours = Tokenizer(tmp_path, {"tokenizer": None, "bpe": "sentencepiece"}, d, d)
    spm = spm_tokenizer.SpmModel.read(model)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    held_out = lines()[1::2]
    rules: dict[str, int] = {}
    for text in held_out:
        want = ours.ids(text) + [d.eos, lang]
        got = tok(text)["input_ids"]
        if got == want:
            if d.unk not in want:  # decoding too: the framing's special tokens skipped, the text fairseq's
                assert tok.decode(got, skip_special_tokens=True) == ours.decode(want[:-2]), text
            continue
        tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        rule = spm_tokenizer.explain(spm, d, text, ours.bpe.apply(text).split(), tokens)
        assert rule is not None, (text, ours.bpe.apply(text), tokens)
        if rule == spm_tokenizer.OUT_OF_DICTIONARY:  # the evidence: fairseq used a piece the dictionary lacks
            assert dropped & set(ours.bpe.apply(text).split())
        rules[rule] = rules.get(rule, 0) + 1
    differ = sum(rules.values())
    assert differ < len(held_out) * (0.01 if not drop else 0.9), rules
    if drop:
        assert rules.get(spm_tokenizer.OUT_OF_DICTIONARY), rules  # the rule was exercised, not assumed
    else:
        assert set(rules) <= {spm_tokenizer.TIE}, rules  # with every piece in the dictionary, only exact ties


SENTENCE = "The system is used to change the default file."


@needs_shared
def test_special_tokens_and_framing(tmp_path):
    """A many-to-many framing (`__en__ x </s>`): the template puts the language token first; language tokens and
    madeupwords are special (skipped by decode); a model file that is not one fails in one line."""
    from transformers import AutoTokenizer

    from fairport.errors import FairportError

    text = tmp_path / "t.txt"
    text.write_text("\n".join(lines()[:3000:3]) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=300,
                                             model_type="unigram", num_threads=1, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    d = Dictionary()
    for i in range(3, sp.get_piece_size()):
        d.add_symbol(sp.id_to_piece(i))
    en, de = d.add_symbol("__en__"), d.add_symbol("__de__")
    padding = [f"madeupword{i:04d}" for i in range(d.pad_to_multiple(8))]
    out = tmp_path / "out"
    out.mkdir()
    spm_tokenizer.write(out, tmp_path / "m.model", d, [en], [d.eos], 1024)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == en and ids[-1] == d.eos and d.unk not in ids
    assert ids[1:-1] == [d.index(p) for p in sp.encode(SENTENCE, out_type=str)]
    assert {"__en__", "__de__", *padding} <= set(tok.all_special_tokens)
    assert tok.decode(ids + [de], skip_special_tokens=True) == SENTENCE
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(FairportError, match="is not a sentencepiece model"):
        spm_tokenizer.SpmModel.read(bad)


@needs_shared
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_user_defined_pieces_and_byte_fallback(kind, tmp_path):
    """Options other trainers use: user-defined pieces (emitted whole wherever they occur) and byte fallback
    (unknown characters as <0xNN> pieces): the same ids as fairseq's pipeline on text that exercises both."""
    from transformers import AutoTokenizer

    text = tmp_path / "t.txt"
    text.write_text("\n".join(lines()[:3000:3]) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=400,
                                             model_type=kind, num_threads=1, minloglevel=2, byte_fallback=True,
                                             user_defined_symbols=["<sep>", "@@@"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    d = Dictionary()
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    random.Random(1).shuffle(pieces)
    for p in pieces:
        d.add_symbol(p)
    (tmp_path / "sentencepiece.bpe.model").write_bytes((tmp_path / "m.model").read_bytes())
    spm_tokenizer.write(tmp_path, tmp_path / "m.model", d, [], [d.eos], 1024)
    ours = Tokenizer(tmp_path, {"tokenizer": None, "bpe": "sentencepiece"}, d, d)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["a <sep> b @@@ c", "<sep>start and end@@@", "emoji 😀 and ☃ snowman", *lines()[1:3000:50]]
    differ = [t for t in texts if tok(t)["input_ids"] != ours.ids(t) + [d.eos]]
    model = spm_tokenizer.SpmModel.read(tmp_path / "m.model")  # the wire reader: sentencepiece's own pieces
    assert [(p, round(score, 5)) for p, score, _ in model.pieces] == [
        (sp.id_to_piece(i), round(sp.get_score(i), 5)) for i in range(sp.get_piece_size())]
    assert model.model_type == {"unigram": spm_tokenizer.UNIGRAM, "bpe": spm_tokenizer.BPE}[kind]
    user = {p for p, _, k in model.pieces if k == spm_tokenizer.USER_DEFINED}
    assert model.byte_fallback and user == {"<sep>", "@@@"}
    assert all(spm_tokenizer.explain(model, d, t, ours.bpe.apply(t).split(), tok.convert_ids_to_tokens(
        tok(t, add_special_tokens=False)["input_ids"])) == spm_tokenizer.TIE for t in differ), differ
    assert not set(differ) & set(texts[:3])  # the user-defined and byte-fallback texts are exact
    assert any("<0x" in p for p in ours.bpe.apply(texts[2]).split())  # byte fallback was exercised
