"""What the weight and the activation quantizer share: a number format (an integer grid or float8) and
its parameters, ``scale`` and ``zero_point`` (empty buffers until calibrated)."""

from __future__ import annotations

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.formats import FloatFormat, IntFormat, is_float


class FormatQuantizer(nn.Module):
    """``role`` ("weights", "activations") names the tensor in the error a float8 format with a zero point
    raises."""

    def __init__(self, fmt: IntFormat | FloatFormat, symmetric: bool, role: str):
        super().__init__()
        if is_float(fmt) and not symmetric:
            raise DMQuantError(f"float8 {role} are symmetric (no zero point): set symmetric=True")
        self.fmt = fmt
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def number_format(self) -> str:
        return "fp8_e4m3" if is_float(self.fmt) else "int"
