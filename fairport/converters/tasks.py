"""How each fairseq task builds its dictionaries, as data.

`files`: the dictionary file names beside the checkpoint, for the source and the target side
(`{src}`/`{tgt}` are the task's language codes). `adds`: symbols the task appends after loading, in order;
`[{lang}]` repeats for each of the task's languages. `lang_tokens_if`: an option that must be true for the
language tokens to be added (None: always). `source_suffix`: a symbol the task appends to every source after
`</s>` when it builds inference inputs; `generation_eos`: the symbol its generator uses as EOS (and as the
decoder's first token) instead of `</s>`. Both name the task's languages as `{src}`/`{tgt}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fairport.errors import FairportError
from fairport.reference.dictionary import Dictionary
from fairport.util import comma_list


@dataclass(frozen=True)
class TaskDicts:
    files: tuple[str, str]
    adds: tuple[str, ...] = ()
    lang_tokens_if: str | None = None
    source_suffix: str | None = None
    generation_eos: str | None = None
    multilingual: bool = False  # dictionaries and language tokens: converters/multilingual.py, not `files`/`adds`
    frames_text: bool = False  # the task frames inference inputs itself (BART-architecture models too)


TASKS: dict[str, TaskDicts] = {
    "translation": TaskDicts(("dict.{src}.txt", "dict.{tgt}.txt")),
    "denoising": TaskDicts(("dict.txt", "dict.txt"), ("<mask>",)),
    "multilingual_denoising": TaskDicts(("dict.txt", "dict.txt"), ("[{lang}]", "<mask>"), "add_lang_token"),
    # mBART fine-tuned for translation: source `x </s> [src_lang]`, generation ends with (and starts from) [tgt_lang]
    "translation_from_pretrained_bart": TaskDicts(("dict.{src}.txt", "dict.{tgt}.txt"), ("[{lang}]", "<mask>"),
                                                  source_suffix="[{src}]", generation_eos="[{tgt}]",
                                                  frames_text=True),
    "sentence_prediction": TaskDicts(("dict.txt", "dict.txt"), ("<mask>",)),
    # M2M-100, mBART-50: one shared dictionary, a token per language, the direction chosen at inference
    "translation_multi_simple_epoch": TaskDicts(("dict.{src}.txt", "dict.{tgt}.txt"), multilingual=True,
                                                frames_text=True),
}


def task_langs(options: dict) -> list[str]:
    return comma_list(options.get("langs"))


def dictionary_paths(task: str, options: dict, folder: Path) -> tuple[Path, Path]:
    if task not in TASKS:
        raise FairportError(f"task {task!r} is not supported (fairport knows: {', '.join(sorted(TASKS))}); "
                            f"pass the dictionaries (with every symbol the task adds) with --src-dict/--tgt-dict")
    src, tgt = options.get("source_lang"), options.get("target_lang")
    if "{src}" in TASKS[task].files[0] and (src is None or tgt is None):
        src, tgt = infer_language_pair(folder)
        if src is None:
            if (folder / "dict.txt").exists():
                return folder / "dict.txt", folder / "dict.txt"
            raise FairportError(f"the checkpoint does not name its languages and {folder} does not show them; "
                                f"pass --src-dict and --tgt-dict")
    names = [f.format(src=src, tgt=tgt) for f in TASKS[task].files]
    paths = (folder / names[0], folder / names[1])
    if not (paths[0].exists() and paths[1].exists()) and (folder / "dict.txt").exists():
        # release archives of fine-tunes (e.g. BART summarisation) ship one dict.txt for both sides
        return folder / "dict.txt", folder / "dict.txt"
    return paths


def infer_language_pair(folder: Path) -> tuple[str | None, str | None]:
    """fairseq data_utils.infer_language_pair: from binarized file names such as train.de-en.de.bin."""
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        parts = p.name.split(".")
        if len(parts) >= 3 and len(parts[1].split("-")) == 2:
            src, tgt = parts[1].split("-")
            return src, tgt
    return None, None


def task_additions(task: str, options: dict) -> list[str]:
    spec = TASKS.get(task, TaskDicts(("", "")))
    adds: list[str] = []
    for sym in spec.adds:
        if "{lang}" in sym:
            if spec.lang_tokens_if is None or options.get(spec.lang_tokens_if):
                adds += [sym.format(lang=lang) for lang in task_langs(options)]
        else:
            adds.append(sym)
    return adds


def build_dictionary(path: Path, additions: list[str]) -> Dictionary:
    d = Dictionary.load(path)
    for sym in additions:
        d.add_symbol(sym)
    return d


def task_symbols(task: str, options: dict) -> dict[str, str]:
    """{"source_suffix": symbol, "generation_eos": symbol} for the tasks that have them."""
    spec = TASKS.get(task)
    out = {}
    for name in ("source_suffix", "generation_eos"):
        template = getattr(spec, name, None) if spec else None
        if template:
            src, tgt = options.get("source_lang"), options.get("target_lang")
            if src is None or tgt is None:
                raise FairportError(f"task {task} needs the checkpoint's source_lang/target_lang, and it has none")
            out[name] = template.format(src=src, tgt=tgt)
    return out
