"""fairseq state dict -> reference state dict.

`upgrade` replays fairseq's `upgrade_state_dict_named` methods and `prune_state_dict` (legacy names); the
reference keeps fairseq's names (reference/names.py), so what remains is sorting kept / dropped / unknown.
"""

from __future__ import annotations

import re

import torch

from fairport.errors import FairportError
from fairport.reference.model import sinusoidal_table
from fairport.reference.names import is_reference_key

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
    if "decoder.output_projection.weight" not in sd and "decoder.embed_out" in sd:
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
# Tensor surgery: each change the converter makes to a tensor, as one named function.

EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")


def rows(sd: dict, key: str) -> int | None:
    t = sd.get(key)
    return int(t.shape[0]) if t is not None else None


def drop_mask_row(sd: dict, dictionary_size: int) -> dict:
    """BART fine-tuned on a task whose dictionary has no <mask>: fairseq truncates the pretrained <mask> row.

        embeddings (V + 1, C)   [ ... symbols ... | <mask> ]  ->  (V, C)   [ ... symbols ... ]
    """
    if rows(sd, "encoder.embed_tokens.weight") != dictionary_size + 1:
        return sd
    return {k: (v[:-1] if k in EMBEDDINGS or k == "encoder.output_projection.weight" else v) for k, v in sd.items()}


def untie(sd: dict, share_all: bool, share_decoder_input_output: bool) -> dict:
    """Tied tensors are stored once: the decoder's token embedding is the encoder's (share_all_embeddings),
    the output projection is the decoder's token embedding (share_decoder_input_output_embed)."""
    drop = ({"decoder.output_projection.weight"} if share_decoder_input_output else set()) | \
        ({"decoder.embed_tokens.weight"} if share_all else set())
    return {k: v for k, v in sd.items() if k not in drop}


def classification_heads(sd: dict) -> dict[str, dict]:
    """BART sentence-classification heads by name: {"inner_dim": dense rows, "num_classes": out_proj rows}."""
    heads = {}
    for k, v in sd.items():
        if k.startswith("classification_heads.") and k.endswith(".out_proj.weight"):
            name = k.split(".")[1]
            heads[name] = {"inner_dim": int(sd[f"classification_heads.{name}.dense.weight"].shape[0]),
                           "num_classes": int(v.shape[0])}
    return heads


def transformers_extras(sd: dict, family: str | None, cfg) -> tuple[dict, list[str]]:
    """What transformers' classes keep as weights that fairseq computes or shares (returns tensors, notes):
    BART/mBART's zero `final_logits_bias`; FSMT's sinusoidal position tables (fp32, as fairseq computes them);
    FSMT's decoder output projection stored again when only the decoder's input/output are tied (FSMT ties
    all or nothing)."""
    extra, notes = {}, []
    if family in ("bart", "mbart"):
        extra["final_logits_bias"] = torch.zeros(1, cfg.tgt_vocab_size)
    if family == "fsmt":
        for side, n, dim in (("encoder", cfg.max_source_positions, cfg.encoder_embed_dim),
                             ("decoder", cfg.max_target_positions, cfg.decoder_embed_dim)):
            extra[f"model.{side}.embed_positions.weight"] = sinusoidal_table(n + cfg.pad + 1, dim, cfg.pad)
        if not cfg.share_all_embeddings and cfg.share_decoder_input_output_embed:
            extra["model.decoder.output_projection.weight"] = sd["model.decoder.embed_tokens.weight"]
            notes.append("decoder embeddings stored twice (tied in fairseq; FSMT ties only all-or-nothing)")
    return extra, notes
