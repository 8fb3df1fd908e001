"""Real low-bit compute: int8/int4 GEMMs and fused attention, each with a plain-torch reference.

Importing this package needs neither diffusers nor triton; the Triton kernels load on first use.
"""

from dmquant.kernels.attention import int8_attention, int8_attention_reference
from dmquant.kernels.gemm import (
    int4_linear,
    int4_linear_reference,
    quantize_activations,
    w4a4_linear,
    w4a8_linear,
)
from dmquant.kernels.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4

__all__ = [
    "dequantize_int4",
    "int4_linear",
    "int4_linear_reference",
    "int8_attention",
    "int8_attention_reference",
    "pack_int4",
    "quantize_activations",
    "quantize_int4",
    "unpack_int4",
    "w4a4_linear",
    "w4a8_linear",
]
