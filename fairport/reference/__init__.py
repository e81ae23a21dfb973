"""The reference encoder-decoder (fairseq transformer, BART, mBART), its folder format and its loader."""

from fairport.reference.config import ModelConfig
from fairport.reference.folder import ModelFolder
from fairport.reference.load import load
from fairport.reference.model import EncoderDecoder

__all__ = ["EncoderDecoder", "ModelConfig", "ModelFolder", "load"]
