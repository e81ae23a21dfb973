"""Tensor names: every name the reference model has, and the transformers name of each, per family.

The reference keeps fairseq's (upgraded) parameter names, so the fairseq -> reference map is the identity.
`{}` stands for a layer index and `{h}` for a classification head's name. In the transformers tables a
value of None means "tied to another tensor: not stored".
"""

from __future__ import annotations

import re

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHT_BIAS = ("weight", "bias")
ENCODER_NORMS = ("self_attn_layer_norm", "final_layer_norm")
DECODER_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")


def layer_keys(side: str, attentions: tuple[str, ...], norms: tuple[str, ...]) -> list[str]:
    """`{side}.layers.{}.*`: the attention projections, layer norms and the two FFN matrices of one layer."""
    keys = [f"{side}.layers.{{}}.{a}.{p}.{w}" for a in attentions for p in ATTENTION for w in WEIGHT_BIAS]
    keys += [f"{side}.layers.{{}}.{n}.{w}" for n in norms for w in WEIGHT_BIAS]
    return keys + [f"{side}.layers.{{}}.{fc}.{w}" for fc in ("fc1", "fc2") for w in WEIGHT_BIAS]


LAYERS = layer_keys("encoder", ("self_attn",), ENCODER_NORMS) + \
    layer_keys("decoder", ("self_attn", "encoder_attn"), DECODER_NORMS)

# Every tensor name of the reference model; the converter refuses a checkpoint with any other tensor.
REFERENCE_KEYS = [
    "encoder.embed_tokens.weight", "encoder.embed_positions.weight",
    "encoder.layernorm_embedding.weight", "encoder.layernorm_embedding.bias",
    "encoder.layer_norm.weight", "encoder.layer_norm.bias",
    "decoder.embed_tokens.weight", "decoder.embed_positions.weight",
    "decoder.layernorm_embedding.weight", "decoder.layernorm_embedding.bias",
    "decoder.layer_norm.weight", "decoder.layer_norm.bias",
    "decoder.project_in_dim.weight", "decoder.project_out_dim.weight",
    "decoder.output_projection.weight",
    "classification_heads.{h}.dense.weight", "classification_heads.{h}.dense.bias",
    "classification_heads.{h}.out_proj.weight", "classification_heads.{h}.out_proj.bias",
    *LAYERS,
]


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{\}", r"(?P<i>\d+)").replace(r"\{h\}", r"(?P<h>[^.]+)")
    return re.compile("^" + rx + "$")


_REFERENCE_PATTERNS = [_pattern(k) for k in REFERENCE_KEYS]


def is_reference_key(name: str) -> bool:
    return any(p.match(name) for p in _REFERENCE_PATTERNS)


_SAME_LAYERS = {k: "model." + k for k in LAYERS}  # transformers keeps fairseq's layer names under "model."
_FINAL_NORMS = {f"{side}.layer_norm.{w}": f"model.{side}.layer_norm.{w}"
                for side in ("encoder", "decoder") for w in WEIGHT_BIAS}
_LEARNED_POSITIONS = {f"{side}.embed_positions.weight": f"model.{side}.embed_positions.weight"
                      for side in ("encoder", "decoder")}
_LAYERNORM_EMBEDDING = {f"{side}.layernorm_embedding.{w}": f"model.{side}.layernorm_embedding.{w}"
                        for side in ("encoder", "decoder") for w in WEIGHT_BIAS}
_HEADS = {f"classification_heads.{{h}}.{m}.{w}": f"classification_heads.{{h}}.{m}.{w}"
          for m in ("dense", "out_proj") for w in WEIGHT_BIAS}
_SHARED = {"encoder.embed_tokens.weight": "model.shared.weight",
           "decoder.embed_tokens.weight": None, "decoder.output_projection.weight": None}

# reference name -> transformers name, for the families transformers reproduces exactly (converters/hf.py)
HF_NAMES: dict[str, dict[str, str | None]] = {
    # BART: one shared embedding, learned positions, layernorm_embedding, post-norm, classification heads
    "bart": {**_SHARED, **_LEARNED_POSITIONS, **_LAYERNORM_EMBEDDING, **_HEADS, **_SAME_LAYERS},
    # mBART: BART plus the final layer norms of its pre-norm layers
    "mbart": {**_SHARED, **_LEARNED_POSITIONS, **_LAYERNORM_EMBEDDING, **_HEADS, **_SAME_LAYERS, **_FINAL_NORMS},
    # M2M-100: pre-norm with final layer norms, sinusoidal positions (computed, not stored), tied embeddings
    "m2m_100": {**_SHARED, **_SAME_LAYERS, **_FINAL_NORMS},
    # FSMT (WMT19): separate embeddings and output projection, sinusoidal positions, post-norm
    "fsmt": {"encoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
             "decoder.embed_tokens.weight": "model.decoder.embed_tokens.weight",
             "decoder.output_projection.weight": "model.decoder.output_projection.weight", **_SAME_LAYERS},
}


def _fill(template: str, groups: dict) -> str:
    return template.replace("{}", groups.get("i") or "").replace("{h}", groups.get("h") or "")


def to_hf_name(family: str, name: str) -> str | None:
    """Reference name -> transformers name for `family` (None: tied, not stored)."""
    for ours, theirs in HF_NAMES[family].items():
        m = _pattern(ours).match(name)
        if m:
            return None if theirs is None else _fill(theirs, m.groupdict())
    raise KeyError(f"no transformers name for {name} in family {family}")


def reference_name(family: str, name: str) -> str | None:
    """A stored transformers name -> the reference's (None: a tensor the reference does not have, such as
    transformers' final_logits_bias or FSMT's stored position tables)."""
    for ours, theirs in HF_NAMES[family].items():
        m = theirs is not None and _pattern(theirs).match(name)
        if m:
            return _fill(ours, m.groupdict())
    return None
