"""fairseq state dict -> reference state dict, and reference names -> transformers names.

`upgrade` replays fairseq's `upgrade_state_dict_named` methods and `prune_state_dict` (legacy names);
`REFERENCE_KEYS` lists every name the reference has (`{}` is the layer index, `{h}` a head name);
`HF_NAMES` maps reference names to transformers' for the families it can load.
"""

from __future__ import annotations

import re

import torch

from fairport.errors import FairportError

ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
LINEAR = ("weight", "bias")


def _layer_keys(prefix: str, attns: tuple[str, ...], norms: tuple[str, ...]) -> list[str]:
    keys = [f"{prefix}.layers.{{}}.{a}.{p}.{w}" for a in attns for p in ATTN for w in LINEAR]
    keys += [f"{prefix}.layers.{{}}.{n}.{w}" for n in norms for w in LINEAR]
    keys += [f"{prefix}.layers.{{}}.{fc}.{w}" for fc in ("fc1", "fc2") for w in LINEAR]
    return keys


# Every tensor name of the reference model; the converter refuses a checkpoint with any other tensor.
REFERENCE_KEYS = (
    ["encoder.embed_tokens.weight", "encoder.embed_positions.weight",
     "encoder.layernorm_embedding.weight", "encoder.layernorm_embedding.bias",
     "encoder.layer_norm.weight", "encoder.layer_norm.bias",
     "decoder.embed_tokens.weight", "decoder.embed_positions.weight",
     "decoder.layernorm_embedding.weight", "decoder.layernorm_embedding.bias",
     "decoder.layer_norm.weight", "decoder.layer_norm.bias",
     "decoder.project_in_dim.weight", "decoder.project_out_dim.weight",
     "decoder.output_projection.weight",
     "classification_heads.{h}.dense.weight", "classification_heads.{h}.dense.bias",
     "classification_heads.{h}.out_proj.weight", "classification_heads.{h}.out_proj.bias"]
    + _layer_keys("encoder", ("self_attn",), ("self_attn_layer_norm", "final_layer_norm"))
    + _layer_keys("decoder", ("self_attn", "encoder_attn"),
                  ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"))
)
_PATTERNS = [re.compile("^" + re.escape(k).replace(r"\{\}", r"\d+").replace(r"\{h\}", r"[^.]+") + "$")
             for k in REFERENCE_KEYS]


def is_reference_key(name: str) -> bool:
    return any(p.match(name) for p in _PATTERNS)


# Buffers fairseq keeps in its state dict that carry no weights.
DROPPED = {
    r"^(encoder|decoder)\.version$": "fairseq version marker (read, then dropped)",
    r"^(encoder|decoder)\.embed_positions\._float_tensor$": "fairseq dtype marker of sinusoidal positions",
    r"^(encoder|decoder)\.embed_positions\.weights$": "sinusoidal positions (recomputed, as fairseq does)",
    r"\.version$": "fairseq version marker",
}


def _prune(sd: dict, side: str, keep: str | None) -> tuple[dict, int | None]:
    """fairseq prune_state_dict: keep only the listed layers (LayerDrop) and renumber them."""
    if not keep:
        return sd, None
    kept = sorted(int(x) for x in str(keep).split(","))
    remap = {str(old): str(new) for new, old in enumerate(kept)}
    out = {}
    pat = re.compile(rf"^({side}\.layers\.)(\d+)(\..*)$")
    for k, v in sd.items():
        m = pat.match(k)
        if not m:
            out[k] = v
        elif m.group(2) in remap:
            out[m.group(1) + remap[m.group(2)] + m.group(3)] = v
    return out, len(kept)


def upgrade(sd: dict, options: dict) -> tuple[dict, dict]:
    """Apply fairseq's legacy-name upgrades. Returns (state dict, facts) where facts records what the
    version markers imply (final layer norms) and the pruned layer counts."""
    sd = dict(sd)
    facts: dict = {}
    sd, facts["encoder_layers"] = _prune(sd, "encoder", options.get("encoder_layers_to_keep"))
    sd, facts["decoder_layers"] = _prune(sd, "decoder", options.get("decoder_layers_to_keep"))

    # MultiheadAttention: fused in_proj_{weight,bias} = q | k | v stacked on dim 0
    for k in [k for k in sd if k.endswith("in_proj_weight")]:
        prefix = k[: -len("in_proj_weight")]
        w = sd.pop(k)
        dim = w.shape[0] // 3
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{prefix}{name}.weight"] = w[i * dim:(i + 1) * dim]
        if prefix + "in_proj_bias" in sd:
            b = sd.pop(prefix + "in_proj_bias")
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                sd[f"{prefix}{name}.bias"] = b[i * dim:(i + 1) * dim]

    # layer_norms.{0,1,(2)} -> named layer norms (encoder: 2 per layer, decoder: 3)
    names = {"encoder": ("self_attn_layer_norm", "final_layer_norm"),
             "decoder": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")}
    pat = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.layer_norms\.(\d)\.(weight|bias)$")
    for k in [k for k in sd if pat.match(k)]:
        side, i, j, w = pat.match(k).groups()
        sd[f"{side}.layers.{i}.{names[side][int(j)]}.{w}"] = sd.pop(k)

    # decoder output projection: old name embed_out (untied) or the tied token embeddings
    if "decoder.output_projection.weight" not in sd:
        if "decoder.embed_out" in sd:
            sd["decoder.output_projection.weight"] = sd.pop("decoder.embed_out")

    # version markers: encoder < 2 or decoder <= 2 means "no layer norm after the last layer"
    def version(side):
        v = sd.get(f"{side}.version")
        return float(v.flatten()[0]) if isinstance(v, torch.Tensor) and v.numel() else 1.0

    facts["encoder_version"] = version("encoder")
    facts["decoder_version"] = version("decoder")
    return sd, facts


def split_known(sd: dict) -> tuple[dict, dict, list[str]]:
    """Sort upgraded tensors into (kept, dropped name -> reason, unknown names)."""
    kept, dropped, unknown = {}, {}, []
    for k, v in sd.items():
        if is_reference_key(k):
            kept[k] = v
            continue
        reason = next((why for pat, why in DROPPED.items() if re.search(pat, k)), None)
        if reason is not None:
            dropped[k] = reason
        else:
            unknown.append(k)
    return kept, dropped, unknown


def check_unknown(unknown: list[str]) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise FairportError(f"checkpoint has tensors the reference model does not know: {shown}")


# ---------------------------------------------------------------------------------------------------
# transformers names. Keys are reference names; a value of None means "tied, not stored".

def _hf_layers(prefix: str, attns: tuple[str, ...], norms: tuple[str, ...]) -> dict:
    return {k: "model." + k for k in _layer_keys(prefix, attns, norms)}


_HF_LAYERS = {
    **_hf_layers("encoder", ("self_attn",), ("self_attn_layer_norm", "final_layer_norm")),
    **_hf_layers("decoder", ("self_attn", "encoder_attn"),
                 ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")),
}

HF_NAMES: dict[str, dict[str, str | None]] = {
    "bart": {
        "encoder.embed_tokens.weight": "model.shared.weight",
        "decoder.embed_tokens.weight": None,
        "decoder.output_projection.weight": None,
        "encoder.embed_positions.weight": "model.encoder.embed_positions.weight",
        "decoder.embed_positions.weight": "model.decoder.embed_positions.weight",
        "encoder.layernorm_embedding.weight": "model.encoder.layernorm_embedding.weight",
        "encoder.layernorm_embedding.bias": "model.encoder.layernorm_embedding.bias",
        "decoder.layernorm_embedding.weight": "model.decoder.layernorm_embedding.weight",
        "decoder.layernorm_embedding.bias": "model.decoder.layernorm_embedding.bias",
        "classification_heads.{h}.dense.weight": "classification_heads.{h}.dense.weight",
        "classification_heads.{h}.dense.bias": "classification_heads.{h}.dense.bias",
        "classification_heads.{h}.out_proj.weight": "classification_heads.{h}.out_proj.weight",
        "classification_heads.{h}.out_proj.bias": "classification_heads.{h}.out_proj.bias",
        **_HF_LAYERS,
    },
    "mbart": {},  # filled below: BART's names plus the final layer norms of pre-norm models
    "fsmt": {
        "encoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight": "model.decoder.embed_tokens.weight",
        "decoder.output_projection.weight": "model.decoder.output_projection.weight",
        **_HF_LAYERS,
    },
}


HF_NAMES["mbart"] = {**HF_NAMES["bart"], **{f"{side}.layer_norm.{w}": f"model.{side}.layer_norm.{w}"
                                            for side in ("encoder", "decoder") for w in LINEAR}}
# M2M-100: pre-norm with final layer norms, sinusoidal positions (computed, not stored), tied embeddings
HF_NAMES["m2m_100"] = {k: v for k, v in HF_NAMES["mbart"].items()
                       if "embed_positions" not in k and "layernorm_embedding" not in k
                       and not k.startswith("classification_heads")}


def _expand(pattern: str, name: str) -> dict | None:
    rx = "^" + re.escape(pattern).replace(r"\{\}", r"(?P<i>\d+)").replace(r"\{h\}", r"(?P<h>[^.]+)") + "$"
    m = re.match(rx, name)
    return m.groupdict() if m else None


def to_hf_name(family: str, name: str) -> str | None:
    """Reference name -> transformers name for `family` (None: tied, not stored)."""
    for pat, hf in HF_NAMES[family].items():
        groups = _expand(pat, name)
        if groups is not None:
            if hf is None:
                return None
            return hf.replace("{}", groups.get("i") or "").replace("{h}", groups.get("h") or "")
    raise KeyError(f"no transformers name for {name} in family {family}")


def from_hf_names(family: str, tensors: dict) -> dict:
    """transformers names (as stored) -> reference names."""
    out = {}
    for hf_name, t in tensors.items():
        for pat, hf in HF_NAMES[family].items():
            if hf is None:
                continue
            groups = _expand(hf, hf_name)
            if groups is not None:
                out[pat.replace("{}", groups.get("i") or "").replace("{h}", groups.get("h") or "")] = t
                break
    return out
