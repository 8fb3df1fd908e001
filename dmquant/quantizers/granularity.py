"""Granularity: which elements of a tensor share one scale.

Each granularity is a reshape of the tensor into rows, one row per scale:
``tensor`` (one row), ``channel`` (a row per output channel, dim 0 of a weight), ``group``
(``group_size`` consecutive elements along a weight's input dimension, in its matrix view
``W.reshape(out, -1)``), ``token`` (a row per token: every position of the tensor, across the
channel dimension ``channel_dim``; computed on the fly, i.e. dynamic) and ``sample`` (a row per batch
element, dim 0 of an activation: the whole sample shares one range, computed on the fly; a convolution's
output for one sample depends on that sample alone, so its scale factors out of an integer convolution,
which a per-token scale does not).
"""

from __future__ import annotations

import torch

from dmquant.errors import DMQuantError

GRANULARITIES = ("tensor", "channel", "group", "token", "sample")


def to_rows(x: torch.Tensor, granularity: str, group_size: int | None = None, channel_dim: int = -1):
    """Rows of ``x`` that each share one scale."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity in ("channel", "sample"):
        return x.reshape(x.shape[0], -1)
    if granularity == "group":
        matrix = x.reshape(x.shape[0], -1)
        check_group_size(matrix.shape[1], group_size)
        return matrix.reshape(-1, group_size)
    if granularity == "token":
        moved = x.movedim(channel_dim, -1)
        return moved.reshape(-1, moved.shape[-1])
    raise DMQuantError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")


def from_rows(rows: torch.Tensor, like: torch.Tensor, granularity: str, channel_dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a tensor shaped like ``like``."""
    if granularity == "token":
        moved_shape = like.movedim(channel_dim, -1).shape
        return rows.reshape(moved_shape).movedim(-1, channel_dim)
    return rows.reshape(like.shape)


def check_group_size(input_dim: int, group_size: int | None, where: str = "the layer") -> None:
    if group_size is None or group_size <= 0:
        raise DMQuantError("granularity 'group' needs a positive group_size (e.g. 64 or 128)")
    if input_dim % group_size:
        raise DMQuantError(
            f"group_size={group_size} does not divide the input dimension {input_dim} of {where}: "
            f"pick a divisor of {input_dim}, or exclude the layer"
        )


def dynamic_rows(x: torch.Tensor, granularity: str, group_size: int | None, channel_dim: int) -> torch.Tensor:
    """Rows of a dynamically quantized activation: one per token, per group of ``group_size``
    consecutive channels of each token (``granularity='group'``), or per sample (``'sample'``)."""
    if granularity == "sample":
        return to_rows(x, "sample")
    rows = to_rows(x, "token", channel_dim=channel_dim)
    if granularity != "group":
        return rows
    check_group_size(rows.shape[1], group_size, where="the activation's channels")
    return rows.reshape(-1, group_size)


def from_dynamic_rows(rows: torch.Tensor, like: torch.Tensor, granularity: str, channel_dim: int) -> torch.Tensor:
    """Inverse of :func:`dynamic_rows`."""
    if granularity == "sample":
        return rows.reshape(like.shape)
    moved_shape = like.movedim(channel_dim, -1).shape
    return rows.reshape(moved_shape).movedim(-1, channel_dim)
