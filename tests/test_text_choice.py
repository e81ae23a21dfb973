"""Which text pipeline `fairport convert` gives a folder: the checkpoint's own --tokenizer/--bpe when it
recorded them, explicit flags before that, the release's files when it recorded nothing; and how a
many-to-many model's language tokens are added."""

from __future__ import annotations

import argparse

import pytest
import torch

from fairport.converters import text
from fairport.converters.checkpoint import recorded_text
from fairport.converters.sources import Sources
from helpers import needs_fairseq


def sources(folder, **kw):
    return Sources(folder / "model.pt", folder, **kw)


def resolve(recorded, folder, family="transformer", task="translation", **kw):
    return text.resolve(recorded, family, task, {"source_lang": "de", "target_lang": "en"}, sources(folder, **kw))


def test_release_files_decide_when_nothing_is_recorded(tmp_path):
    (tmp_path / "bpecodes").write_text("a b 3\n")
    spec, files, notes = resolve({}, tmp_path)
    assert (spec["tokenizer"], spec["bpe"], spec["bart"]) == ("moses", "fastbpe", False)  # WMT19's hub entries
    assert (spec["moses_source_lang"], spec["moses_target_lang"]) == ("de", "en")
    assert files == {"bpecodes": tmp_path / "bpecodes"} and notes == []



def test_nothing_recorded_and_no_files_is_fairseqs_whitespace_pipeline(tmp_path):
    """fairseq's hub and fairseq-interactive take such a model's text as whitespace-separated dictionary symbols
    (said once in provenance); BART's hub defaults to GPT-2 BPE, so a BART without those files is ids-only and
    the note names the flags that give it text."""
    spec, files, notes = resolve({}, tmp_path / "nothing-here")
    assert spec == {"tokenizer": None, "bpe": None, "bart": False} and files == {}
    assert len(notes) == 1 and "whitespace-separated dictionary symbols" in notes[0]
    spec, files, notes = resolve({}, tmp_path / "nothing-here", family="bart", task="denoising")
    assert spec is None and "--gpt2-encoder-json" in notes[0]
    assert resolve({}, tmp_path / "nothing-here", bpe="none")[0] is None  # --bpe none: ids only, on purpose


def test_recorded_choice_wins_over_files_and_is_trusted_whole(tmp_path):
    (tmp_path / "bpecodes").write_text("a b\n")
    (tmp_path / "sentence.bpe.model").write_bytes(b"x")
    spec, files, _ = resolve({"bpe": "sentencepiece", "tokenizer": None}, tmp_path)
    assert (spec["tokenizer"], spec["bpe"]) == (None, "sentencepiece")
    assert files == {"sentencepiece_model": tmp_path / "sentence.bpe.model"}
    # fastBPE recorded without a tokenizer: no Moses (the recorded choice, not the WMT19 convention)
    spec, _, _ = resolve({"bpe": "fastbpe", "tokenizer": None, "moses_no_escape": True}, tmp_path)
    assert spec["tokenizer"] is None
    spec, _, _ = resolve({"bpe": "subword_nmt", "tokenizer": "moses", "moses_no_escape": True,
                          "bpe_codes": "/gone/bpecodes"}, tmp_path)
    assert (spec["bpe"], spec["moses_escape"], spec["moses_dash_splits"]) == ("subword_nmt", False, True)


def test_recorded_file_is_found_by_its_name_beside_the_checkpoint(tmp_path):
    (tmp_path / "my.spm").write_bytes(b"x")
    _, files, _ = resolve({"bpe": "sentencepiece", "sentencepiece_model": "/trainer/data/my.spm"}, tmp_path)
    assert files == {"sentencepiece_model": tmp_path / "my.spm"}
    url = "https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/encoder.json"
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_text("#version\n")
    _, files, _ = resolve({"bpe": "gpt2", "gpt2_encoder_json": url}, tmp_path)
    assert files == {"encoder_json": tmp_path / "encoder.json", "vocab_bpe": tmp_path / "vocab.bpe"}


def test_explicit_flags_beat_the_record(tmp_path):
    spm = tmp_path / "x.model"
    spm.write_bytes(b"x")
    spec, files, _ = resolve({"bpe": "gpt2"}, tmp_path, sentencepiece_model=spm)
    assert spec["bpe"] == "sentencepiece" and files["sentencepiece_model"] == spm
    (tmp_path / "spm.model").write_bytes(b"x")
    spec, _, _ = resolve({"bpe": "sentencepiece", "tokenizer": None}, tmp_path, bpe="sentencepiece",
                         tokenizer="moses")
    assert spec["tokenizer"] == "moses"
    assert resolve({"bpe": "sentencepiece"}, tmp_path, bpe="none")[0] is None


@pytest.mark.parametrize("recorded,word", [({"bpe": "bytes"}, "--bpe bytes"),
                                           ({"bpe": "sentencepiece", "tokenizer": "nltk"}, "--tokenizer nltk")])
def test_unreproduced_pipelines_leave_ids_only_and_say_so(recorded, word, tmp_path):
    (tmp_path / "spm.model").write_bytes(b"x")
    spec, files, notes = resolve(recorded, tmp_path)
    assert spec is None and files == {} and len(notes) == 1 and word in notes[0]


def test_framing_follows_the_family_and_task(tmp_path):
    (tmp_path / "sentence.bpe.model").write_bytes(b"x")
    rec = {"bpe": "sentencepiece"}
    assert resolve(rec, tmp_path, family="bart", task="multilingual_denoising")[0]["bart"] is True
    assert resolve(rec, tmp_path, family="bart", task="translation_from_pretrained_bart")[0]["bart"] is False


def test_recorded_text_reads_cfg_sections_and_legacy_args():
    cfg = {"model": {}, "bpe": {"_name": "sentencepiece", "sentencepiece_model": "/x/sentence.bpe.model"},
           "tokenizer": None}
    assert recorded_text({"cfg": cfg}) == {"bpe": "sentencepiece", "tokenizer": None,
                                           "sentencepiece_model": "/x/sentence.bpe.model"}
    args = argparse.Namespace(arch="transformer", bpe="fastbpe", bpe_codes="/x/codes", tokenizer="moses",
                              moses_source_lang="en", dropout=0.1)
    assert recorded_text({"args": args}) == {"bpe": "fastbpe", "bpe_codes": "/x/codes", "tokenizer": "moses",
                                             "moses_source_lang": "en"}
    # 0.10-era checkpoints: a cfg without bpe/tokenizer sections next to the legacy args
    assert recorded_text({"cfg": {"model": {}}, "args": args})["bpe"] == "fastbpe"
    assert recorded_text({"args": argparse.Namespace(arch="transformer")}) == {"bpe": None, "tokenizer": None}


def test_many_to_many_dictionary_additions_follow_fairseq(tmp_path):
    """fairseq augment_dictionary: a token per (spec, language) in the language list's order, <mask> for the
    mbart style; the list from --langs, the --lang-dict file (found by name beside the checkpoint) or the
    sorted languages of --lang-pairs."""
    from fairport.converters.multilingual import Multilingual
    from fairport.errors import FairportError

    ml = Multilingual.from_options({"lang_pairs": "fr-en,en-de", "encoder_langtok": "src"}, tmp_path)
    assert ml.additions() == ["__de__", "__en__", "__fr__"]
    ml = Multilingual.from_options({"langs": ["en_XX", "ro_RO"], "lang_tok_style": "mbart",
                                    "langtoks_specs": "main,dae", "lang_pairs": "en_XX-ro_RO"}, tmp_path)
    assert ml.additions() == ["[en_XX]", "[ro_RO]", "[en_XX_dae]", "[ro_RO_dae]", "<mask>"]
    (tmp_path / "ML50_langs.txt").write_text("ar_AR\ncs_CZ\n\nen_XX\n")
    ml = Multilingual.from_options({"lang_dict": "/trainer/ML50_langs.txt", "lang_pairs": "en_XX-ar_AR"}, tmp_path)
    assert ml.langs == ["ar_AR", "cs_CZ", "en_XX"] and ml.lang_dict == tmp_path / "ML50_langs.txt"
    with pytest.raises(FairportError, match="language list /elsewhere/langs.txt .* is not beside"):
        Multilingual.from_options({"lang_dict": "/elsewhere/langs.txt"}, tmp_path)
    with pytest.raises(FairportError, match=r"lang_tok_style='weird' \(.*\); lang_tok_replacing_bos_eos=True"):
        Multilingual.from_options({"langs": "en", "lang_tok_style": "weird", "lang_tok_replacing_bos_eos": True},
                                  tmp_path)
    (tmp_path / "model_dict.128k.txt").write_text("a 1\n")
    assert Multilingual.from_options({"langs": "en,de"}, tmp_path).dictionary_paths(
        {"fixed_dictionary": "/data/model_dict.128k.txt"}, tmp_path) == (tmp_path / "model_dict.128k.txt",) * 2


@needs_fairseq
def test_lang_dict_flag_replaces_the_recorded_language_list(fixtures_dir, tmp_path):
    import json

    from fairport.converters.convert import convert

    langs = tmp_path / "langs.txt"
    langs.write_text("fr\nen\nde\n")
    convert(fixtures_dir / "m2m_multilingual", tmp_path / "out", lang_dict=langs)
    multi = json.loads((tmp_path / "out" / "config.json").read_text())["fairport"]["multilingual"]
    assert list(multi["tokens"]) == ["fr", "en", "de"] and multi["tokens"]["fr"] < multi["tokens"]["de"]
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["inputs"]["lang_dict"] == str(langs)


@needs_fairseq
def test_dictionary_padded_to_the_embedding_rows_as_fairseq_pads_it(fixtures_dir):
    """M2M-100's embeddings have 8 rows more than its dictionary + language tokens: fairseq padded the
    dictionary with madeupwordNNNN to a multiple of 8 when building the model. Rows that padding explains
    are accepted (and noted); any other count is still the wrong-dictionary error."""
    from fairport.converters.checkpoint import load_checkpoint
    from fairport.converters.convert import convert_state
    from fairport.errors import FairportError

    folder = fixtures_dir / "m2m_multilingual"
    state = load_checkpoint(folder / "model.pt")
    w = state["model"]["encoder.embed_tokens.weight"]
    n = w.shape[0]  # 404: 401 dictionary symbols + __en__ __de__ __fr__
    state["model"]["encoder.embed_tokens.weight"] = torch.cat([w, torch.zeros(8 - n % 8, w.shape[1])])
    conv = convert_state(state, Sources(folder / "model.pt", folder))
    assert conv.config.src_vocab_size == conv.config.tgt_vocab_size == 408
    assert conv.dicts.src.symbols[n:] == [f"madeupword{i:04d}" for i in range(408 - n)]
    assert conv.dicts.multilingual.meta(conv.dicts.src)["tokens"] == {"en": 401, "de": 402, "fr": 403}
    assert any("padded with 4 madeupwordNNNN" in note for note in conv.notes)
    state = load_checkpoint(folder / "model.pt")
    state["model"]["encoder.embed_tokens.weight"] = torch.cat([w, torch.zeros(6, w.shape[1])])
    with pytest.raises(FairportError, match="wrong dictionary"):
        convert_state(state, Sources(folder / "model.pt", folder))
