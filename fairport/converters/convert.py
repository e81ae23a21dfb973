"""`fairport convert`: a fairseq checkpoint (+ dictionaries, BPE files) -> a model folder.

`convert_state` derives everything the folder holds from the checkpoint, as named steps (nothing is written);
`convert` does that for each ensemble member and writes the folder atomically (converters/write.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fairport.converters import options as opts
from fairport.converters import tasks, text, weights
from fairport.converters.checkpoint import checkpoint_options, load_checkpoint, recorded_text
from fairport.converters.converted import Converted, Dictionaries
from fairport.converters.multilingual import Multilingual
from fairport.converters.sources import Sources, ensemble_members, find_sources
from fairport.converters.write import check_replaceable, write_member, write_model_folder
from fairport.errors import FairportError
from fairport.reference import fast
from fairport.reference.config import ModelConfig
from fairport.reference.dictionary import Dictionary
from fairport.reference.load import tied_names
from fairport.reference.model import EncoderDecoder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the steps of convert_state ---------------------------------------------------------------------

def read_options(state: dict, sources: Sources) -> tuple[str, dict, dict]:
    """The checkpoint's model/task options filled from its arch preset chain, checked for what the reference
    cannot reproduce (all reported at once). Returns (family, options, generation settings)."""
    raw, generation = checkpoint_options(state)
    family, options = opts.resolve(raw)
    if sources.lang_dict is not None:  # --lang-dict: the language list fairseq would read
        options = {**options, "lang_dict": str(sources.lang_dict), "langs": None}
    opts.check_supported(options)
    options.setdefault("task", "translation")
    options["task"] = options["task"] or "translation"
    return family, options, generation


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def build_dictionaries(options: dict, sources: Sources) -> Dictionaries:
    """The dictionaries the task loads (named files first, else where the task finds them beside the
    checkpoint), with the symbols the task appends (a many-to-many task's: its language list, read once)."""
    task = options["task"]
    ml = Multilingual.from_options(options, sources.folder) if task in tasks.TASKS and \
        tasks.TASKS[task].multilingual else None
    adds = ml.additions() if ml else tasks.task_additions(task, options)
    src_path, tgt_path = sources.src_dict, sources.tgt_dict
    if src_path is None or tgt_path is None:
        found = (ml.dictionary_paths(options, sources.folder) if ml
                 else tasks.dictionary_paths(task, options, sources.folder))
        src_path, tgt_path = src_path or found[0], tgt_path or found[1]
    src = tasks.build_dictionary(src_path, adds)
    tgt = src if tgt_path == src_path else tasks.build_dictionary(tgt_path, adds)
    return Dictionaries(src, tgt, src_path, tgt_path, adds, ml)


PADDING_FACTORS = (8, 16, 32, 64, 128)  # fairseq pads to 8 x the model-parallel size


def pad_dictionaries(sd: dict, dicts: Dictionaries) -> list[str]:
    """Embeddings with a few more rows than the dictionary, exactly its size rounded up to a multiple of 8
    (x2^k): the dictionary was padded with madeupwordNNNN symbols when the model was built (fairseq's
    pad_to_multiple_, as model-parallel training does; M2M-100 has 8 such rows). Pad it the same way."""
    notes = []
    sides = [(dicts.src, "encoder.embed_tokens.weight")]
    if dicts.tgt is not dicts.src:
        sides.append((dicts.tgt, "decoder.embed_tokens.weight"))
    for d, key in sides:
        n, r = len(d), weights.rows(sd, key)
        factor = next((f for f in PADDING_FACTORS if r is not None and r > n and -(-n // f) * f == r), None)
        if factor:
            added = d.pad_to_multiple(factor)
            notes.append(f"{key.split('.')[0]} dictionary padded with {added} madeupwordNNNN symbols to the "
                         f"embedding's {r} rows (fairseq pad_to_multiple_({factor}))")
    return notes


def check_dictionaries(sd: dict, dicts: Dictionaries, share_all: bool, share_dec: bool) -> None:
    """Each embedding has exactly one row per dictionary symbol (a clear error naming the file otherwise)."""
    def check(name: str, d: Dictionary, path: Path, r: int | None) -> None:
        if r is not None and r != len(d):
            extra = f" (+ task additions {dicts.additions})" if dicts.additions else ""
            raise FairportError(f"dictionary {path.name} gives {len(d)} symbols{extra} but the checkpoint's {name} "
                                f"embedding has {r} rows: wrong dictionary for this checkpoint")

    check("encoder", dicts.src, dicts.src_path, weights.rows(sd, "encoder.embed_tokens.weight"))
    dec = "encoder.embed_tokens.weight" if share_all else "decoder.embed_tokens.weight"
    check("decoder", dicts.tgt, dicts.tgt_path, weights.rows(sd, dec))
    if not share_dec:
        out = weights.rows(sd, "decoder.output_projection.weight")
        if out is None:
            raise FairportError("checkpoint has no decoder output projection (decoder.output_projection.weight "
                                "or decoder.embed_out) and does not share it with the embeddings")
        check("output projection", dicts.tgt, dicts.tgt_path, out)
    if share_all and len(dicts.src) != len(dicts.tgt):
        raise FairportError("share_all_embeddings needs one joined dictionary, but the source and target "
                            f"dictionaries differ ({len(dicts.src)} vs {len(dicts.tgt)} symbols)")


def config_from_options(family: str, options: dict, facts: dict, dicts: Dictionaries, sd: dict) -> ModelConfig:
    """fairseq's options (and what the state dict shows: pruned layers, version markers, embedding widths)
    as the reference's ModelConfig."""
    o = options
    share_all = bool(o.get("share_all_embeddings"))
    dec_embed = sd.get("decoder.embed_tokens.weight", sd.get("encoder.embed_tokens.weight"))
    d = dicts.src
    return ModelConfig(
        src_vocab_size=len(dicts.src), tgt_vocab_size=len(dicts.tgt), family=family, arch=o["arch"],
        pad=d.pad, bos=d.bos, eos=d.eos, unk=d.unk,
        encoder_embed_dim=int(o["encoder_embed_dim"]),
        encoder_ffn_dim=int(o["encoder_ffn_embed_dim"]),
        encoder_layers=facts["encoder_layers"] or int(o["encoder_layers"]),
        encoder_heads=int(o["encoder_attention_heads"]),
        encoder_normalize_before=bool(o["encoder_normalize_before"]),
        # fairseq's version markers: encoder < 2 or decoder <= 2 means no layer norm after the last layer
        encoder_final_norm=bool(o["encoder_normalize_before"]) and facts["encoder_version"] >= 2,
        encoder_learned_pos=bool(o["encoder_learned_pos"]),
        max_source_positions=int(o["max_source_positions"]),
        decoder_embed_dim=int(o["decoder_embed_dim"]),
        decoder_input_embed_dim=int(dec_embed.shape[1]) if dec_embed is not None else int(o["decoder_embed_dim"]),
        decoder_output_dim=int(o["decoder_output_dim"]),
        decoder_ffn_dim=int(o["decoder_ffn_embed_dim"]),
        decoder_layers=facts["decoder_layers"] or int(o["decoder_layers"]),
        decoder_heads=int(o["decoder_attention_heads"]),
        decoder_normalize_before=bool(o["decoder_normalize_before"]),
        decoder_final_norm=(bool(o["decoder_normalize_before"]) and not o.get("no_decoder_final_norm")
                            and facts["decoder_version"] > 2),
        decoder_learned_pos=bool(o["decoder_learned_pos"]),
        max_target_positions=int(o["max_target_positions"]),
        positional_embeddings=not o.get("no_token_positional_embeddings"),
        layernorm_embedding=bool(o.get("layernorm_embedding")),
        scale_embedding=not o.get("no_scale_embedding"),
        activation_fn=o["activation_fn"],
        share_all_embeddings=share_all,
        # fairseq's build_model sets share_decoder_input_output_embed when share_all_embeddings is on
        share_decoder_input_output_embed=bool(o.get("share_decoder_input_output_embed")) or share_all,
        pooler_activation_fn=o.get("pooler_activation_fn") or "tanh",
        classification_heads=weights.classification_heads(sd),
    )


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


def task_symbols(options: dict, dicts: Dictionaries) -> dict[str, int]:
    """The ids of the task's framing symbols: mBART translation's source suffix and generation EOS."""
    out = {}
    for name, symbol in tasks.task_symbols(options["task"], options).items():
        d = dicts.src if name == "source_suffix" else dicts.tgt
        if symbol not in d:
            raise FairportError(f"task {options['task']} uses {symbol} but the dictionary has no such symbol")
        out[name] = d.index(symbol)
    return out


def convert_state(state: dict, sources: Sources) -> Converted:
    """A loaded checkpoint -> the reference config, its tensors and everything else the folder holds."""
    family, options, generation = read_options(state, sources)
    sd, facts = weights.upgrade(model_tensors(state), options)
    dicts = build_dictionaries(options, sources)
    dropped = {}
    if family == "bart" and "<mask>" not in dicts.src and \
            weights.rows(sd, "encoder.embed_tokens.weight") == len(dicts.src) + 1:
        sd = weights.drop_mask_row(sd, len(dicts.src))
        dropped["<mask> embedding row"] = "dictionary has no <mask> (fairseq BART truncates it too)"
    notes = pad_dictionaries(sd, dicts)
    share_all = bool(options.get("share_all_embeddings"))
    share_dec = bool(options.get("share_decoder_input_output_embed")) or share_all
    sd = weights.untie(sd, share_all, share_dec)
    check_dictionaries(sd, dicts, share_all, share_dec)
    kept, dropped_buffers, unknown = weights.split_known(sd)
    weights.check_unknown(unknown)
    dropped.update(dropped_buffers)
    cfg = config_from_options(family, options, facts, dicts, kept)
    check_shapes(cfg, kept)
    text_spec, text_files, text_notes = text.resolve(recorded_text(state), family, options["task"], options,
                                                     sources)
    return Converted(cfg, kept, dicts, options, generation, dropped, notes + text_notes, text_spec, text_files,
                     task_symbols(options, dicts))


# ---- convert ----------------------------------------------------------------------------------------

@dataclass
class ConvertResult:
    dst: Path
    config: ModelConfig
    transformers: str | None  # the transformers family that loads the folder, if one reproduces the model
    unmet: dict[str, list[str]]  # otherwise, per family, what it would need
    dtype: str
    text: dict | None
    notes: list[str]
    checkpoints: list[Path]  # the members of an ensemble (one path for a single model)
    int8: bool = False  # the int8 model stored too (convert --int8)


def convert(src: str | Path, dst: str | Path, *, force: bool = False, dtype: str = "auto",
            max_shard_bytes: int = 2 << 30, generation_overrides: dict | None = None,
            src_dict=None, tgt_dict=None, encoder_json=None, vocab_bpe=None, bpecodes=None,
            sentencepiece_model=None, lang_dict=None, bpe: str | None = None,
            tokenizer: str | None = None, int8: bool = False) -> ConvertResult:
    """Convert SRC into the model folder DST, atomically (written beside DST, moved into place at the end).

    Arguments:
        src: a checkpoint file, a release folder holding one (with its dictionaries and BPE files), or an
            ensemble as `a.pt:b.pt` (members after the first go to DST/ensemble/model{N}/).
        dst: the folder to write. It must not exist, unless `force`: then it may be replaced only if it is
            empty or a folder fairport wrote.
        dtype: the stored weights' dtype: "auto" (as in the checkpoint), "float32", "float16", "bfloat16".
        max_shard_bytes: above this, model.safetensors is sharded (with an index).
        generation_overrides: fairseq generation options for generation_config.json (beam, lenpen, ...).
        src_dict, tgt_dict: the dictionaries, when not beside the checkpoint where the task looks.
        encoder_json, vocab_bpe, bpecodes, sentencepiece_model: the text pipeline's files (converters/text.py).
        lang_dict: a many-to-many model's language list, when not where the checkpoint recorded it.
        bpe, tokenizer: fairseq's --bpe/--tokenizer for the text pipeline ("none": none), when not as recorded.
        int8: also store the int8 model (folder.INT8), which load(dtype="int8") then reads instead of quantizing.
    """
    dst = Path(dst)
    if dtype != "auto" and dtype not in DTYPES:
        raise FairportError(f"--dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
    if int8:
        fast.check_int8("cpu", torch.float32)
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FairportError(f"{dst} already exists (use --force to replace a folder fairport wrote)")
        check_replaceable(dst)
    named = dict(src_dict=src_dict, tgt_dict=tgt_dict, encoder_json=encoder_json, vocab_bpe=vocab_bpe,
                 bpecodes=bpecodes, sentencepiece_model=sentencepiece_model, lang_dict=lang_dict, bpe=bpe,
                 tokenizer=tokenizer)
    members: list[tuple[Sources, Converted]] = []
    for path in ensemble_members(src):
        sources = find_sources(path, **named)
        conv = convert_state(load_checkpoint(sources.checkpoint), sources)
        if members and (conv.dicts.src.symbols != members[0][1].dicts.src.symbols
                        or conv.dicts.tgt.symbols != members[0][1].dicts.tgt.symbols):
            raise FairportError(f"ensemble member {sources.checkpoint} does not share the first member's "
                                f"dictionaries")
        members.append((sources, conv))
    torch_dtype = None if dtype == "auto" else DTYPES[dtype]
    written = write_model_folder(dst, [lambda out, s=s, c=c: write_member(c, s, out, torch_dtype, max_shard_bytes,
                                                                         generation_overrides, int8)
                                       for s, c in members])
    first = members[0][1]
    return ConvertResult(dst, first.config, written.transformers, written.unmet, written.dtype, first.text,
                         first.notes, [s.checkpoint for s, _ in members], int8)


def print_result(r: ConvertResult) -> None:
    """What `fairport convert` says it did: the model, transformers' support, the text pipeline, the notes."""
    c = r.config
    print(f"converted {c.arch} ({c.family}: {c.encoder_layers}+{c.decoder_layers} layers, d{c.encoder_embed_dim}, "
          f"{c.src_vocab_size}/{c.tgt_vocab_size} ids, {r.dtype}) -> {r.dst}")
    if len(r.checkpoints) > 1:
        print(f"ensemble of {len(r.checkpoints)}: {', '.join(str(p) for p in r.checkpoints)}")
    if r.transformers:
        print(f"transformers: loads as {r.transformers} (AutoModelForSeq2SeqLM)")
    else:
        reasons = "; ".join(f"{f}: needs {', '.join(u)}" for f, u in r.unmet.items())
        print(f"transformers: no architecture reproduces this model exactly ({reasons}); the folder is for fairport's "
              f"reference model only")
    if r.text is None:
        print("text: none, the folder takes token ids only (the note below names the flags that add text)")
    else:
        parts = [p for p in (r.text.get("tokenizer"), r.text.get("bpe")) if p] or ["whitespace-separated symbols"]
        print(f"text: {' + '.join(parts)}{' (BART hub framing)' if r.text.get('bart') else ''}")
    if r.int8:
        print("int8: the int8 model stored too (model.int8.safetensors), read by --dtype int8 runs")
    for note in r.notes:
        print(f"note: {note}")
