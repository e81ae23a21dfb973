"""The reference model's configuration: every fairseq variant fairport covers, as plain fields."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class ModelConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    family: str = "transformer"  # "transformer" or "bart" (fairseq model class; informational)
    arch: str = "transformer"  # fairseq arch preset it came from
    pad: int = 1
    bos: int = 0
    eos: int = 2
    unk: int = 3
    # encoder
    encoder_embed_dim: int = 512
    encoder_ffn_dim: int = 2048
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_normalize_before: bool = False
    encoder_final_norm: bool = False  # a LayerNorm after the last layer (pre-norm models)
    encoder_learned_pos: bool = False
    max_source_positions: int = 1024
    # decoder
    decoder_embed_dim: int = 512
    decoder_input_embed_dim: int = 512  # token embedding width; != decoder_embed_dim => project_in_dim
    decoder_output_dim: int = 512  # != decoder_embed_dim => project_out_dim
    decoder_ffn_dim: int = 2048
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_normalize_before: bool = False
    decoder_final_norm: bool = False
    decoder_learned_pos: bool = False
    max_target_positions: int = 1024
    # shared
    positional_embeddings: bool = True  # False: fairseq --no-token-positional-embeddings
    layernorm_embedding: bool = False
    scale_embedding: bool = True  # x * sqrt(embed_dim); BART: False
    activation_fn: str = "relu"
    share_all_embeddings: bool = False  # encoder and decoder token embeddings are one tensor
    share_decoder_input_output_embed: bool = False  # output projection = decoder token embeddings
    pooler_activation_fn: str = "tanh"
    classification_heads: dict = field(default_factory=dict)  # name -> {"inner_dim", "num_classes"}

    @property
    def encoder_embed_scale(self) -> float:
        return math.sqrt(self.encoder_embed_dim) if self.scale_embedding else 1.0

    @property
    def decoder_embed_scale(self) -> float:
        return math.sqrt(self.decoder_embed_dim) if self.scale_embedding else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)
