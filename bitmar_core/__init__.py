"""bitmar_core: the BitMar model (arXiv 2510.10560) in plain PyTorch; knows nothing of ROS."""
from .config import BitMarConfig
from .model import BitMar
from .quant import BitLinear, PackedBitLinear, pack_model, zero_weight_fraction

__all__ = ["BitMarConfig", "BitMar", "BitLinear", "PackedBitLinear", "pack_model", "zero_weight_fraction"]
