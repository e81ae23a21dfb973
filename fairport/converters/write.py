"""Writing the model folder (reference/folder.py reads it): weights streamed into safetensors, config.json,
generation_config.json, tokenizer files, dictionaries and provenance.json, into a temporary folder beside
DST that replaces DST only when everything succeeded."""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fairport import __version__
from fairport.converters import hf, spm_tokenizer, tasks, weights
from fairport.converters.tokenizer_files import write_fastbpe, write_gpt2, write_sentencepiece
from fairport.errors import FairportError
from fairport.reference import fast
from fairport.reference.folder import INT8, ModelFolder, card_is_fairports, sha256
from fairport.reference.generate import GenerationOptions
from fairport.reference.load import build, read_weights
from fairport.reference.names import to_hf_name
from fairport.reference.tensorfile import write_safetensors
from fairport.reference.tokenizer import Framing

if TYPE_CHECKING:
    from fairport.converters.converted import Converted
    from fairport.converters.sources import Sources

# what fairport writes into a model folder besides the files provenance.json lists
WRITTEN_BESIDE = ("provenance.json", "README.md", "verify", "ensemble")
KEEP_FP32 = ("embed_positions.weight",)  # stored names ending so keep fp32 in FSMT folders (sinusoids)


def check_replaceable(dst: Path) -> None:
    """`--force` replaces only what fairport wrote: an empty folder, or a model folder whose every entry is
    fairport's (the files its provenance.json lists, the card, the default report folder, ensemble members).
    Anything else is refused, so no file of the user's is ever deleted."""
    if dst.is_symlink() or not dst.is_dir():
        raise FairportError(f"{dst} exists and is not a folder: --force replaces only a folder fairport wrote")
    entries = sorted(p.name for p in dst.iterdir())
    if not entries:
        return
    try:
        prov = json.loads((dst / "provenance.json").read_text())
        listed = set(prov["files"]) if "fairport_version" in prov else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        raise FairportError(f"{dst} exists and is not a fairport model folder (no fairport provenance.json): "
                            f"--force replaces only a folder fairport wrote, or an empty one; choose another "
                            f"destination or empty it yourself")
    foreign = [name for name in entries if name not in listed and name not in WRITTEN_BESIDE]
    if "README.md" in entries and not card_is_fairports(dst / "README.md"):
        foreign.append("README.md (a card you wrote or edited)")
    if "verify" in entries:
        from fairport.validation.verify.report import check_report_dir

        try:
            check_report_dir(dst / "verify")
        except FairportError:
            foreign.append("verify/ (holds files verify did not write)")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise FairportError(f"{dst} holds files fairport did not write ({shown}): --force would delete them; "
                            f"move them out or choose another destination")


def generation_config(conv: Converted, overrides: dict | None = None) -> dict:
    """generation_config.json: fairseq's options (the checkpoint's, else fairseq's defaults, then `overrides`)
    under "fairseq", and transformers' names for the same settings."""
    found = {k: conv.generation.get(k, conv.options.get(k)) for k in GenerationOptions.names() - {"eos"}}
    found.update({k: v for k, v in (overrides or {}).items() if v is not None})
    gen = asdict(GenerationOptions(**{k: v for k, v in found.items() if v is not None}))
    gen["eos"] = conv.symbols.get("generation_eos")  # a task's generator ending (and starting) with a language token
    framing = Framing(conv.config.bos, conv.config.eos, bool((conv.text or {}).get("bart")),
                      multi=conv.dicts.multilingual.meta(conv.dicts.src) if conv.dicts.multilingual else None,
                      source_lang=conv.options.get("source_lang"), target_lang=conv.options.get("target_lang"))
    varies = bool(framing.multi and framing.multi["decoder_langtok"] and not framing.target_lang)
    fields, rules = hf.generation_fields(gen, conv.config, None if varies else framing.forced_prefix(), varies)
    return {**fields, "fairseq": gen, "fairseq_source": "checkpoint" if conv.generation else "fairseq defaults",
            "fairseq_rules_not_expressed": rules}


def write_weights(out: Path, tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                  max_shard_bytes: int) -> dict[str, str]:
    """model.safetensors, or shards of at most `max_shard_bytes` with model.safetensors.index.json.
    Consumes `tensors`. Returns {file name: sha256} of the weight files."""
    sizes = {k: t.numel() * dtypes[k].itemsize for k, t in tensors.items()}
    total = sum(sizes.values())
    meta = {"format": "pt", "producer": f"fairport {__version__}"}
    if total <= max_shard_bytes:
        return {"model.safetensors": write_safetensors(out / "model.safetensors", tensors, dtypes, meta)}
    shards: list[list[str]] = [[]]
    size = 0
    for k in tensors:
        if shards[-1] and size + sizes[k] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += sizes[k]
    digests, weight_map = {}, {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        digests[name] = write_safetensors(out / name, {k: tensors.pop(k) for k in keys}, dtypes, meta)
        weight_map.update(dict.fromkeys(keys, name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return digests | {"model.safetensors.index.json": sha256(out / "model.safetensors.index.json")}


def stored_tensors(conv: Converted, family: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Output name -> tensor (the reference's names, or transformers' for `family`), plus notes. Takes the
    tensors out of `conv.state_dict` (it is left empty), so each is materialised only while it is written."""
    out = {}
    for k in list(conv.state_dict):
        t = conv.state_dict.pop(k)
        name = k if family is None else to_hf_name(family, k)
        if name is not None:
            out[name] = t
    extra, notes = weights.transformers_extras(out, family, conv.config)
    return out | extra, notes


def sentencepiece_tokenizer(conv: Converted, meta: dict, out: Path) -> list[str]:
    """transformers' tokenizer files for a sentencepiece folder (converters/spm_tokenizer.py), framing sources
    as the task frames them in the folder's direction (a many-to-many model's default one); a note says what
    they cannot express."""
    if conv.text.get("tokenizer"):
        conv.notes.append(f"transformers tokenizer: not written (tokenizer.json cannot express the "
                          f"{conv.text['tokenizer']} step before sentencepiece); encode with fairport")
        return []
    cfg = conv.config
    framing = Framing(cfg.bos, cfg.eos, bool(conv.text.get("bart")), meta["source_suffix"],
                      conv.symbols.get("generation_eos"), meta["multilingual"], meta["source_lang"],
                      meta["target_lang"])
    src, tgt = framing.default_direction()
    framed = framing.source([-1], None, src, tgt)
    cut = framed.index(-1)
    written, notes = spm_tokenizer.write(out, conv.text_files["sentencepiece_model"], conv.dicts.src, framed[:cut],
                                         framed[cut + 1:], cfg.max_source_positions)
    if framing.multi:
        notes.append(f"transformers tokenizer: frames sources for {src}->{tgt} (its template); for another "
                     f"direction frame the ids as fairport does (Framing.source)")
    if conv.dicts.tgt.symbols != conv.dicts.src.symbols:
        notes.append("transformers tokenizer: encodes and decodes with the source dictionary; the target "
                     "dictionary differs, so decode generated ids with fairport")
    conv.notes += notes
    return written


@dataclass
class MemberWritten:
    transformers: str | None
    unmet: dict[str, list[str]]
    dtype: str
    files: dict[str, str | None]  # file name -> sha256 (None: hash it from disk)


def write_int8(out: Path) -> str:
    """INT8 (model.int8.safetensors) in the folder being written: the int8 model that load(dtype="int8") makes
    from the float weights just written (int8 linear layers and embeddings, a float32 scale per row), stored
    so that an int8 load reads it instead of quantizing. Returns its sha256."""
    folder = ModelFolder.open(out)
    model = build(folder.config, read_weights(folder), fuse=True, finish=fast.Int8Linear, int8_embeddings=True)
    tensors = fast.int8_tensors(model)
    del model
    return write_safetensors(out / INT8, tensors, {k: t.dtype for k, t in tensors.items()},
                             {"format": "pt", "producer": f"fairport {__version__}", "fairport": "int8"})


def write_member(conv: Converted, sources: Sources, out: Path, dtype: torch.dtype | None,
                 max_shard_bytes: int, generation_overrides: dict | None, int8: bool = False) -> MemberWritten:
    """One model's folder contents (an ensemble's later members get one each, under ensemble/)."""
    cfg = conv.config
    family, unmet = hf.hf_family(cfg)
    files: dict[str, str | None] = {}
    langs = [x for x in (conv.options.get("source_lang"), conv.options.get("target_lang")) if x] or None
    tf, bpe = conv.text_files, (conv.text or {}).get("bpe")
    if bpe == "gpt2":
        written = write_gpt2(out, tf["encoder_json"], tf["vocab_bpe"], conv.dicts.tgt, cfg.max_source_positions)
    elif bpe in ("fastbpe", "subword_nmt"):
        written = write_fastbpe(out, tf["bpecodes"], conv.dicts.src, conv.dicts.tgt, langs or ["src", "tgt"],
                                cfg.max_source_positions)
    elif bpe == "sentencepiece":
        written = write_sentencepiece(out, tf["sentencepiece_model"])
    else:
        written = []
    conv.dicts.src.write(out / "dict.src.txt")
    conv.dicts.tgt.write(out / "dict.tgt.txt")
    files.update(dict.fromkeys([*written, "dict.src.txt", "dict.tgt.txt"]))

    source_dtype = conv.state_dict["encoder.embed_tokens.weight"].dtype
    torch_dtype = dtype or source_dtype
    tensors, notes = stored_tensors(conv, family)
    conv.notes += notes
    dtypes = {k: torch_dtype if t.is_floating_point() and not (family == "fsmt" and k.endswith(KEEP_FP32))
              else t.dtype for k, t in tensors.items()}
    files.update(write_weights(out, tensors, dtypes, max_shard_bytes))
    (out / "generation_config.json").write_text(json.dumps(generation_config(conv, generation_overrides), indent=2))
    files["generation_config.json"] = None

    meta = {
        "version": __version__, "model": cfg.to_dict(), "weight_names": family or "fairport", "text": conv.text,
        "source_suffix": conv.symbols.get("source_suffix"),
        "multilingual": conv.dicts.multilingual.meta(conv.dicts.src) if conv.dicts.multilingual else None,
        "task": conv.options.get("task"), "langs": tasks.task_langs(conv.options) or None,
        "source_lang": conv.options.get("source_lang"), "target_lang": conv.options.get("target_lang"),
        "transformers": family, "transformers_unmet": unmet, "stored_dtype": str(torch_dtype).replace("torch.", ""),
    }
    if bpe == "sentencepiece":
        files.update(dict.fromkeys(sentencepiece_tokenizer(conv, meta, out)))
    config = hf.hf_config(family, cfg, {"langs": langs}) if family else {"model_type": "fairport"}
    # the dtype transformers computes in when loaded with its defaults (`dtype="auto"` reads this): float32, as
    # fairseq computes whatever its checkpoint stores (an fp16 release under fp16 compute is ~1e-2 off, and FSMT's
    # and M2M-100's sinusoidal tables, built at init in this dtype, stay wrong even after .float()). The weights
    # stay stored as the checkpoint had them (meta "stored_dtype"); pass dtype=torch.float16 to compute in half.
    config["dtype"] = config["torch_dtype"] = "float32"
    config["fairport"] = meta
    (out / "config.json").write_text(json.dumps(config, indent=2))
    files["config.json"] = None
    if int8:
        files[INT8] = write_int8(out)

    provenance = {
        "fairport_version": __version__,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(sources.checkpoint), "sha256": sha256(sources.checkpoint),
                   "bytes": sources.checkpoint.stat().st_size},
        "inputs": {k: str(v) for k, v in conv.inputs.items()},
        "dtype": meta["stored_dtype"], "arch": cfg.arch, "task": conv.options.get("task"),
        "dropped": conv.dropped, "notes": conv.notes,
        "files": {f: digest or sha256(out / f) for f, digest in sorted(files.items())},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return MemberWritten(family, unmet, meta["stored_dtype"], files)


def write_model_folder(dst: Path, members: list[Callable[[Path], MemberWritten]]) -> MemberWritten:
    """Write the folder with `members` (callables filling a folder: the model, then any ensemble members under
    ensemble/model{N}/) into a temporary folder beside DST, then put it in DST's place (DST, if any, stays
    untouched until everything succeeded)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".fairport-tmp", dir=dst.parent))
    try:
        first = members[0](tmp)
        for n, write in enumerate(members[1:], start=2):
            sub = tmp / "ensemble" / f"model{n}"
            sub.mkdir(parents=True)
            write(sub)
        if len(members) > 1:
            _record_ensemble(tmp, len(members))
        if dst.exists():
            old = dst.with_name(f".{dst.name}.fairport-old")
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return first


def _record_ensemble(folder: Path, n: int) -> None:
    """config.json lists the ensemble's members; provenance.json their sources (and config.json's new hash)."""
    config = json.loads((folder / "config.json").read_text())
    config["fairport"]["ensemble"] = [f"ensemble/model{i}" for i in range(2, n + 1)]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    prov = json.loads((folder / "provenance.json").read_text())
    prov["files"]["config.json"] = sha256(folder / "config.json")
    members = sorted((folder / "ensemble").iterdir())
    prov["ensemble"] = [json.loads((m / "provenance.json").read_text())["source"] for m in members]
    (folder / "provenance.json").write_text(json.dumps(prov, indent=2))
