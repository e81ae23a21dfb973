"""Which transformers architecture (if any) reproduces a converted model exactly, and its config.json.

Each family is a list of requirements on the reference config; the first family whose requirements all
hold is used. When none holds, `hf_family` returns why for each, and the folder is for the reference only.
"""

from __future__ import annotations

from fairport.reference.config import ModelConfig

# fairseq activation -> transformers ACT2FN name (same function)
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new",
                  "tanh": "tanh", "swish": "silu", "linear": "linear"}


def _same_widths(c: ModelConfig) -> bool:
    return c.encoder_embed_dim == c.decoder_embed_dim == c.decoder_input_embed_dim == c.decoder_output_dim


def _common(c: ModelConfig) -> list[tuple[bool, str]]:
    return [
        (_same_widths(c), "encoder/decoder/input/output widths all equal"),
        (c.activation_fn in HF_ACTIVATIONS, f"an activation transformers has ({sorted(HF_ACTIVATIONS)})"),
        (c.positional_embeddings, "token positional embeddings"),
    ]


# family -> requirements (each: (holds, what is required))
def _requirements(c: ModelConfig) -> dict[str, list[tuple[bool, str]]]:
    tied = c.share_all_embeddings and c.share_decoder_input_output_embed
    return {
        "bart": _common(c) + [
            (not c.encoder_normalize_before and not c.decoder_normalize_before, "post-norm layers"),
            (not c.encoder_final_norm and not c.decoder_final_norm, "no final layer norms"),
            (c.encoder_learned_pos and c.decoder_learned_pos, "learned positions"),
            (c.layernorm_embedding, "layernorm_embedding"),
            (tied, "all embeddings tied (share_all_embeddings + shared output projection)"),
            (c.max_source_positions == c.max_target_positions, "equal source/target max positions"),
        ],
        "mbart": _common(c) + [
            (c.encoder_normalize_before and c.decoder_normalize_before, "pre-norm layers"),
            (c.encoder_final_norm and c.decoder_final_norm, "final layer norms"),
            (c.encoder_learned_pos and c.decoder_learned_pos, "learned positions"),
            (c.layernorm_embedding, "layernorm_embedding"),
            (tied, "all embeddings tied"),
            (c.max_source_positions == c.max_target_positions, "equal source/target max positions"),
        ],
        "m2m_100": _common(c) + [
            (c.encoder_normalize_before and c.decoder_normalize_before, "pre-norm layers"),
            (c.encoder_final_norm and c.decoder_final_norm, "final layer norms"),
            (not c.encoder_learned_pos and not c.decoder_learned_pos, "sinusoidal positions"),
            (not c.layernorm_embedding, "no layernorm_embedding"),
            (tied, "all embeddings tied"),
            (c.max_source_positions == c.max_target_positions, "equal source/target max positions"),
        ],
        "fsmt": _common(c) + [
            (not c.encoder_normalize_before and not c.decoder_normalize_before, "post-norm layers"),
            (not c.encoder_final_norm and not c.decoder_final_norm, "no final layer norms"),
            (not c.encoder_learned_pos and not c.decoder_learned_pos, "sinusoidal positions"),
            (not c.layernorm_embedding, "no layernorm_embedding"),
            (tied or not c.share_all_embeddings, "shared encoder/decoder embeddings only with a tied output"),
            (c.encoder_heads == c.decoder_heads, "equal encoder/decoder heads"),
            (c.max_source_positions == c.max_target_positions, "equal source/target max positions"),
        ],
    }


def hf_family(c: ModelConfig) -> tuple[str | None, dict[str, list[str]]]:
    """(family or None, {family: unmet requirements})."""
    unmet = {}
    for family, reqs in _requirements(c).items():
        missing = [what for ok, what in reqs if not ok]
        if not missing:
            return family, {}
        unmet[family] = missing
    return None, unmet


def hf_config(family: str, c: ModelConfig, extra: dict) -> dict:
    """The transformers fields of config.json. `extra`: languages, generation defaults."""
    common = {
        "d_model": c.encoder_embed_dim,
        "encoder_layers": c.encoder_layers,
        "decoder_layers": c.decoder_layers,
        "encoder_attention_heads": c.encoder_heads,
        "decoder_attention_heads": c.decoder_heads,
        "encoder_ffn_dim": c.encoder_ffn_dim,
        "decoder_ffn_dim": c.decoder_ffn_dim,
        "activation_function": HF_ACTIVATIONS[c.activation_fn],
        "max_position_embeddings": c.max_source_positions,
        "scale_embedding": c.scale_embedding,
        "pad_token_id": c.pad,
        "bos_token_id": c.bos,
        "eos_token_id": c.eos,
        "decoder_start_token_id": c.eos,
        "is_encoder_decoder": True,
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "use_cache": True,
    }
    arch = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
            "m2m_100": "M2M100ForConditionalGeneration"}.get(family)
    if arch:
        return {"model_type": family, "architectures": [arch], "vocab_size": c.tgt_vocab_size,
                "tie_word_embeddings": True, **common}
    # fsmt
    return {"model_type": "fsmt", "architectures": ["FSMTForConditionalGeneration"],
            "langs": extra.get("langs") or ["src", "tgt"],
            "src_vocab_size": c.src_vocab_size, "tgt_vocab_size": c.tgt_vocab_size,
            "tie_word_embeddings": bool(c.share_all_embeddings), **common}


def generation_fields(gen: dict, c: ModelConfig, forced: int | None, forced_varies: bool) -> tuple[dict, list[str]]:
    """transformers' generation_config fields that make `generate()` with no arguments run fairseq's search with
    the options `gen` (fairseq's names), and the fairseq rules transformers cannot express, each with what to
    pass instead. `forced`: the token fairseq forces first (BART's <s>, a fixed target language), or None;
    `forced_varies`: a many-to-many model, whose forced token is the target language the caller chooses.

    Lengths: fairseq's max_len counts generated tokens and it forces EOS at step max_len, so a hypothesis has up to
    max_len + 1 tokens with that EOS; transformers' max_length counts the decoder start token too, and it forces
    EOS on the last position with forced_eos_token_id. fairseq bans EOS while step < min_len; transformers while
    the sequence, start token included, is shorter than min_length. Both divide a finished hypothesis's score by
    its generated length (EOS included) ** lenpen, keep 2 x beam candidates a step, finish a hypothesis only from
    the top beam, and stop a sentence when it has beam finished hypotheses (early_stopping=True)."""
    eos = c.eos if gen["eos"] is None else gen["eos"]
    max_len = min(int(gen["max_len_b"]), c.max_target_positions - 1)
    fields = {
        "num_beams": int(gen["beam"]), "do_sample": bool(gen["sampling"]),
        "length_penalty": float(gen["lenpen"]) if gen["normalize_scores"] else 0.0,
        "max_length": max_len + 2, "forced_eos_token_id": eos, "min_length": int(gen["min_len"]) + 1,
        "no_repeat_ngram_size": int(gen["no_repeat_ngram_size"]), "early_stopping": True,
        "bos_token_id": c.bos, "eos_token_id": eos, "pad_token_id": c.pad, "decoder_start_token_id": eos,
        "suppress_tokens": [c.pad],  # fairseq never generates <pad>
    }
    if gen["unkpen"]:
        fields["sequence_bias"] = [[[c.unk], -float(gen["unkpen"])]]
    if gen["sampling"]:
        fields |= {"top_k": int(gen["sampling_topk"]) if gen["sampling_topk"] > 0 else 0,
                   "top_p": float(gen["sampling_topp"]) if gen["sampling_topp"] > 0 else 1.0,
                   "temperature": float(gen["temperature"])}
    if forced is not None:
        fields["forced_bos_token_id"] = forced
    rules = []
    if gen["max_len_a"]:
        rules.append(f"max_len_a: fairseq's max length is {gen['max_len_a']} x the batch's padded source length + "
                     f"{gen['max_len_b']}, transformers' one fixed number: pass max_length=int({gen['max_len_a']} * "
                     f"source_length + {gen['max_len_b']}) + 2 (max_length is set for max_len_a = 0)")
    if forced is not None or forced_varies:
        rules.append("forced first token: fairseq forces it as a prefix scored with its real log-probability, "
                     "transformers' forced_bos_token_id gives it log-probability 0: the same hypotheses, but a beam "
                     "search may rank finished hypotheses of different lengths otherwise (lenpen divides that "
                     "offset by different lengths)")
    if forced_varies:
        rules.append("many-to-many: pass forced_bos_token_id=<the target language's token id> (fairseq's "
                     "--decoder-langtok)")
    if gen["temperature"] != 1.0 and not gen["sampling"]:
        rules.append(f"temperature {gen['temperature']}: fairseq divides the logits by it in beam search too, "
                     f"transformers only when sampling")
    if gen["match_source_len"]:
        rules.append("match_source_len: no transformers equivalent (pass min_length=max_length=source length + 2)")
    return fields, rules
