"""Measure where transformers' own tokenizers for a fairport folder differ from fairseq's pipelines,
on the 9000 real sentences in ../shared/data/text. Prints one line per tokenizer.

    python scripts/measure_hf_tokenizers.py [SHARED_DATA_DIR]

GPT-2 (BART): BartTokenizer on the folder's vocab.json/merges.txt vs fairseq's GPT-2 BPE + dictionary.
Moses + fastBPE (WMT19): FSMTTokenizer on vocab-src.json/merges.txt vs fairseq's moses + fastbpe encoders,
with BPE codes learned on the same sentences (real WMT19 codes cannot be downloaded here).
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(shared: Path) -> None:
    from fairseq.data import Dictionary as FairseqDictionary
    from fairseq.data.encoders.fastbpe import fastBPE, fastBPEConfig
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder
    from fairseq.data.encoders.moses_tokenizer import MosesTokenizer, MosesTokenizerConfig
    from sacremoses import MosesTokenizer as Moses
    from subword_nmt.learn_bpe import learn_bpe
    from transformers import BartTokenizer, FSMTTokenizer

    from fairport.converters.tokenizer_files import write_fastbpe, write_gpt2
    from fairport.reference.dictionary import Dictionary

    langs = ("en", "de", "ru")
    text = {lang: (shared / "text" / f"{lang}.txt").read_text(encoding="utf-8").splitlines() for lang in langs}
    tmp = Path(tempfile.mkdtemp())

    # GPT-2
    d = Dictionary.load(shared / "gpt2" / "dict.txt")
    d.add_symbol("<mask>")
    write_gpt2(tmp, shared / "gpt2" / "encoder.json", shared / "gpt2" / "vocab.bpe", d, 1024)
    hf = BartTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    bpe = get_encoder(str(shared / "gpt2" / "encoder.json"), str(shared / "gpt2" / "vocab.bpe"))
    fd = FairseqDictionary.load(str(shared / "gpt2" / "dict.txt"))
    fd.add_symbol("<mask>")
    diff = sum(hf(s)["input_ids"] != fd.encode_line("<s> " + " ".join(map(str, bpe.encode(s))) + " </s>",
                                                      append_eos=False, add_if_not_exist=False).tolist()
               for lang in langs for s in text[lang])
    print(f"BartTokenizer vs fairseq GPT-2 BPE: {diff} of 9000 sentences differ")

    # Moses + fastBPE, per source language
    for lang in langs:
        tok = Moses(lang=lang)
        tokenized = [tok.tokenize(s, aggressive_dash_splits=True, return_str=True, escape=True) for s in text[lang]]
        codes = io.StringIO()
        learn_bpe(io.StringIO("\n".join(tokenized)), codes, 2000, min_frequency=2)
        lines = [ln for ln in codes.getvalue().splitlines() if not ln.startswith("#")]
        folder = tmp / lang
        folder.mkdir()
        (folder / "codes").write_text("".join(f"{ln} {len(lines) - i}\n" for i, ln in enumerate(lines)))
        fb = fastBPE(fastBPEConfig(bpe_codes=str(folder / "codes")))
        moses = MosesTokenizer(MosesTokenizerConfig(source_lang=lang, target_lang=lang))
        dd = Dictionary()
        for s in text[lang]:
            for w in fb.encode(moses.encode(s)).split():
                dd.add_symbol(w)
        dd.write(folder / "dict.txt")
        write_fastbpe(folder, folder / "codes", dd, dd, [lang, lang], 1024)
        hf = FSMTTokenizer(langs=[lang, lang], src_vocab_file=str(folder / "vocab-src.json"),
                           tgt_vocab_file=str(folder / "vocab-tgt.json"), merges_file=str(folder / "merges.txt"))
        fsd = FairseqDictionary.load(str(folder / "dict.txt"))
        diff = 0
        for s in text[lang]:
            want = fsd.encode_line(fb.encode(moses.encode(s)), add_if_not_exist=False).tolist()
            diff += hf(s)["input_ids"] != want
        print(f"FSMTTokenizer ({lang}) vs fairseq moses+fastbpe: {diff} of {len(text[lang])} sentences differ")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data")
