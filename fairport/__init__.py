"""fairport: port fairseq checkpoints (BART, mBART, transformer/WMT19) to a clean PyTorch reference."""

__version__ = "0.1.0"

from fairport.errors import FairportError  # noqa: E402

__all__ = ["FairportError", "__version__"]
