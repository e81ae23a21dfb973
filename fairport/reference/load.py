"""Load a fairport model folder into the reference model: `load(path)`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from fairport.errors import FairportError
from fairport.reference import fast
from fairport.reference.config import ModelConfig
from fairport.reference.folder import ModelFolder
from fairport.reference.hub import PortedEnsemble, PortedModel
from fairport.reference.model import EncoderDecoder, SinusoidalPositions, sinusoidal_table
from fairport.reference.names import from_hf_names

# what --dtype / --dtypes accept: a torch dtype, or "int8" (fp32 model, int8 linear layers)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


def read_weights(folder: ModelFolder, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All stored tensors, under the reference's names."""
    out = {}
    for f in folder.weight_files():
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for k in sf.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                # a copy into torch's own allocator: measured ~10% faster decoding on CPU than using the
                # buffer safetensors returns (allocation alignment / huge pages), one tensor at a time
                t = sf.get_tensor(k)
                out[k] = t.clone() if t.device.type == "cpu" else t
    return out if folder.weight_names == "fairport" else from_hf_names(folder.weight_names, out)


def tied_names(cfg: ModelConfig) -> set[str]:
    """Tensors stored once and shared: the decoder's token embedding and/or its output projection."""
    names = set()
    if cfg.share_all_embeddings:
        names.add("decoder.embed_tokens.weight")
    if cfg.share_decoder_input_output_embed:
        names.add("decoder.output_projection.weight")
    return names


def build(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], device=None, dtype=torch.float32,
          cls: type[EncoderDecoder] = EncoderDecoder) -> EncoderDecoder:
    """The reference model (eval mode, no gradients) from a reference-named state dict, without a random init
    pass; sinusoidal tables recomputed in fp32 (as fairseq computes them) before the cast to `dtype`."""
    with torch.device("meta"):
        model = cls(cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if k not in tied_names(cfg)]
    if missing or unexpected:
        raise FairportError(f"weights do not fit the config: missing {sorted(missing)[:6]}, "
                            f"unexpected {sorted(unexpected)[:6]}")
    if cfg.share_all_embeddings:
        model.decoder.embed_tokens = model.encoder.embed_tokens
    if cfg.share_decoder_input_output_embed:
        model.decoder.output_projection.weight = model.decoder.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(m.table.size(0), m.dim, m.pad)
    model = model.to(dtype=dtype)
    model = model.to(device if device is not None else next(model.parameters()).device)
    return model.eval().requires_grad_(False)


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         pack: bool = True):
    """`fairport.reference.load('out/bart-cnn')` -> the reference model with fairseq's hub verbs (`PortedModel`),
    or for a folder converted from an ensemble a `PortedEnsemble` that generates as fairseq's EnsembleModel.

    `dtype`: the compute dtype, a torch dtype or one of PRECISIONS' names. None (the default) is float32 whatever
    the folder stores, as fairseq computes: its hub builds a float32 model and loads fp16 checkpoints into it,
    so the default gives fairseq's numbers. float16/bfloat16 compute in that dtype; "int8" is a float32 model
    whose linear layers run through int8 weights with activations quantized per call (CPU only; fast.quantize).
    Self-attention q/k/v are fused (fast.fuse_qkv); on the CPU, large fp32/bf16 weights are also packed for
    oneDNN (fast.pack) unless `pack=False` (half the weight memory, slower matrix products)."""
    int8 = dtype == "int8"
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise FairportError(f"unknown dtype {dtype!r} (choose from {', '.join(PRECISIONS)})")
        dtype = PRECISIONS[dtype]
    folder = ModelFolder.open(path)
    models = []
    for member in folder.members():
        model = build(member.config, read_weights(member, "cpu" if device is None else device), device,
                      dtype or torch.float32, cls=PortedModel)
        model.folder = member
        fast.fuse_qkv(model)
        if int8:
            fast.quantize(model)
        elif pack:
            fast.pack(model)
        models.append(model)
    return models[0] if len(models) == 1 else PortedEnsemble(models, folder)
