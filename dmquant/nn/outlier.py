"""The outlier branch of one layer: an input transform folded into the weight (smoothing, Hadamard
rotation) and SVDQuant's 16-bit low-rank branch.

For a layer ``y = x·Wᵀ + b`` (a convolution: its input channels) the wrapped layer computes::

    x' = T(x) = (x / s)·H                    (either part optional)
    y  = Q(x')·Q(R)ᵀ + (x'·L2ᵀ)·L1ᵀ + b       with  W' = (W·diag(s))·H = L1·L2 + R

so that with nothing quantized ``y`` equals the original layer's output (to float rounding). ``L1``
and ``L2`` are stored in 16-bit and ``R`` is computed against their rounded values, so the identity
holds for the stored branch. ``H`` is applied in its factored form (each Sylvester block as the Kronecker
product of two small ones, :func:`dmquant.quantizers.outliers.rotate`): ``2·sqrt(block)`` multiply-adds per
channel instead of a dense ``n x n`` product. The same module serves the simulated layer and the frozen one.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.quantizers.outliers import hadamard, hadamard_factors, rotate

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.lru_cache(maxsize=64)
def _rotation_factors(n: int, seed: int, device: str, dtype: torch.dtype) -> tuple:
    return tuple(t.to(device=device, dtype=dtype) for t in hadamard_factors(n, seed))


class OutlierBranch(nn.Module):
    """Input transform and low-rank branch of a linear layer or a conv (``groups=1``).

    ``geometry`` is ``None`` for a linear layer, else the conv's ``kernel_size``, ``stride``,
    ``padding`` and ``dilation``. Tensors: ``smooth [C]`` (float32), ``lora_down [r, C·kh·kw]``
    and ``lora_up [out, r]`` (``dtype``, 16-bit by default).
    """

    def __init__(self, in_channels: int, out_channels: int, geometry: dict | None = None, *,
                 smooth: bool = False, rotation_seed: int | None = None, rank: int = 0,
                 dtype: str = "float16", device=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.geometry = None if geometry is None else {k: tuple(v) for k, v in geometry.items()}
        self.rotation_seed = None if rotation_seed is None else int(rotation_seed)
        self.rank, self.dtype_name = int(rank), dtype
        if self.rotation_seed is not None and self.in_channels % 2:
            raise DMQuantError(f"a Hadamard rotation needs an even number of input channels, got {in_channels}: "
                               "exclude the layer or drop 'rotation'")
        taps = 1 if self.geometry is None else math.prod(self.geometry["kernel_size"])
        self.register_buffer("smooth", torch.ones(self.in_channels, device=device) if smooth else None)
        if self.rank:
            dt = DTYPES[dtype]
            self.lora_down = nn.Parameter(torch.zeros(self.rank, self.in_channels * taps, dtype=dt, device=device),
                                          requires_grad=False)
            self.lora_up = nn.Parameter(torch.zeros(self.out_channels, self.rank, dtype=dt, device=device),
                                        requires_grad=False)
        else:
            self.lora_down = self.lora_up = None

    # -- description -----------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "geometry": None if self.geometry is None else {k: list(v) for k, v in self.geometry.items()},
                "smooth": self.smooth is not None, "rotation_seed": self.rotation_seed, "rank": self.rank,
                "dtype": self.dtype_name}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> OutlierBranch:
        return cls(spec["in_channels"], spec["out_channels"], spec.get("geometry"), smooth=spec["smooth"],
                   rotation_seed=spec.get("rotation_seed"), rank=spec.get("rank", 0),
                   dtype=spec.get("dtype", "float16"), device=device)

    def extra_repr(self) -> str:
        parts = [f"smooth={self.smooth is not None}", f"rotation={self.rotation_seed is not None}",
                 f"rank={self.rank}"]
        return ", ".join(parts)

    def nbytes(self) -> int:
        """Bytes of the branch's stored tensors (smoothing factors and the two low-rank factors)."""
        return sum(t.numel() * t.element_size() for t in (self.smooth, self.lora_down, self.lora_up) if t is not None)

    # -- computation -------------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ H`` over the last dimension, in the factored form (:func:`rotate`)."""
        return rotate(x, _rotation_factors(self.in_channels, self.rotation_seed, str(x.device), x.dtype))

    def transform(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``x' = (x / s)·H`` over the channel dimension."""
        if self.smooth is not None:
            shape = [1] * x.ndim
            shape[channel_dim] = -1
            x = x / self.smooth.to(x.dtype).reshape(shape)
        if self.rotation_seed is not None:
            x = self._rotate(x.movedim(channel_dim, -1)).movedim(-1, channel_dim)
        return x

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' = (W·diag(s))·H``: the weight that reads the transformed input (input channels = dim 1)."""
        w = weight.detach().double()
        if self.smooth is not None:
            shape = [1] * w.ndim
            shape[1] = -1
            w = w * self.smooth.double().reshape(shape)
        if self.rotation_seed is not None:
            h = hadamard(self.in_channels, self.rotation_seed, w.device).double()
            w = torch.einsum("oc...,cd->od...", w, h)
        return w

    def set_low_rank(self, l1: torch.Tensor, l2: torch.Tensor) -> None:
        dt = DTYPES[self.dtype_name]
        self.lora_up.data = l1.to(dt).contiguous()
        self.lora_down.data = l2.to(dt).contiguous()

    @torch.no_grad()
    def append_low_rank(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Append ``r`` ranks to the low-rank branch: ``L1 <- [L1 | up]`` (``up [out, r]``) and ``L2 <- [L2 ; down]``
        (``down [r, C·kh·kw]`` or a conv-shaped ``[r, C, kh, kw]``, reading the transformed input x'), stored in
        the dtype the branch holds (its own, or the one ``.to()`` gave it) on ``up``'s device. The ranks already
        there keep their stored values, so :meth:`keep_low_rank` gives the branch back exactly."""
        taps = 1 if self.geometry is None else math.prod(self.geometry["kernel_size"])
        dt = self.lora_up.dtype if self.rank else DTYPES[self.dtype_name]
        down = down.reshape(down.shape[0], -1)
        if up.ndim != 2 or up.shape[0] != self.out_channels or down.shape != (up.shape[1], self.in_channels * taps):
            raise DMQuantError(f"low-rank factors {tuple(up.shape)} x {tuple(down.shape)} do not fit a branch of "
                               f"{self.out_channels} outputs and {self.in_channels * taps} inputs")
        up, down = up.to(dt), down.to(device=up.device, dtype=dt)
        if self.rank:
            up = torch.cat([self.lora_up.detach().to(up.device), up], dim=1)
            down = torch.cat([self.lora_down.detach().to(up.device), down], dim=0)
        self.lora_up = nn.Parameter(up.contiguous(), requires_grad=False)
        self.lora_down = nn.Parameter(down.contiguous(), requires_grad=False)
        self.rank = int(up.shape[1])

    @torch.no_grad()
    def keep_low_rank(self, rank: int) -> None:
        """Keep only the first ``rank`` ranks of the low-rank branch (0: none), as copies of their stored values."""
        if not 0 <= rank <= self.rank:
            raise DMQuantError(f"the branch has rank {self.rank}; it cannot keep {rank}")
        if rank == 0:
            self.lora_up = self.lora_down = None
        else:
            self.lora_up = nn.Parameter(self.lora_up.detach()[:, :rank].clone(), requires_grad=False)
            self.lora_down = nn.Parameter(self.lora_down.detach()[:rank].clone(), requires_grad=False)
        self.rank = int(rank)

    def low_rank_weight(self) -> torch.Tensor:
        """``L1·L2`` in float64, in the matrix view ``[out, C·kh·kw]``."""
        return self.lora_up.double() @ self.lora_down.double()

    def forward(self, main, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """The layer with its branch (see :func:`apply_branch`). A module call, so that hooks on the branch
        see its tensors used: accelerate's sequential offload loads the low-rank factors here."""
        wide = self.smooth is not None and x.dtype in (torch.float16, torch.bfloat16)
        xt = self.transform(x.float() if wide else x, channel_dim)
        y = main(xt, x.dtype)
        extra = self.low_rank(xt.to(x.dtype))
        y = y if extra is None else y + extra
        return y.to(x.dtype)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(x'·L2ᵀ)·L1ᵀ`` for the transformed input ``x'`` (None without a branch)."""
        if not self.rank:
            return None
        down, up = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        if self.geometry is None:
            return F.linear(F.linear(x, down), up)
        g = self.geometry
        hidden = F.conv2d(x, down.reshape(self.rank, self.in_channels, *g["kernel_size"]), None,
                          g["stride"], g["padding"], g["dilation"])
        return F.conv2d(hidden, up[:, :, None, None])


def apply_branch(branch: OutlierBranch | None, main, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``main(T(x), dtype) + low_rank(T(x))``, or ``main(x)`` without a branch (``main`` takes the input
    and the dtype of the product).

    With smoothing and a 16-bit ``x``, ``T(x)`` and the quantized main path are computed in float32 (as the
    fused kernels do: the smoothed input rounded to 16 bits would move near-tie activation codes, and a
    frozen layer would then no longer compute what was calibrated); the low-rank branch reads ``T(x)``
    rounded to ``x``'s dtype, as the kernels' branch does; the sum is returned in ``x``'s dtype."""
    if branch is None:
        return main(x)
    return branch(main, x, channel_dim)  # a module call: hooks on the branch see its tensors used (offload)
