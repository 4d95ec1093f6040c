from .qexperts import QuantExperts
from .qlinear import QuantLinear
from .w8a8 import W8A8Linear

# The modules that hold quantized tensors in place of a linear's or an experts module's weights.
QUANTIZED_MODULES = (QuantLinear, W8A8Linear, QuantExperts)

__all__ = ["QUANTIZED_MODULES", "QuantExperts", "QuantLinear", "W8A8Linear"]
