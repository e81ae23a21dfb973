"""Text in, text out: tokenization identical to fairseq's encoders on the 9000 real sentences in
../shared/data/text, and the hub verbs (translate/sample) identical to fairseq's hub interface."""

from __future__ import annotations

import io

import pytest

from fairport.converters.convert import convert
from fairport.errors import FairportError
from fairport.reference import load
from fairport.reference.dictionary import Dictionary
from fairport.reference.tokenizer import GPT2BPE, Tokenizer, load_tokenizer
from fairport.validation.original.fixtures import train_sentencepiece
from fairport.validation.original.protocol import direction_overrides, hub_request, run
from helpers import SHARED, gpt2_files, needs_fairseq, needs_shared, run_cli

LANGS = ("en", "de", "ru")


def sentences(lang):
    return (SHARED / "text" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()


def autotokenizer_ids(folder, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(t)["input_ids"] for t in texts]


@needs_fairseq
@needs_shared
def test_gpt2_bpe_ids_and_round_trip_equal_fairseq_on_all_sentences(converted):
    from fairseq.data import Dictionary as FairseqDictionary
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    folder = converted("bart_base_mnli")  # the whole bart.base dictionary
    files = gpt2_files("bart_base_mnli")
    theirs = get_encoder(str(files["encoder_json"]), str(files["vocab_bpe"]))
    d = FairseqDictionary.load(str(SHARED / "gpt2" / "dict.txt"))
    d.add_symbol("<mask>")
    ours = GPT2BPE.from_folder(folder)
    n = 0
    for lang in LANGS:
        for s in sentences(lang):
            want = d.encode_line(" ".join(map(str, theirs.encode(s))), append_eos=False,
                                 add_if_not_exist=False).long()
            got = ours.encode(s)
            assert got == want.tolist(), s
            assert ours.decode(got) == theirs.decode([int(t) for t in d.string(want).split()]), s
            n += 1
    assert n == 9000


@pytest.fixture(scope="session")
def moses_bpe(tmp_path_factory):
    """BPE codes learned (subword-nmt) on the Moses-tokenized sentences, and a joined dictionary of the
    BPE'd corpus: the pieces of a WMT19-style release, made from real text."""
    from sacremoses import MosesTokenizer
    from subword_nmt.learn_bpe import learn_bpe

    out = tmp_path_factory.mktemp("moses-bpe")
    tokenized = []
    for lang in LANGS:
        tok = MosesTokenizer(lang=lang)
        tokenized += [tok.tokenize(s, aggressive_dash_splits=True, return_str=True, escape=True)
                      for s in sentences(lang)]
    codes = io.StringIO()
    learn_bpe(io.StringIO("\n".join(tokenized)), codes, 3000, min_frequency=2)
    lines = [ln for ln in codes.getvalue().splitlines() if not ln.startswith("#")]
    (out / "bpecodes").write_text("".join(f"{ln} {len(lines) - i}\n" for i, ln in enumerate(lines)), encoding="utf-8")
    import fastBPE

    bpe = fastBPE.fastBPE(str(out / "bpecodes"))
    d = Dictionary()
    for line in bpe.apply(tokenized):
        for w in line.split():
            d.add_symbol(w)
    d.write(out / "dict.txt")
    return out


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("bpe_name,lang", [("fastbpe", "en"), ("fastbpe", "de"), ("fastbpe", "ru"),
                                          ("subword_nmt", "de")])
def test_moses_bpe_ids_and_round_trip_equal_fairseq(bpe_name, lang, moses_bpe, tmp_path):
    """Moses then fastBPE (WMT19), or then subword-nmt (`--bpe subword_nmt`: the subword-nmt library, codes
    with its #version header and no counts), against fairseq's own encoders."""
    from fairseq.data import Dictionary as FairseqDictionary
    from fairseq.data.encoders.fastbpe import fastBPE, fastBPEConfig
    from fairseq.data.encoders.moses_tokenizer import MosesTokenizer, MosesTokenizerConfig
    from fairseq.data.encoders.subword_nmt_bpe import SubwordNMTBPE, SubwordNMTBPEConfig

    folder = moses_bpe
    if bpe_name == "subword_nmt":
        lines = (moses_bpe / "bpecodes").read_text(encoding="utf-8").splitlines()
        (tmp_path / "bpecodes").write_text("#version: 0.2\n" + "".join(ln.rsplit(" ", 1)[0] + "\n" for ln in lines),
                                           encoding="utf-8")
        folder = tmp_path
        bpe = SubwordNMTBPE(SubwordNMTBPEConfig(bpe_codes=str(folder / "bpecodes")))
    else:
        bpe = fastBPE(fastBPEConfig(bpe_codes=str(folder / "bpecodes")))
    moses = MosesTokenizer(MosesTokenizerConfig(source_lang=lang, target_lang=lang))
    fd = FairseqDictionary.load(str(moses_bpe / "dict.txt"))
    d = Dictionary.load(moses_bpe / "dict.txt")
    ours = Tokenizer(folder, {"tokenizer": "moses", "bpe": bpe_name, "moses_source_lang": lang,
                              "moses_target_lang": lang}, d, d)
    for s in sentences(lang):
        want = fd.encode_line(bpe.encode(moses.encode(s)), add_if_not_exist=False).long()
        got = ours.encode(s)
        assert got.tolist() == want.tolist(), s
        assert ours.decode(got) == moses.decode(bpe.decode(fd.string(want))), s


@needs_fairseq
@needs_shared
def test_sentencepiece_ids_and_round_trip_equal_fairseq_on_all_sentences(tmp_path):
    """fairseq's `--bpe sentencepiece` (mBART's pipeline): a BPE sentencepiece model learned on the shared
    sentences, its pieces as the dictionary; ids and decoded text identical on all 9000 sentences."""
    from fairseq.data import Dictionary as FairseqDictionary
    from fairseq.data.encoders.sentencepiece_bpe import SentencepieceBPE, SentencepieceConfig

    pieces = train_sentencepiece(tmp_path / "sentencepiece.bpe.model", SHARED, vocab_size=1000)
    d = Dictionary()
    for p in pieces[: len(pieces) - 50]:  # some pieces missing from the dictionary: they become <unk>
        d.add_symbol(p)
    d.write(tmp_path / "dict.txt")
    fd = FairseqDictionary.load(str(tmp_path / "dict.txt"))
    bpe = SentencepieceBPE(SentencepieceConfig(sentencepiece_model=str(tmp_path / "sentencepiece.bpe.model")))
    ours = Tokenizer(tmp_path, {"tokenizer": None, "bpe": "sentencepiece"}, d, d)
    unks = 0
    for lang in LANGS:
        for s in sentences(lang):
            want = fd.encode_line(bpe.encode(s), add_if_not_exist=False).long()
            got = ours.encode(s)
            assert got.tolist() == want.tolist(), s
            assert ours.decode(got) == bpe.decode(fd.string(want)), s
            unks += int(got.eq(d.unk).sum())
    assert unks > 0  # the <unk> path was exercised


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("name", ["mbart_en_ro_spm", "transformer_spm_args"])
def test_sentencepiece_models_equal_fairseq_hub(name, fixtures_dir, converted):
    """Models trained with --bpe sentencepiece, converted with no BPE flags (the checkpoint records the choice;
    the model file is found where it recorded it, or by its name beside the checkpoint). Against fairseq's
    generic hub interface with the task's own framing: the ids fed to the model (mBART translation: `x </s>
    [en_XX]`), generated ids (mBART: ending in [ro_RO], the task's EOS), and fairseq-interactive's text."""
    folder = converted(name)
    tok = load_tokenizer(folder)
    assert tok.spec["bpe"] == "sentencepiece" and tok.spec["tokenizer"] is None and not tok.bart
    model = load(folder)
    src = [s for s in sentences("en") if len(s) < 70][:10]
    opts = {"beam": 3, "max_len_b": 12}
    reqs = [hub_request(folder, "encode", src), hub_request(folder, "generate", src, opts),
            hub_request(folder, "interactive", src, opts), hub_request(folder, "roundtrip", src)]
    out = dict(zip(("ids", "gen", "text", "rt"), run([fixtures_dir / name / "model.pt"], fixtures_dir / name, *reqs)))
    assert [model.encode(s).tolist() for s in src] == out["ids"]
    assert autotokenizer_ids(folder, src) == out["ids"]  # the transformers tokenizer files convert wrote
    gen = [h[0]["tokens"].tolist() for h in model.hub_generate(src, **opts)]
    assert gen == out["gen"]
    assert model.translate(src, **opts) == out["text"]
    assert [model.decode(model.encode(s)) for s in src] == out["rt"]
    if name == "mbart_en_ro_spm":
        lang = {sym: i for i, sym in enumerate(tok.src_dict.symbols) if sym.startswith("[")}
        assert all(ids[-2:] == [tok.eos, lang["[en_XX]"]] for ids in out["ids"])
        assert all(g[-1] == lang["[ro_RO]"] for g in gen)
        assert model.generation_defaults()["eos"] == lang["[ro_RO]"]


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("name,direction", [("m2m_multilingual", ("en", "de")), ("m2m_multilingual", ("de", "fr")),
                                            ("mbart50_multilingual", ("en_XX", "ro_RO"))])
def test_many_to_many_model_equals_fairseq(name, direction, fixtures_dir, converted):
    """Many-to-many models (translation_multi_simple_epoch): M2M-100-style (fixed dictionary, language list
    file, `__xx__` tokens, transformer) and mBART-50-style (`[xx_XX]` tokens and <mask>, dict.{lang}.txt, an
    mBART model). The direction is chosen when translating. Against fairseq's own task in that direction (run
    as fairseq-interactive runs it): source `__en__ x </s>`, `__de__` forced first, the text without it."""
    folder = converted(name)
    model = load(folder)
    src_lang, tgt_lang = direction
    src = [s for s in sentences("en") if len(s) < 70][:10]
    opts = {"beam": 3, "max_len_b": 12}
    reqs = [hub_request(folder, "encode", src), hub_request(folder, "generate", src, opts),
            hub_request(folder, "interactive", src, opts), hub_request(folder, "roundtrip", src)]
    out = dict(zip(("ids", "gen", "text", "rt"), run([fixtures_dir / name / "model.pt"], fixtures_dir / name, *reqs,
                                                     overrides=direction_overrides(folder, src_lang, tgt_lang))))
    langs = model.tokenizer.multi["tokens"]
    assert [model.encode(s, src_lang, tgt_lang).tolist() for s in src] == out["ids"]
    assert all(ids[0] == langs[src_lang] for ids in out["ids"])
    if (src_lang, tgt_lang) == model.tokenizer.framing.default_direction():  # the direction its template frames
        assert autotokenizer_ids(folder, src) == out["ids"]
    gen = [h[0]["tokens"].tolist() for h in model.hub_generate(src, source_lang=src_lang, target_lang=tgt_lang,
                                                               **opts)]
    assert gen == out["gen"] and all(g[0] == langs[tgt_lang] for g in gen)
    assert model.translate(src, source_lang=src_lang, target_lang=tgt_lang, **opts) == out["text"]
    assert [model.decode(model.encode(s, src_lang, tgt_lang)) for s in src] == out["rt"]
    with pytest.raises(FairportError, match="name the source language"):
        model.translate(src[:1])
    with pytest.raises(FairportError, match=f"'xx' is not one of this model's: {', '.join(langs)}"):
        model.translate(src[:1], source_lang=src_lang, target_lang="xx")


@needs_fairseq
def test_translate_equals_fairseq_hub(trained_dir, tmp_path):
    """fairseq's TransformerModel.from_pretrained(..., tokenizer='moses', bpe='fastbpe').translate against
    fairport's translate on the same sentences: identical strings (single model and ensemble)."""
    src = (trained_dir / "test.en").read_text().splitlines()[:20]
    for members, name in (([trained_dir / "model.pt"], "single"),
                          ([trained_dir / "model.pt", trained_dir / "model2.pt"], "ensemble")):
        convert(":".join(map(str, members)), tmp_path / name, generation_overrides={"beam": 4, "lenpen": 1.1})
        model = load(tmp_path / name)
        assert model.generation_defaults()["beam"] == 4
        ours = model.translate(src, batch_size=7)
        assert load_tokenizer(tmp_path / name).spec["tokenizer"] == "moses"  # fastBPE codes: WMT19's hub
        [theirs] = run(members, trained_dir, hub_request(tmp_path / name, "sample", src, {"beam": 4, "lenpen": 1.1}))
        assert ours == theirs


@needs_fairseq
@needs_shared
def test_bart_hub_generate_equals_fairseq_hub(fixtures_dir, converted):
    """BART's hub: <s> forced first, GPT-2 BPE in and out. (This random-weight model emits madeupwordNNNN
    fillers, which fairseq's GPT-2 decoder cannot turn into text, so the outputs are compared as ids.)"""
    folder = converted("bart_base_mnli")
    model = load(folder)
    src = sentences("en")[:6]
    opts = {"beam": 3, "max_len_b": 12, "lenpen": 1.5, "min_len": 3}
    ours = [h[0]["tokens"].tolist() for h in model.hub_generate(src, **opts)]
    reqs = [hub_request(folder, "generate", src, opts), hub_request(folder, "roundtrip", src)]
    out = dict(zip(("s", "rt"), run([fixtures_dir / "bart_base_mnli" / "model.pt"], fixtures_dir / "bart_base_mnli",
                                    *reqs)))
    assert ours == out["s"]
    assert [model.decode(model.encode(s)) for s in src] == out["rt"]


@needs_fairseq
def test_generate_cli_writes_one_line_per_input(trained_dir, tmp_path):
    convert(trained_dir, tmp_path / "m")
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join((trained_dir / "test.en").read_text().splitlines()[:9]) + "\n")
    out = tmp_path / "out.txt"
    proc = run_cli("generate", tmp_path / "m", "--input", inp, "--output", out, "--beam", "2", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert "9/9" in proc.stderr  # the progress bar
    lines = out.read_text().splitlines()
    assert lines == load(tmp_path / "m").translate(inp.read_text().splitlines(), beam=2)
    proc = run_cli("generate", tmp_path / "m", "--input", inp, "--output", tmp_path / "out2.txt", "--beam", "2",
                   "--no-pack", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out2.txt").read_text().splitlines() == lines
    proc = run_cli("generate", tmp_path / "m", "--input", inp, "--output", tmp_path / "out3.txt", "--beam", "2",
                   "--dtype", "int8", "--quiet")
    assert proc.returncode == 0, proc.stderr  # int8 outputs may differ: verify measures by how much
    assert (tmp_path / "out3.txt").read_text().splitlines() == load(tmp_path / "m", dtype="int8").translate(
        inp.read_text().splitlines(), beam=2)
