"""fairseq's many-to-many translation task (`translation_multi_simple_epoch`: M2M-100, mBART-50), as data.

The task loads one shared dictionary (`--fixed-dictionary`, `--source-dict`/`--target-dict`, or
`dict.{lang}.txt`) and appends a token per language for each `--langtoks-specs` entry (`__en__` in the
`multilingual` style, `[en_XX]` in the `mbart` style, which also appends `<mask>`), in the order of the
language list (`--langs`, the `--lang-dict` file, or the sorted languages of `--lang-pairs`).
At inference it prepends a language token to the source (`--encoder-langtok src|tgt`) and forces the target
language token as the first generated token (`--decoder-langtok`), stripping it from the output text.
The direction is chosen when translating (`source_lang`/`target_lang`), not at conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fairport.converters.checkpoint import recorded_file
from fairport.errors import FairportError
from fairport.util import comma_list

TASK = "translation_multi_simple_epoch"
STYLES = {"multilingual": "__{}__", "mbart": "[{}]"}
SPEC_SUFFIX = {"main": "", "dae": "_dae", "mined": "_mined"}  # fairseq get_lang_tok: spec ending -> suffix


def _spec_suffix(spec: str) -> str:
    return next((v for k, v in SPEC_SUFFIX.items() if k != "main" and spec.endswith(k)), "")


def lang_token(lang: str, style: str, spec: str = "main") -> str:
    return STYLES[style].format(lang + _spec_suffix(spec))


@dataclass
class Multilingual:
    langs: list[str]
    style: str
    specs: list[str]
    encoder_langtok: str | None  # "src" / "tgt" (and their _dae/_mined forms): which language's token leads
    decoder_langtok: bool
    lang_pairs: list[str]
    mask: bool
    fixed_dictionary: bool = False
    lang_dict: Path | None = None  # the language list file used, for provenance

    @classmethod
    def from_options(cls, options: dict, folder: Path) -> Multilingual:
        problems = []
        style = options.get("lang_tok_style") or "multilingual"
        if style not in STYLES:
            problems.append(f"lang_tok_style={style!r} (fairport knows {', '.join(STYLES)})")
        if options.get("lang_tok_replacing_bos_eos"):
            problems.append("lang_tok_replacing_bos_eos=True")
        if problems:
            raise FairportError(f"{TASK}: unsupported option(s): {'; '.join(problems)}")
        lang_dict = None
        if options.get("langs"):
            langs = comma_list(options["langs"])
        elif options.get("lang_dict"):
            lang_dict = recorded_file(options["lang_dict"], folder)
            if lang_dict is None:
                raise FairportError(f"{TASK}: the checkpoint's language list {options['lang_dict']} (--lang-dict) "
                                    f"is not beside the checkpoint; copy it to {folder} or pass --lang-dict")
            langs = [ln.strip() for ln in lang_dict.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:  # fairseq: inferred from the pairs, sorted
            langs = sorted({x for pair in comma_list(options.get("lang_pairs")) for x in pair.split("-")})
        if not langs:
            raise FairportError(f"{TASK}: the checkpoint names no languages (--langs, --lang-dict or --lang-pairs)")
        extra = options.get("extra_data") or {}
        return cls(langs=langs, style=style, specs=comma_list(options.get("langtoks_specs") or ["main"]),
                   encoder_langtok=options.get("encoder_langtok") or None,
                   decoder_langtok=bool(options.get("decoder_langtok")),
                   lang_pairs=comma_list(options.get("lang_pairs")),
                   mask=style == "mbart" or (isinstance(extra, dict) and "mono_dae" in extra),
                   fixed_dictionary=bool(options.get("fixed_dictionary")), lang_dict=lang_dict)

    def additions(self) -> list[str]:
        """fairseq augment_dictionary: a token per (spec, language), then <mask> for the mbart style."""
        adds = [lang_token(lang, self.style, spec) for spec in self.specs for lang in self.langs]
        return adds + (["<mask>"] if self.mask else [])

    def dictionary_paths(self, options: dict, folder: Path) -> tuple[Path, Path]:
        for option in ("fixed_dictionary",):
            if options.get(option):
                path = recorded_file(options[option], folder)
                if path is None:
                    raise FairportError(f"{TASK}: the checkpoint's --fixed-dictionary {options[option]} is not "
                                        f"beside the checkpoint; copy it there or pass --src-dict/--tgt-dict")
                return path, path
        src = recorded_file(options.get("source_dict"), folder)
        tgt = recorded_file(options.get("target_dict"), folder)
        pair = (self.lang_pairs[0].split("-") if self.lang_pairs else [self.langs[0], self.langs[0]])
        src_lang, tgt_lang = options.get("source_lang") or pair[0], options.get("target_lang") or pair[1]
        return src or folder / f"dict.{src_lang}.txt", tgt or folder / f"dict.{tgt_lang}.txt"

    def meta(self, dictionary) -> dict:
        """What the folder's config.json keeps: the inference framing and each language's token id."""
        return {"langs": self.langs, "lang_pairs": self.lang_pairs, "style": self.style,
                "encoder_langtok": self.encoder_langtok, "decoder_langtok": self.decoder_langtok,
                "fixed_dictionary": self.fixed_dictionary,
                "tokens": {lang: dictionary.index(lang_token(lang, self.style)) for lang in self.langs}}
