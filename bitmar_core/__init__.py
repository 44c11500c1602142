"""bitmar_core: the BitMar model (arXiv 2510.10560) in plain PyTorch; knows nothing of ROS."""
from .model.bitmar import BitMar
from .model.config import BitMarConfig
from .model.quant import BitLinear, PackedBitLinear, pack_model, zero_weight_fraction

__all__ = ["BitMarConfig", "BitMar", "BitLinear", "PackedBitLinear", "pack_model", "zero_weight_fraction"]
