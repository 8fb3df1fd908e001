"""Image batches in one canonical form (uint8, N x H x W x 3; videos N x F x H x W x 3), checks, and the
side-by-side grids (images; a frame strip per video)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from dmquant.errors import DMQuantError


def as_uint8_batch(images) -> np.ndarray:
    """uint8 N x H x W x 3 from: a uint8/float array (N,H,W,3), a tensor (N,3,H,W) in [0,1] or uint8,
    a list of PIL images or of arrays. Floats are taken as [0, 1]."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.ndim != 4 or t.shape[1] != 3:
            raise DMQuantError(f"expected image tensors of shape N x 3 x H x W, got {tuple(t.shape)}")
        arr = t.permute(0, 2, 3, 1).numpy()
    elif isinstance(images, np.ndarray):
        arr = images
    else:
        items = list(images)
        if not items:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        arrs = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in items]
        shapes = {a.shape for a in arrs}
        if len(shapes) > 1:
            raise DMQuantError(f"images of mismatched sizes in one set: {sorted(shapes)}")
        arr = np.stack(arrs)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DMQuantError(f"expected RGB images N x H x W x 3, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def as_uint8_video(videos) -> np.ndarray:
    """uint8 N x F x H x W x 3 from a pipeline's ``frames``: an array N x F x H x W x 3 (floats in [0, 1]),
    a tensor of that shape, or a list (one per video) of frame lists / arrays."""
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().cpu().numpy()
    if isinstance(videos, np.ndarray):
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise DMQuantError(f"expected videos N x F x H x W x 3, got shape {videos.shape}")
        return as_uint8_batch(videos.reshape(-1, *videos.shape[2:])).reshape(videos.shape)
    items = [as_uint8_batch(v) for v in videos]
    if len({a.shape for a in items}) > 1:
        raise DMQuantError(f"videos of mismatched shapes in one set: {sorted({a.shape for a in items})}")
    return np.stack(items)


def as_frames(images: np.ndarray) -> np.ndarray:
    """Videos N x F x H x W x 3 as one batch of N*F frames (video-major); image batches unchanged."""
    return images.reshape(-1, *images.shape[2:]) if images.ndim == 5 else images


def frame_strip(video: np.ndarray) -> np.ndarray:
    """The frames of one video (F x H x W x 3) side by side, left to right: H x F*W x 3."""
    return np.concatenate(list(video), axis=1)


def check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise DMQuantError(f"{what}: image sets of different shapes {a.shape} and {b.shape} (same count and size needed)")


def save_pngs(images: np.ndarray, folder: str | Path, prefix: str = "") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(as_uint8_batch(images)):
        p = folder / f"{prefix}{i:05d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def load_pngs(folder: str | Path) -> np.ndarray:
    files = sorted(Path(folder).glob("*.png"))
    return as_uint8_batch([Image.open(f) for f in files])


def tile(images: np.ndarray, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Images in a grid with ``cols`` columns and ``pad`` pixels between them."""
    n, h, w, _ = images.shape
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), fill, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return out


def side_by_side_grid(
    evaluated: np.ndarray, reference: np.ndarray | None = None, max_images: int = 16, scale: int | None = None
) -> np.ndarray:
    """Grid image: the reference images (left block) next to the evaluated ones (right block), same order.

    Small images are enlarged (nearest neighbour) so that a person can check them by eye.
    """
    evaluated = as_uint8_batch(evaluated)[:max_images]
    blocks = [evaluated]
    if reference is not None:
        reference = as_uint8_batch(reference)[:max_images]
        check_same_shape(reference, evaluated, "grid")
        blocks = [reference, evaluated]
    cols = max(1, math.ceil(math.sqrt(len(evaluated))))
    grids = [tile(b, cols) for b in blocks]
    if len(grids) == 2:
        gap = np.full((grids[0].shape[0], 8, 3), 0, dtype=np.uint8)
        grid = np.concatenate([grids[0], gap, grids[1]], axis=1)
    else:
        grid = grids[0]
    if scale is None:
        scale = max(1, 256 // max(1, evaluated.shape[1]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def frame_strip_grid(evaluated: np.ndarray, reference: np.ndarray | None = None, max_videos: int = 8,
                     max_frames: int = 4, scale: int | None = None) -> np.ndarray:
    """Grid for videos (N x F x H x W x 3): one row per video, ``max_frames`` frames evenly spaced from the
    first to the last; the reference strips (left block) next to the evaluated ones (right block)."""
    evaluated = evaluated[:max_videos]
    idx = np.unique(np.linspace(0, evaluated.shape[1] - 1, min(max_frames, evaluated.shape[1])).round().astype(int))
    blocks = [evaluated]
    if reference is not None:
        reference = reference[:max_videos]
        check_same_shape(reference, evaluated, "grid")
        blocks = [reference, evaluated]
    grids = [tile(as_frames(b[:, idx]), cols=len(idx)) for b in blocks]
    if len(grids) == 2:
        grids.insert(1, np.full((grids[0].shape[0], 8, 3), 0, dtype=np.uint8))
    grid = np.concatenate(grids, axis=1)
    if scale is None:
        scale = max(1, 256 // max(1, evaluated.shape[2]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def captioned_rows(rows: Sequence[np.ndarray], labels: Sequence[str], scale: int = 4) -> np.ndarray:
    """Rows of images (each N x H x W x 3) with a text label on the left of each row (PIL's font)."""
    strips = [tile(as_uint8_batch(r), cols=len(r)).repeat(scale, 0).repeat(scale, 1) for r in rows]
    width_label = 8 + int(4.6 * max(len(s) for s in labels))
    h = max(s.shape[0] for s in strips)
    w = width_label + max(s.shape[1] for s in strips)
    canvas = Image.new("RGB", (w, h * len(strips)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (strip, label) in enumerate(zip(strips, labels)):
        canvas.paste(Image.fromarray(strip), (width_label, i * h))
        draw.text((4, i * h + h // 2 - 5), label, fill=(0, 0, 0))
    return np.asarray(canvas)
