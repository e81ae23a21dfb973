"""Load a fairport model folder into the reference model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from fairport.converters.weights import from_hf_names
from fairport.errors import FairportError
from fairport.reference.config import ModelConfig
from fairport.reference.model import EncoderDecoder, SinusoidalPositions, sinusoidal_table

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(folder: str | Path) -> tuple[ModelConfig, dict]:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        meta = config["fairport"]
        return ModelConfig.from_dict(meta["model"]), meta
    except FileNotFoundError:
        raise FairportError(f"{folder} is not a fairport model folder (no config.json)") from None
    except (KeyError, ValueError, TypeError) as e:
        raise FairportError(f"{folder}/config.json is not a fairport config ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    raise FairportError(f"{folder} has no model.safetensors (or {INDEX})")


def read_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All stored tensors, under the names they are stored with."""
    out = {}
    for f in weight_files(Path(folder)):
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for k in sf.keys():
                # a copy into torch's own allocator: measured ~10% faster decoding on CPU than using the
                # buffer safetensors returns (allocation alignment / huge pages), one tensor at a time
                t = sf.get_tensor(k)
                out[k] = t.clone() if t.device.type == "cpu" else t
    return out


def reference_state_dict(folder: str | Path, naming: str, device="cpu") -> dict[str, torch.Tensor]:
    stored = read_weights(folder, device)
    if naming == "fairport":
        return stored
    return from_hf_names(naming, stored)


def tie_weights(model: EncoderDecoder) -> None:
    cfg = model.config
    if cfg.share_all_embeddings:
        model.decoder.embed_tokens = model.encoder.embed_tokens
    if cfg.share_decoder_input_output_embed:
        model.decoder.output_projection.weight = model.decoder.embed_tokens.weight


def tied_names(cfg: ModelConfig) -> set[str]:
    names = set()
    if cfg.share_all_embeddings:
        names.add("decoder.embed_tokens.weight")
    if cfg.share_decoder_input_output_embed:
        names.add("decoder.output_projection.weight")
    return names


def build(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], device=None, dtype=None,
          pack: bool = True, int8: bool = False) -> EncoderDecoder:
    """Reference model from a reference-named state dict, without a random init pass. Self-attention q/k/v
    are fused; on the CPU (fp32/bf16) weights are also packed for oneDNN unless `pack` is False, or held
    in int8 (`int8`: fp32 model, dynamically quantized linear layers)."""
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if k not in tied_names(cfg)]
    if missing or unexpected:
        raise FairportError(f"weights do not fit the config: missing {sorted(missing)[:6]}, "
                            f"unexpected {sorted(unexpected)[:6]}")
    tie_weights(model)
    for m in model.modules():
        if isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(m.table.size(0), m.dim, m.pad)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    else:  # buffers follow the parameters' device
        model = model.to(next(model.parameters()).device)
    model = model.eval().requires_grad_(False).fuse_qkv()
    if int8:
        return model.quantize()
    return model.pack() if pack else model


def load_one(folder: Path, device=None, dtype=None, pack: bool = True, int8: bool = False) -> EncoderDecoder:
    cfg, meta = read_config(folder)
    model = build(cfg, reference_state_dict(folder, meta.get("weight_names", "fairport")), device=device,
                  dtype=dtype, pack=pack, int8=int8)
    model.fairport_meta = meta
    model.folder = folder
    return model


# what --dtype / --dtypes accept: a torch dtype, or "int8" (fp32 model, int8 linear layers)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         pack: bool = True):
    """`fairport.reference.load('out/bart-cnn')` -> the reference model (eval mode). A folder converted from
    an ensemble gives an `Ensemble` of its members, which generates as fairseq's EnsembleModel does.
    `dtype`: the compute dtype, a torch dtype or one of PRECISIONS' names. None (the default) is float32 whatever
    the folder stores, as fairseq computes: its hub builds a float32 model and loads fp16 checkpoints into it,
    so the default gives fairseq's numbers. float16/bfloat16 compute in that dtype; "int8" is a float32 model
    whose linear layers run through int8 weights with activations quantized per call (CPU only; see
    EncoderDecoder.quantize).
    `pack=False` skips the oneDNN copies of the weights on the CPU (half the memory, slower matrix products)."""
    from fairport.reference.generate import Ensemble

    int8 = dtype == "int8"
    dtype = torch.float32 if dtype is None else dtype
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise FairportError(f"unknown dtype {dtype!r} (choose from {', '.join(PRECISIONS)})")
        dtype = PRECISIONS[dtype]
    folder = Path(path)
    model = load_one(folder, device, dtype, pack, int8)
    extra = model.fairport_meta.get("ensemble") or []
    if not extra:
        return model
    return Ensemble([model] + [load_one(folder / sub, device, dtype, pack, int8) for sub in extra])
