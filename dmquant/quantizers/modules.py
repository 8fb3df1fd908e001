"""Quantizer modules: they hold scales and zero points (buffers) and fake-quantize tensors.

* :class:`WeightQuantizer` is calibrated once from the weight it quantizes.
* :class:`ActQuantizer` is either static (a range observed on calibration data, per tensor) or
  dynamic (per token, computed on the fly). Its ``mode`` is ``"off"`` (pass-through),
  ``"observe"`` (record statistics, pass-through) or ``"quant"``.
"""

from __future__ import annotations

import torch
from torch import nn

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.formats import IntFormat
from dmquant.quantizers.affine import fake_quant, qparams_from_range, quantize
from dmquant.quantizers.granularity import from_rows, to_rows
from dmquant.quantizers.observer import RangeObserver
from dmquant.quantizers.ranges import estimate_range

MODES = ("off", "observe", "quant")


class _ResizableBuffers(nn.Module):
    """Buffers that take the shape of the state dict being loaded (scales are sized at calibration)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and buf is not None and buf.shape != incoming.shape:
                self._buffers[name] = torch.empty_like(incoming, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightQuantizer(_ResizableBuffers):
    def __init__(self, config: WeightQuantConfig):
        super().__init__()
        self.config = config
        self.fmt = IntFormat(config.bits, signed=True, narrow=config.symmetric)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return to_rows(weight, self.config.granularity, self.config.group_size)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        c = self.config
        lo, hi = estimate_range(self.rows(weight), c.method, self.fmt, c.symmetric, c.percentile)
        scale, zero = qparams_from_range(lo, hi, self.fmt, c.symmetric)
        self.scale, self.zero_point = scale.to(weight.dtype), zero.to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise DMQuantError("a weight quantizer was used before calibration: call calibrate(weight) first")
        rows = fake_quant(self.rows(weight), self.scale[:, None], self.zero_point[:, None], self.fmt)
        return from_rows(rows, weight, self.config.granularity)

    @torch.no_grad()
    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's integer codes (int8 tensor), shaped as the weight."""
        rows = quantize(self.rows(weight), self.scale[:, None], self.zero_point[:, None], self.fmt)
        return from_rows(rows, weight, self.config.granularity).to(torch.int8)


class ActQuantizer(_ResizableBuffers):
    def __init__(self, config: ActQuantConfig, channel_dim: int = -1, signed: bool | None = None):
        super().__init__()
        self.config = config
        self.channel_dim = channel_dim
        signed = config.symmetric if signed is None else signed
        self.fmt = IntFormat(config.bits, signed=signed, narrow=False)
        self.mode = "off"
        self.observer: RangeObserver | None = None
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise DMQuantError(f"unknown quantizer mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "observe" and self.config.static and self.observer is None:
            self.observer = RangeObserver()
        self.mode = mode

    @property
    def calibrated(self) -> bool:
        return not self.config.static or self.scale.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.config.static:
                self.observer.update(x.detach().reshape(1, -1))
            return x
        if not self.config.static:
            return self._dynamic(x)
        if not self.calibrated:
            raise DMQuantError("an activation quantizer has no range: run calibration before quantized inference")
        return fake_quant(x, self.scale, self.zero_point, self.fmt)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        rows = to_rows(x, "token", channel_dim=self.channel_dim)
        lo, hi = rows.detach().amin(dim=1), rows.detach().amax(dim=1)
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.config.symmetric)
        q = fake_quant(rows, scale[:, None], zero[:, None], self.fmt)
        return from_rows(q, x, "token", channel_dim=self.channel_dim)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed statistics into a scale and zero point; free the statistics."""
        if not self.config.static:
            return
        if self.observer is None or self.observer.empty:
            raise DMQuantError(
                "an activation quantizer saw no data during calibration: the layer never ran on the "
                "calibration inputs; exclude it or check the calibration prompts"
            )
        obs, c = self.observer, self.config
        rows = obs.sample if c.method != "minmax" else None
        lo, hi = estimate_range(
            rows if rows is not None else obs.lo[:, None],
            c.method, self.fmt, c.symmetric, c.percentile, extremes=(obs.lo, obs.hi),
        )
        scale, zero = qparams_from_range(lo, hi, self.fmt, c.symmetric)
        self.scale, self.zero_point = scale.reshape(()), zero.reshape(())
        self.observer = None
