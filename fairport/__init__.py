"""fairport: port fairseq checkpoints (BART, mBART, M2M-100, transformer/WMT19) to a clean PyTorch reference,
and prove the port is right."""

from fairport.errors import FairportError

__version__ = "0.1.0"
__all__ = ["FairportError", "__version__"]
