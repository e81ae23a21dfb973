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
