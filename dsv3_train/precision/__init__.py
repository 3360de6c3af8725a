"""Mixed precision: one linear factory (fp32 / bf16 / fp8 emulated block-wise / fp8 Transformer
Engine), deferred weight gradients for zero-bubble schedules, BF16 optimizer moments.

See docs/precision.md for the recipe, the error bounds and the measurements.
"""
from dsv3_train.precision.config import PrecisionConfig
from dsv3_train.precision.deferral import DeferredWeightGrads, DefersWeightGrad, defer_weight_grad
from dsv3_train.precision.gemm import BlockwiseFp8Gemms, PlainGemms, ambient_dtype
from dsv3_train.precision.linear import Linear, building_with, make_linear, resolve_precision
from dsv3_train.precision.optim import keep_moments_in_bf16
from dsv3_train.precision.quantize import (E4M3_MAX, dequantize_blocks, dequantize_tiles, quantize_blocks,
                                           quantize_tiles, to_e4m3)
from dsv3_train.precision.te import TEModule

__all__ = ["BlockwiseFp8Gemms", "DeferredWeightGrads", "DefersWeightGrad", "E4M3_MAX", "Linear",
           "PlainGemms", "PrecisionConfig", "TEModule", "ambient_dtype", "building_with",
           "defer_weight_grad", "dequantize_blocks", "dequantize_tiles", "keep_moments_in_bf16",
           "make_linear", "quantize_blocks", "quantize_tiles", "resolve_precision", "to_e4m3"]
