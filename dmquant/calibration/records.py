"""Denoiser calls on disk: each call's positional and keyword arguments in safetensors shards.

Tensors go to the shard; everything else (None, bools, numbers, strings, lists, tuples, dicts, nested:
``joint_attention_kwargs=None``, ``return_dict=False``, Qwen-Image's ``img_shapes=[(1, h, w)]``, LTX's
``rope_interpolation_scale`` tuple) to a JSON layout stored in the shard's metadata, so a call replays
as ``denoiser(*args, **kwargs)`` with the same types. No pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmquant.errors import DMQuantError

_TENSOR = "__tensor__"


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        for key, stored in tensors.items():  # the same tensor at several steps is stored once
            if stored is value:
                return {_TENSOR: key}
        tensors[prefix] = value
        return {_TENSOR: prefix}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _flatten(v, f"{prefix}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        kind = "__tuple__" if isinstance(value, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DMQuantError(f"cannot record a denoiser argument of type {type(value).__name__} at {prefix!r}")


def _unflatten(layout: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(layout, dict):
        if _TENSOR in layout:
            return tensors[layout[_TENSOR]]
        if "__dict__" in layout:
            return {k: _unflatten(v, tensors) for k, v in layout["__dict__"].items()}
        if "__list__" in layout:
            return [_unflatten(v, tensors) for v in layout["__list__"]]
        if "__tuple__" in layout:
            return tuple(_unflatten(v, tensors) for v in layout["__tuple__"])
    return layout


def save_calls(calls: list[tuple[tuple, dict]], path: Path) -> None:
    """Write recorded ``(args, kwargs)`` calls to one safetensors shard."""
    tensors: dict[str, torch.Tensor] = {}
    layout = [
        {"args": [_flatten(a, f"{i}.args.{j}", tensors) for j, a in enumerate(args)],
         "kwargs": {k: _flatten(v, f"{i}.kwargs.{k}", tensors) for k, v in kwargs.items()}}
        for i, (args, kwargs) in enumerate(calls)
    ]
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"dmquant_calls": json.dumps(layout)})
    tmp.replace(path)


def load_calls(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The ``(args, kwargs)`` calls stored in one shard (floating tensors cast to ``dtype`` if given)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads(f.metadata()["dmquant_calls"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise DMQuantError(f"calibration shard {path} is missing or damaged ({exc}): calibrate again") from exc
    for key, t in tensors.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.to(device)
    return [(tuple(_unflatten(a, tensors) for a in c["args"]),
             {k: _unflatten(v, tensors) for k, v in c["kwargs"].items()}) for c in layout]


class CalibrationSet:
    """The recorded denoiser calls of a calibration folder, streamed shard by shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.shards = sorted(self.folder.glob("shard-*.safetensors"))
        if not self.shards:
            raise DMQuantError(f"no calibration shards in {self.folder}: run the calibration collection first")

    def __len__(self) -> int:
        return len(self.shards)

    def iter_calls(self, device="cpu", dtype=None) -> Iterator[tuple[tuple, dict]]:
        for shard in self.shards:
            yield from load_calls(shard, device, dtype)
