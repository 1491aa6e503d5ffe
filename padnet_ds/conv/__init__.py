"""PAD dynamic convolution (DY-Conv) layers and their helpers."""
from .dyconv import (KernelAttention, PADDynamicConv2d, conv_param_counts, dyconv_modules, set_temperature,
                     temperature_at, total_param_counts)

__all__ = ["KernelAttention", "PADDynamicConv2d", "conv_param_counts", "dyconv_modules", "set_temperature",
           "temperature_at", "total_param_counts"]
