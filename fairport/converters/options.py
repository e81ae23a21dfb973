"""fairseq architecture presets and the options the reference model reproduces, as data.

fairseq's `@register_model_architecture` functions fill each missing option with `getattr(args, k, default)`
and then call a parent preset. `ARCHS` records each preset's own defaults and its parent; `resolve` replays
the chain. `UNSUPPORTED` lists every option value the reference cannot reproduce; `check_supported`
reports all of them in one error.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairport.errors import FairportError


@dataclass(frozen=True)
class Ref:
    """A default that copies another option (fairseq: `getattr(args, 'x', args.y)`)."""

    key: str


# fairseq/models/transformer/transformer_legacy.py: base_architecture (the options that shape inference)
TRANSFORMER_BASE = {
    "encoder_embed_dim": 512,
    "encoder_ffn_embed_dim": 2048,
    "encoder_layers": 6,
    "encoder_attention_heads": 8,
    "encoder_normalize_before": False,
    "encoder_learned_pos": False,
    "decoder_embed_dim": Ref("encoder_embed_dim"),
    "decoder_ffn_embed_dim": Ref("encoder_ffn_embed_dim"),
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_normalize_before": False,
    "decoder_learned_pos": False,
    "activation_fn": "relu",
    "adaptive_softmax_cutoff": None,
    "share_decoder_input_output_embed": False,
    "share_all_embeddings": False,
    "merge_src_tgt_embed": False,
    "no_token_positional_embeddings": False,
    "adaptive_input": False,
    "no_cross_attention": False,
    "cross_self_attention": False,
    "decoder_output_dim": Ref("decoder_embed_dim"),
    "decoder_input_dim": Ref("decoder_embed_dim"),
    "no_scale_embedding": False,
    "layernorm_embedding": False,
    "tie_adaptive_weights": False,
    "encoder_layers_to_keep": None,
    "decoder_layers_to_keep": None,
    "no_decoder_final_norm": False,
    "max_source_positions": 1024,
    "max_target_positions": 1024,
    "pooler_activation_fn": "tanh",
}

# fairseq/models/bart/model.py: bart_large_architecture
BART_LARGE = {
    "encoder_embed_dim": 1024,
    "encoder_ffn_embed_dim": 4096,
    "encoder_layers": 12,
    "encoder_attention_heads": 16,
    "encoder_normalize_before": False,
    "encoder_learned_pos": True,
    "decoder_embed_dim": Ref("encoder_embed_dim"),
    "decoder_ffn_embed_dim": Ref("encoder_ffn_embed_dim"),
    "decoder_layers": 12,
    "decoder_attention_heads": 16,
    "decoder_normalize_before": False,
    "decoder_learned_pos": True,
    "max_target_positions": 1024,
    "max_source_positions": 1024,
    "adaptive_softmax_cutoff": None,
    "share_decoder_input_output_embed": True,
    "share_all_embeddings": True,
    "decoder_output_dim": Ref("decoder_embed_dim"),
    "decoder_input_dim": Ref("decoder_embed_dim"),
    "no_scale_embedding": True,
    "layernorm_embedding": True,
    "activation_fn": "gelu",
    "pooler_activation_fn": "tanh",
}

# preset name -> (model family, own defaults, parent preset). The family decides the model class.
ARCHS: dict[str, tuple[str, dict, str | None]] = {
    "transformer": ("transformer", TRANSFORMER_BASE, None),
    "transformer_tiny": ("transformer", {"encoder_embed_dim": 64, "encoder_ffn_embed_dim": 64,
                                         "encoder_layers": 2, "encoder_attention_heads": 2,
                                         "decoder_layers": 2, "decoder_attention_heads": 2}, "transformer"),
    "transformer_iwslt_de_en": ("transformer", {
        "encoder_embed_dim": 512, "encoder_ffn_embed_dim": 1024, "encoder_attention_heads": 4,
        "encoder_layers": 6, "decoder_embed_dim": 512, "decoder_ffn_embed_dim": 1024,
        "decoder_attention_heads": 4, "decoder_layers": 6}, "transformer"),
    "transformer_wmt_en_de": ("transformer", {}, "transformer"),
    "transformer_vaswani_wmt_en_de_big": ("transformer", {
        "encoder_embed_dim": 1024, "encoder_ffn_embed_dim": 4096, "encoder_attention_heads": 16,
        "encoder_normalize_before": False, "decoder_embed_dim": 1024, "decoder_ffn_embed_dim": 4096,
        "decoder_attention_heads": 16}, "transformer"),
    "transformer_vaswani_wmt_en_fr_big": ("transformer", {}, "transformer_vaswani_wmt_en_de_big"),
    "transformer_wmt_en_de_big": ("transformer", {}, "transformer_vaswani_wmt_en_de_big"),
    "transformer_wmt_en_de_big_t2t": ("transformer", {"encoder_normalize_before": True,
                                                      "decoder_normalize_before": True},
                                      "transformer_vaswani_wmt_en_de_big"),
    "bart_large": ("bart", BART_LARGE, "transformer"),
    "bart_base": ("bart", {"encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_layers": 6,
                           "encoder_attention_heads": 12, "decoder_layers": 6,
                           "decoder_attention_heads": 12}, "bart_large"),
    "mbart_large": ("bart", {"no_scale_embedding": False}, "bart_large"),
    "mbart_base": ("bart", {"no_scale_embedding": False}, "bart_base"),
    "mbart_base_wmt20": ("bart", {"layernorm_embedding": False}, "mbart_base"),
}
# (bart_large's parent "transformer" stands for TransformerConfig's own defaults, which fill what the
# BART presets leave unset.)

ACTIVATIONS = ("relu", "relu_squared", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear", "swish")


def _truthy(v) -> bool:
    return bool(v) and v not in ("False", "false", "0", "None")


# (option, test on its value, why the reference cannot reproduce it)
UNSUPPORTED: list[tuple[str, object, str]] = [
    ("adaptive_softmax_cutoff", lambda v: v not in (None, "", "None"), "adaptive softmax output"),
    ("adaptive_input", _truthy, "adaptive input embeddings"),
    ("tie_adaptive_weights", _truthy, "tied adaptive weights"),
    ("cross_self_attention", _truthy, "cross+self attention in the decoder"),
    ("no_cross_attention", _truthy, "a decoder without encoder attention"),
    ("merge_src_tgt_embed", _truthy, "merged source/target embeddings"),
    ("full_context_alignment", _truthy, "alignment supervision (full-context alignment at inference)"),
    ("alignment_heads", lambda v: v not in (None, 0, 1, "None"), "alignment heads at inference"),
    ("print_alignment", _truthy, "printing alignments at inference"),
    ("scale_attn", _truthy, "NormFormer attention layer norm (--scale-attn)"),
    ("scale_fc", _truthy, "NormFormer FFN layer norm (--scale-fc)"),
    ("scale_heads", _truthy, "NormFormer head scaling (--scale-heads)"),
    ("scale_resids", _truthy, "NormFormer residual scaling (--scale-resids)"),
    ("base_layers", lambda v: bool(v) and int(v) > 0, "BASE layers (--base-layers)"),
    ("spectral_norm_classification_head", _truthy, "spectral-norm classification heads"),
    ("activation_fn", lambda v: v not in ACTIVATIONS, f"an activation outside {ACTIVATIONS}"),
    ("pooler_activation_fn", lambda v: v not in ACTIVATIONS, f"a pooler activation outside {ACTIVATIONS}"),
    ("encoder_xformers_att_config", lambda v: v not in (None, "", "None"), "xformers attention"),
]


def resolve(options: dict) -> tuple[str, dict]:
    """Fill missing options from the checkpoint's arch preset chain. Returns (family, options)."""
    arch = options.get("arch")
    if arch not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise FairportError(f"architecture {arch!r} is not supported (fairport supports: {known})")
    family = ARCHS[arch][0]
    out = dict(options)
    name: str | None = arch
    while name is not None:
        _, defaults, parent = ARCHS[name]
        for key, default in defaults.items():
            if out.get(key) is None and key not in _EXPLICIT_NONE_OK:
                out[key] = out[default.key] if isinstance(default, Ref) else default
            elif key not in out:
                out[key] = default
        name = parent
    if out.get("max_source_positions") is None:
        out["max_source_positions"] = 1024
    if out.get("max_target_positions") is None:
        out["max_target_positions"] = 1024
    return family, out


# Options whose explicit None is a real value (getattr returns None and fairseq keeps it).
_EXPLICIT_NONE_OK = {"adaptive_softmax_cutoff", "encoder_layers_to_keep", "decoder_layers_to_keep"}


def check_supported(options: dict) -> None:
    """Raise one error listing every option value the reference cannot reproduce."""
    problems = []
    for key, is_bad, why in UNSUPPORTED:
        if key in options and options[key] is not None:
            try:
                bad = is_bad(options[key])
            except (TypeError, ValueError):
                bad = True
            if bad:
                problems.append(f"{key}={options[key]!r} ({why})")
    if problems:
        raise FairportError("unsupported fairseq options: " + "; ".join(problems))
