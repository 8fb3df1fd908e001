"""The weight quantizer: scales of one weight (per tensor, output channel, or group of input
elements) and its rounding: to nearest, learned (AdaRound's ``V`` while a reconstruction runs), or
fixed codes once that rounding is hardened. It takes numbers and formats, never config objects.

``number_format="fp8_e4m3"`` stores float8 e4m3 codes instead of integers (symmetric, ``scale =
amax / 448`` per row, rounding to the nearest float8 only: learned rounding is for integer grids).

``scale_dtype="float16"`` keeps scales (and zero points) that a float16 number holds: they are rounded to
float16 before the codes are computed, so the frozen layer that stores them in float16 computes what the
simulation computes (two bytes a scale instead of four).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.formats import format_named, is_float
from dmquant.quantizers.adaround import init_rounding, learned_codes, rounding_regularizer
from dmquant.quantizers.affine import (
    dequantize,
    fake_quant,
    qparams_from_range,
    quantize,
    round_scale,
    scale_dtype_named,
)
from dmquant.quantizers.base import FormatQuantizer
from dmquant.quantizers.granularity import from_rows, to_rows
from dmquant.quantizers.ranges import estimate_range


class WeightQuantizer(FormatQuantizer):
    def __init__(self, bits: int = 8, symmetric: bool = True, granularity: str = "channel",
                 group_size: int | None = None, method: str = "minmax", percentile: float = 99.99,
                 number_format: str = "int", scale_dtype: str = "float32"):
        super().__init__(format_named(number_format, bits, signed=True, narrow=symmetric), symmetric, "weights")
        self.scale_dtype = scale_dtype
        self._scale_torch_dtype = scale_dtype_named(scale_dtype)
        self.symmetric, self.granularity, self.group_size = symmetric, granularity, group_size
        self.method, self.percentile = method, percentile
        self.register_buffer("fixed_codes", None)  # hardened learned rounding (int8, shaped as the rows)
        self.rounding: nn.Parameter | None = None  # AdaRound's V while a reconstruction learns it
        self.rounding_floor: torch.Tensor | None = None  # floor(W / s) of the scale the rounding started from
        self.scale_gain: nn.Parameter | None = None  # log of the learned scales' ratio to ``scale`` (while learned)

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return to_rows(weight, self.granularity, self.group_size)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """Scales (and zero points) from the weight; forgets any learned rounding."""
        dtype = self._scale_torch_dtype
        lo, hi = estimate_range(self.rows(weight), self.method, self.fmt, self.symmetric, self.percentile,
                                scale_dtype=dtype)
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.symmetric, dtype)
        self.scale, self.zero_point = scale.to(weight.dtype), zero.to(weight.dtype)
        self.fixed_codes, self.rounding, self.rounding_floor = None, None, None

    def _qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.calibrated:
            raise DMQuantError("a weight quantizer was used before calibration: call calibrate(weight) first")
        scale = self.scale if self.scale_gain is None else self.scale * torch.exp(self.scale_gain)
        return scale[:, None], self.zero_point[:, None]

    def code_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of the weight's rows (whole numbers in the weight's dtype)."""
        scale, zero = self._qparams()
        if self.fixed_codes is not None:
            return self.fixed_codes.to(weight.dtype)
        rows = self.rows(weight)
        if self.rounding is not None:
            return learned_codes(self.rounding_floor, zero, self.rounding, self.fmt, hard=True)
        return quantize(rows, scale, zero, self.fmt)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's codes, shaped as the weight: int8, or ``float8_e4m3fn`` for the float format."""
        dtype = self.fmt.dtype if is_float(self.fmt) else torch.int8
        return from_rows(self.code_rows(weight), weight, self.granularity).to(dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight: differentiable in the learned rounding (or, with gradients, STE)."""
        scale, zero = self._qparams()
        if self.rounding is not None:
            rows = dequantize(learned_codes(self.rounding_floor, zero, self.rounding, self.fmt), scale, zero)
        elif weight.requires_grad and torch.is_grad_enabled() and self.fixed_codes is None:
            rows = fake_quant(self.rows(weight), scale, zero, self.fmt)
        else:
            rows = dequantize(self.code_rows(weight), scale, zero)
        return from_rows(rows, weight, self.granularity)

    # -- learned rounding (AdaRound); driven by dmquant.calibration.reconstruct --------------------------
    def start_rounding(self, weight: torch.Tensor) -> nn.Parameter:
        """AdaRound's ``V``, initialised at the weight's fractional parts; returns it for an optimizer."""
        if is_float(self.fmt):
            raise DMQuantError("learned rounding (AdaRound) needs an integer grid: float8 weights round to nearest; "
                               "drop 'reconstruction' from the recipe")
        scale, _ = self._qparams()
        w_over_s = self.rows(weight.detach()) / scale.detach()
        self.fixed_codes, self.rounding_floor = None, torch.floor(w_over_s)
        self.rounding = nn.Parameter(init_rounding(w_over_s))
        return self.rounding

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.rounding, beta)

    @torch.no_grad()
    def harden_rounding(self, weight: torch.Tensor) -> None:
        """Fix the learned rounding (``V >= 0`` rounds up) as the quantizer's codes."""
        self.fixed_codes = self.code_rows(weight.detach()).to(torch.int8)
        self.rounding, self.rounding_floor = None, None

    @contextmanager
    def learnable_scale(self):
        """Within the block each scale is ``s0 · exp(g)`` with ``g`` a Parameter (zeros at the start; yielded):
        learned with the rounding in relative steps the same for a small scale as for a large one, the integer
        part ``floor(W / s0)`` staying that of the starting scale. After it ``scale`` holds the learned scales
        rounded to the scale dtype (the frozen layer stores what the simulation uses). Zero points stay: the
        grid ``s · (q - z)`` scales about 0."""
        self.scale_gain = nn.Parameter(torch.zeros_like(self.scale))
        try:
            yield self.scale_gain
        finally:
            with torch.no_grad():
                learned = self.scale * torch.exp(self.scale_gain)
            self.scale_gain = None
            self.scale = round_scale(learned, self._scale_torch_dtype)

    def extra_repr(self) -> str:
        g = self.granularity + (f"({self.group_size})" if self.granularity == "group" else "")
        fmt = ", fp8_e4m3" if is_float(self.fmt) else ""
        scales = "" if self.scale_dtype == "float32" else f", {self.scale_dtype} scales"
        return f"bits={self.bits}{fmt}, {g}, symmetric={self.symmetric}{scales}"
