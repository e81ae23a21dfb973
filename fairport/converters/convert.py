"""`fairport convert`: a fairseq checkpoint (+ dictionaries, BPE files) -> a model folder.

The folder: config.json (transformers fields when a transformers architecture reproduces the model,
plus a `fairport` section), model.safetensors (sharded with an index when large), generation_config.json,
tokenizer files, the fairseq dictionaries, and provenance.json. It is written into a temporary folder
beside DST and moved into place only when everything succeeded.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fairport import __version__
from fairport.converters import hf, options as opts, tasks, text, weights
from fairport.converters.checkpoint import checkpoint_options, load_checkpoint, recorded_text
from fairport.reference.dictionary import Dictionary
from fairport.converters.multilingual import Multilingual
from fairport.converters.tokenizer_files import write_fastbpe, write_gpt2, write_sentencepiece
from fairport.errors import FairportError
from fairport.reference.config import ModelConfig
from fairport.reference.load import tied_names
from fairport.reference.model import EncoderDecoder, sinusoidal_table
from fairport.reference.names import to_hf_name

CHECKPOINT_NAMES = ("model.pt", "checkpoint_best.pt", "checkpoint_last.pt", "checkpoint.pt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Sources:
    checkpoint: Path
    folder: Path
    src_dict: Path | None = None
    tgt_dict: Path | None = None
    encoder_json: Path | None = None
    vocab_bpe: Path | None = None
    bpecodes: Path | None = None
    sentencepiece_model: Path | None = None
    lang_dict: Path | None = None  # many-to-many: the language list file, when not where the checkpoint says
    explicit: set[str] = field(default_factory=set)  # the files named on the command line
    bpe: str | None = None  # --bpe / --tokenizer given to convert (None: as the checkpoint says)
    tokenizer: str | None = None


@dataclass
class Converted:
    """Everything the converter derived, before anything is written."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    src_dict: Dictionary
    tgt_dict: Dictionary
    options: dict
    generation: dict
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    text: dict | None = None  # the text pipeline (converters/text.py); None: ids only
    text_files: dict[str, Path] = field(default_factory=dict)
    symbols: dict[str, int] = field(default_factory=dict)  # the task's source_suffix / generation_eos ids
    multilingual: dict | None = None  # many-to-many translation: language tokens and framing
    extra_inputs: dict[str, Path] = field(default_factory=dict)  # other files read (a language list)


def find_sources(src: str | Path, **overrides) -> Sources:
    src = Path(src)
    if src.is_dir():
        found = [src / n for n in CHECKPOINT_NAMES if (src / n).is_file()]
        if not found:
            pts = sorted(src.glob("*.pt"))
            if len(pts) == 1:
                found = pts
            elif len(pts) > 1:
                raise FairportError(f"{src} holds several checkpoints ({', '.join(p.name for p in pts)}); "
                                    f"name the one to convert")
            else:
                raise FairportError(f"no fairseq checkpoint (*.pt) in {src}")
        checkpoint, folder = found[0], src
    elif src.is_file():
        checkpoint, folder = src, src.parent
    else:
        raise FairportError(f"source not found: {src}")
    s = Sources(checkpoint, folder, bpe=overrides.get("bpe"), tokenizer=overrides.get("tokenizer"))
    for name in ("encoder_json", "vocab_bpe", "bpecodes", "sentencepiece_model", "lang_dict"):
        if overrides.get(name):
            path = Path(overrides[name])
            if not path.is_file():
                raise FairportError(f"file not found: {path}")
            setattr(s, name, path)
            s.explicit.add(name)
    for name in ("bpe", "tokenizer"):
        allowed = {"bpe": text.BPE_FILES, "tokenizer": text.TOKENIZERS}[name]
        if overrides.get(name) and overrides[name] != "none" and overrides[name] not in allowed:
            raise FairportError(f"--{name} must be one of {', '.join([*allowed, 'none'])}, not {overrides[name]!r}")
    for name in ("src_dict", "tgt_dict"):
        if overrides.get(name):
            p = Path(overrides[name])
            if not p.is_file():
                raise FairportError(f"dictionary not found: {p}")
            setattr(s, name, p)
    return s


def _embedding_rows(sd: dict, key: str) -> int | None:
    t = sd.get(key)
    return int(t.shape[0]) if t is not None else None


def _check_dict(name: str, d: Dictionary, path: Path, adds: list[str], rows: int | None) -> None:
    if rows is not None and rows != len(d):
        extra = f" (+ task additions {adds})" if adds else ""
        raise FairportError(f"dictionary {path.name} gives {len(d)} symbols{extra} but the checkpoint's {name} "
                            f"embedding has {rows} rows: wrong dictionary for this checkpoint")


PADDING_FACTORS = (8, 16, 32, 64, 128)  # fairseq pads to 8 x the model-parallel size


def _pad_dictionaries(sd: dict, src_dict: Dictionary, tgt_dict: Dictionary) -> list[str]:
    """Embeddings with a few more rows than the dictionary, exactly its size rounded up to a multiple of 8
    (x2^k): the dictionary was padded with madeupwordNNNN symbols when the model was built (fairseq's
    pad_to_multiple_, as model-parallel training does; M2M-100 has 8 such rows). Pad it the same way."""
    notes = []
    sides = [(src_dict, "encoder.embed_tokens.weight")]
    if tgt_dict is not src_dict:
        sides.append((tgt_dict, "decoder.embed_tokens.weight"))
    for d, key in sides:
        rows, n = _embedding_rows(sd, key), len(d)
        factor = next((f for f in PADDING_FACTORS if rows is not None and rows > n and -(-n // f) * f == rows), None)
        if factor:
            added = d.pad_to_multiple(factor)
            notes.append(f"{key.split('.')[0]} dictionary padded with {added} madeupwordNNNN symbols to the "
                         f"embedding's {rows} rows (fairseq pad_to_multiple_({factor}))")
    return notes


def convert_state(state: dict, sources: Sources) -> Converted:
    options_raw, generation = checkpoint_options(state)
    family, options = opts.resolve(options_raw)
    if sources.lang_dict is not None:  # --lang-dict: the language list fairseq would read
        options = {**options, "lang_dict": str(sources.lang_dict), "langs": None}
    opts.check_supported(options)
    task = options.get("task") or "translation"

    sd = {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    sd, facts = weights.upgrade(sd, options)

    # dictionaries, with the task's additions (a many-to-many task's: its language list, read once)
    ml = Multilingual.from_options(options, sources.folder) if task in tasks.TASKS and \
        tasks.TASKS[task].multilingual else None
    adds = ml.additions() if ml else tasks.task_additions(task, options)
    if sources.src_dict is None or sources.tgt_dict is None:
        src_path, tgt_path = (ml.dictionary_paths(options, sources.folder) if ml
                              else tasks.dictionary_paths(task, options, sources.folder))
        sources.src_dict = sources.src_dict or src_path
        sources.tgt_dict = sources.tgt_dict or tgt_path
    src_dict = tasks.build_dictionary(sources.src_dict, adds)
    tgt_dict = src_dict if sources.tgt_dict == sources.src_dict else tasks.build_dictionary(sources.tgt_dict, adds)

    dropped: dict[str, str] = {}
    # BART fine-tuned on translation: fairseq drops the <mask> row when the dictionary has no <mask>
    if family == "bart":
        rows = _embedding_rows(sd, "encoder.embed_tokens.weight")
        if rows == len(src_dict) + 1 and "<mask>" not in src_dict:
            for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                      "encoder.output_projection.weight", "decoder.output_projection.weight"):
                if k in sd:
                    sd[k] = sd[k][:-1]
            dropped["<mask> embedding row"] = "dictionary has no <mask> (fairseq BART truncates it too)"

    notes = _pad_dictionaries(sd, src_dict, tgt_dict)

    share_all = bool(options.get("share_all_embeddings"))
    # fairseq's build_model sets share_decoder_input_output_embed when share_all_embeddings is on
    share_dec = bool(options.get("share_decoder_input_output_embed")) or share_all
    if share_dec:  # tied: the projection is the decoder's token embedding
        sd.pop("decoder.output_projection.weight", None)
    if share_all:
        sd.pop("decoder.embed_tokens.weight", None)

    _check_dict("encoder", src_dict, sources.src_dict, adds, _embedding_rows(sd, "encoder.embed_tokens.weight"))
    dec_rows = _embedding_rows(sd, "encoder.embed_tokens.weight" if share_all else "decoder.embed_tokens.weight")
    _check_dict("decoder", tgt_dict, sources.tgt_dict, adds, dec_rows)
    if not share_dec:
        out_rows = _embedding_rows(sd, "decoder.output_projection.weight")
        if out_rows is None:
            raise FairportError("checkpoint has no decoder output projection (decoder.output_projection.weight "
                                "or decoder.embed_out) and does not share it with the embeddings")
        _check_dict("output projection", tgt_dict, sources.tgt_dict, adds, out_rows)
    if share_all and len(src_dict) != len(tgt_dict):
        raise FairportError("share_all_embeddings needs one joined dictionary, but the source and target "
                            f"dictionaries differ ({len(src_dict)} vs {len(tgt_dict)} symbols)")

    kept, dropped_buffers, unknown = weights.split_known(sd)
    weights.check_unknown(unknown)
    dropped.update(dropped_buffers)

    heads = {}
    for k, v in kept.items():
        if k.startswith("classification_heads.") and k.endswith(".out_proj.weight"):
            name = k.split(".")[1]
            heads[name] = {"inner_dim": int(kept[f"classification_heads.{name}.dense.weight"].shape[0]),
                           "num_classes": int(v.shape[0])}

    enc_layers = facts["encoder_layers"] or int(options["encoder_layers"])
    dec_layers = facts["decoder_layers"] or int(options["decoder_layers"])
    dec_embed = kept.get("decoder.embed_tokens.weight", kept.get("encoder.embed_tokens.weight"))
    cfg = ModelConfig(
        src_vocab_size=len(src_dict), tgt_vocab_size=len(tgt_dict), family=family, arch=options["arch"],
        pad=src_dict.pad, bos=src_dict.bos, eos=src_dict.eos, unk=src_dict.unk,
        encoder_embed_dim=int(options["encoder_embed_dim"]),
        encoder_ffn_dim=int(options["encoder_ffn_embed_dim"]),
        encoder_layers=enc_layers,
        encoder_heads=int(options["encoder_attention_heads"]),
        encoder_normalize_before=bool(options["encoder_normalize_before"]),
        encoder_final_norm=bool(options["encoder_normalize_before"]) and facts["encoder_version"] >= 2,
        encoder_learned_pos=bool(options["encoder_learned_pos"]),
        max_source_positions=int(options["max_source_positions"]),
        decoder_embed_dim=int(options["decoder_embed_dim"]),
        decoder_input_embed_dim=int(dec_embed.shape[1]) if dec_embed is not None else int(options["decoder_embed_dim"]),
        decoder_output_dim=int(options["decoder_output_dim"]),
        decoder_ffn_dim=int(options["decoder_ffn_embed_dim"]),
        decoder_layers=dec_layers,
        decoder_heads=int(options["decoder_attention_heads"]),
        decoder_normalize_before=bool(options["decoder_normalize_before"]),
        decoder_final_norm=(bool(options["decoder_normalize_before"]) and not options.get("no_decoder_final_norm")
                            and facts["decoder_version"] > 2),
        decoder_learned_pos=bool(options["decoder_learned_pos"]),
        max_target_positions=int(options["max_target_positions"]),
        positional_embeddings=not options.get("no_token_positional_embeddings"),
        layernorm_embedding=bool(options.get("layernorm_embedding")),
        scale_embedding=not options.get("no_scale_embedding"),
        activation_fn=options["activation_fn"],
        share_all_embeddings=share_all,
        share_decoder_input_output_embed=share_dec,
        pooler_activation_fn=options.get("pooler_activation_fn") or "tanh",
        classification_heads=heads,
    )
    check_shapes(cfg, kept)
    conv = Converted(cfg, kept, src_dict, tgt_dict, options, generation, dropped, notes)
    conv.text, conv.text_files, notes = text.resolve(recorded_text(state), family, task, options, sources)
    conv.notes += notes
    if ml:
        conv.multilingual = ml.meta(src_dict)
        if ml.lang_dict is not None:
            conv.extra_inputs["lang_dict"] = ml.lang_dict
    for name, symbol in tasks.task_symbols(task, options).items():
        d = src_dict if name == "source_suffix" else tgt_dict
        if symbol not in d:
            raise FairportError(f"task {task} uses {symbol} but the dictionary has no such symbol")
        conv.symbols[name] = d.index(symbol)
    return conv


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes the reference model has for `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    tied = tied_names(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def check_shapes(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} != {want[k]}" for k in set(want) & set(sd)
                   if tuple(sd[k].shape) != want[k])
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:6]}" + (f" (+{len(missing) - 6})" if len(missing) > 6 else ""))
    if extra:
        problems.append(f"tensors the options do not explain {extra[:6]}")
    if wrong:
        problems.append(f"shape mismatches {wrong[:4]}")
    if problems:
        raise FairportError("checkpoint does not match its own options: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# writing

GEN_KEYS = {"beam": 5, "lenpen": 1.0, "max_len_a": 0.0, "max_len_b": 200, "min_len": 1,
            "no_repeat_ngram_size": 0, "unkpen": 0.0, "temperature": 1.0, "sampling": False,
            "sampling_topk": -1, "sampling_topp": -1.0, "match_source_len": False}


def generation_config(conv: Converted, overrides: dict | None = None) -> dict:
    gen = {k: conv.generation.get(k, conv.options.get(k, default)) for k, default in GEN_KEYS.items()}
    gen = {k: (GEN_KEYS[k] if v is None else v) for k, v in gen.items()}
    gen.update({k: v for k, v in (overrides or {}).items() if v is not None})
    c = conv.config
    eos = conv.symbols.get("generation_eos")
    if eos is not None:  # the task's generator ends (and starts) with a language token, not </s>
        gen["eos"] = eos
    source = "checkpoint" if conv.generation else "fairseq defaults"
    return {
        # transformers' names
        "num_beams": int(gen["beam"]), "length_penalty": float(gen["lenpen"]),
        "max_length": min(int(gen["max_len_b"]), c.max_target_positions - 1), "min_length": int(gen["min_len"]),
        "no_repeat_ngram_size": int(gen["no_repeat_ngram_size"]), "early_stopping": True,
        "bos_token_id": c.bos, "eos_token_id": c.eos if eos is None else eos, "pad_token_id": c.pad,
        "decoder_start_token_id": c.eos if eos is None else eos,
        # fairseq's names and semantics, used by fairport's generation
        "fairseq": gen, "fairseq_source": source,
    }


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _stored_tensors(conv: Converted, naming: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Output name -> tensor, as stored. Takes the tensors out of `conv.state_dict` (it is left empty) and
    leaves the dtype cast to the writer, so each tensor is materialised only while it is written."""
    out = {}
    for k in list(conv.state_dict):
        t = conv.state_dict.pop(k)
        name = k if naming == "fairport" else to_hf_name(naming, k)
        if name is not None:
            out[name] = t
    if naming in ("bart", "mbart"):
        out["final_logits_bias"] = torch.zeros(1, conv.config.tgt_vocab_size, dtype=dtype or torch.float32)
    if naming == "fsmt":  # transformers' FSMT keeps its sinusoidal tables as weights
        c = conv.config
        for side, n, dim in (("encoder", c.max_source_positions, c.encoder_embed_dim),
                             ("decoder", c.max_target_positions, c.decoder_embed_dim)):
            # kept in fp32 whatever the weights' dtype (KEEP_FP32): fairseq computes them in fp32, and
            # rounding them to fp16 here would change an fp32 run's logits
            out[f"model.{side}.embed_positions.weight"] = sinusoidal_table(n + c.pad + 1, dim, c.pad)
    if naming == "fsmt" and not conv.config.share_all_embeddings and conv.config.share_decoder_input_output_embed:
        # transformers' FSMT cannot tie only the decoder's input and output: store the projection too
        out["model.decoder.output_projection.weight"] = out["model.decoder.embed_tokens.weight"]
        conv.notes.append("decoder embeddings stored twice (tied in fairseq; FSMT ties only all-or-nothing)")
    return out


KEEP_FP32 = ("embed_positions.weight",)  # stored names ending so keep fp32 in FSMT folders (sinusoids)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def _stored_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None, naming: str) -> torch.dtype:
    if dtype is None or not t.is_floating_point() or (naming == "fsmt" and name.endswith(KEEP_FP32)):
        return t.dtype
    return dtype


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                      metadata: dict[str, str]) -> str:
    """Write a safetensors file one tensor at a time, popping each from `tensors` once written: memory holds
    one converted tensor at a time (the format: 8-byte header length, JSON header, then the raw bytes).
    Returns the file's sha256, computed while writing."""
    if sys.byteorder != "little":
        raise FairportError("writing safetensors needs a little-endian machine")
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * dtypes[name].itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtypes[name]], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for name in list(tensors):
            t = tensors.pop(name).to(dtypes[name]).contiguous()
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy().data
                f.write(data)
                digest.update(data)
            del t
    return digest.hexdigest()


def write_weights(out: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, naming: str,
                  max_shard_bytes: int) -> dict[str, str]:
    """model.safetensors, or shards of at most `max_shard_bytes` with model.safetensors.index.json.
    Consumes `tensors`. Returns {file name: sha256} of the weight files."""
    dtypes = {k: _stored_dtype(k, t, dtype, naming) for k, t in tensors.items()}
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
        weight_map.update({k: name for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return digests | {"model.safetensors.index.json": sha256(out / "model.safetensors.index.json")}


def _source_dtype(conv: Converted) -> torch.dtype:
    return conv.state_dict["encoder.embed_tokens.weight"].dtype


def write_folder(conv: Converted, sources: Sources, out: Path, dtype: str = "auto",
                 max_shard_bytes: int = 2 << 30, generation_overrides: dict | None = None) -> dict:
    cfg = conv.config
    family, unmet = hf.hf_family(cfg)
    naming = family or "fairport"
    torch_dtype = _source_dtype(conv) if dtype == "auto" else DTYPES[dtype]
    files = []
    langs = [conv.options.get("source_lang"), conv.options.get("target_lang")]
    langs = [x for x in langs if x] or None
    tf = conv.text_files
    bpe = conv.text["bpe"] if conv.text else None
    if bpe == "gpt2":
        files += write_gpt2(out, tf["encoder_json"], tf["vocab_bpe"], conv.tgt_dict, cfg.max_source_positions)
    elif bpe in ("fastbpe", "subword_nmt"):
        files += write_fastbpe(out, tf["bpecodes"], conv.src_dict, conv.tgt_dict, langs or ["src", "tgt"],
                               cfg.max_source_positions)
    elif bpe == "sentencepiece":
        files += write_sentencepiece(out, tf["sentencepiece_model"])
    conv.src_dict.write(out / "dict.src.txt")
    conv.tgt_dict.write(out / "dict.tgt.txt")
    files += ["dict.src.txt", "dict.tgt.txt"]

    digests = write_weights(out, _stored_tensors(conv, naming, torch_dtype), torch_dtype, naming, max_shard_bytes)
    files += list(digests)
    gen = generation_config(conv, generation_overrides)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    files.append("generation_config.json")

    fairport_meta = {
        "version": __version__, "model": cfg.to_dict(), "weight_names": naming, "text": conv.text,
        "source_suffix": conv.symbols.get("source_suffix"), "multilingual": conv.multilingual,
        "task": conv.options.get("task"), "langs": tasks.task_langs(conv.options) or None,
        "source_lang": conv.options.get("source_lang"), "target_lang": conv.options.get("target_lang"),
        "transformers": family, "transformers_unmet": unmet,
    }
    config = hf.hf_config(family, cfg, {"langs": langs}) if family else {"model_type": "fairport"}
    config["torch_dtype"] = str(torch_dtype).replace("torch.", "")
    config["fairport"] = fairport_meta
    (out / "config.json").write_text(json.dumps(config, indent=2))
    files.append("config.json")

    provenance = {
        "fairport_version": __version__,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(sources.checkpoint), "sha256": sha256(sources.checkpoint),
                   "bytes": sources.checkpoint.stat().st_size},
        "inputs": {**{k: str(getattr(sources, k)) for k in ("src_dict", "tgt_dict") if getattr(sources, k)},
                   **{k: str(v) for k, v in {**conv.text_files, **conv.extra_inputs}.items()}},
        "dtype": config["torch_dtype"], "arch": cfg.arch, "task": conv.options.get("task"),
        "dropped": conv.dropped, "notes": conv.notes,
        "files": {f: digests.get(f) or sha256(out / f) for f in sorted(files)},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return {"family": family, "unmet": unmet, "files": files + ["provenance.json"], "dtype": str(torch_dtype),
            "text": conv.text, "notes": list(conv.notes)}


# what fairport writes into a model folder besides the files provenance.json lists
WRITTEN_BESIDE = ("provenance.json", "README.md", "verify", "ensemble")


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
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise FairportError(f"{dst} holds files fairport did not write ({shown}): --force would delete them; "
                            f"move them out or choose another destination")


def ensemble_members(src: str | Path) -> list[Path]:
    """fairseq's `a.pt:b.pt` syntax, or a folder of model1.pt, model2.pt, ... (no model.pt): the members."""
    spec = str(src)
    if ":" in spec and not Path(spec).exists():
        return [Path(p) for p in spec.split(":") if p]
    folder = Path(spec)
    if folder.is_dir() and not any((folder / n).is_file() for n in CHECKPOINT_NAMES):
        pts = sorted(folder.glob("*.pt"))
        if len(pts) > 1:
            return pts
    return [folder]


def convert(src: str | Path, dst: str | Path, *, force: bool = False, dtype: str = "auto",
            max_shard_bytes: int = 2 << 30, generation_overrides: dict | None = None, **source_overrides) -> dict:
    """Convert SRC (checkpoint file, release folder, or an ensemble: `a.pt:b.pt` / a folder of model*.pt)
    into the model folder DST, atomically. Ensemble members after the first go to DST/ensemble/model{N}/."""
    dst = Path(dst)
    if dtype != "auto" and dtype not in DTYPES:
        raise FairportError(f"--dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FairportError(f"{dst} already exists (use --force to replace a folder fairport wrote)")
        check_replaceable(dst)
    members = []
    for i, path in enumerate(ensemble_members(src)):
        sources = find_sources(path, **source_overrides)
        conv = convert_state(load_checkpoint(sources.checkpoint), sources)
        if members and (conv.src_dict.symbols != members[0][1].src_dict.symbols
                        or conv.tgt_dict.symbols != members[0][1].tgt_dict.symbols):
            raise FairportError(f"ensemble member {sources.checkpoint} does not share the first member's "
                                f"dictionaries")
        members.append((sources, conv))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".fairport-tmp", dir=dst.parent))
    try:
        result = write_folder(members[0][1], members[0][0], tmp, dtype, max_shard_bytes, generation_overrides)
        for n, (sources, conv) in enumerate(members[1:], start=2):
            sub = tmp / "ensemble" / f"model{n}"
            sub.mkdir(parents=True)
            write_folder(conv, sources, sub, dtype, max_shard_bytes, generation_overrides)
        if len(members) > 1:
            config = json.loads((tmp / "config.json").read_text())
            config["fairport"]["ensemble"] = [f"ensemble/model{n}" for n in range(2, len(members) + 1)]
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            _refresh_provenance(tmp)
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
    result["config"] = members[0][1].config
    result["dst"] = str(dst)
    result["members"] = len(members)
    result["member_checkpoints"] = [str(sources.checkpoint) for sources, _ in members]
    return result


def _refresh_provenance(folder: Path) -> None:
    prov = json.loads((folder / "provenance.json").read_text())
    prov["files"]["config.json"] = sha256(folder / "config.json")
    members = sorted((folder / "ensemble").iterdir())
    prov["ensemble"] = [json.loads((m / "provenance.json").read_text())["source"] for m in members]
    (folder / "provenance.json").write_text(json.dumps(prov, indent=2))
