"""The zoo LoRA's effect, ``tiny-shapes-sd-lora``: colors rotate, and the judge says how often it sees that.

With the LoRA loaded, tiny-shapes-sd draws every object in the *next* color of the cycle
:data:`COLOR_CYCLE` (red -> green -> blue -> yellow -> white -> magenta -> cyan -> red) instead of the one
its caption names; shapes, sizes, positions and backgrounds stay as asked. The training targets are
the scenes rendered with :func:`rotate_scene` (``dmquant.zoo.train_lora``).

:func:`effect_rate` is the measurement: for each image and its prompt, the judge (``tiny-shapes-clip``)
picks, among the captions that differ from the prompt only in the first object's color (7 candidates;
for two objects 14: the second object's color as asked or rotated), the closest to the image; the effect
is seen when it picks the rotated color for the first object. Without the LoRA the
model draws the prompt's color, so the rate is near 0; with it, near 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dmquant.errors import DMQuantError
from dmquant.zoo import data

LORA_NAME = "tiny-shapes-sd-lora"
COLOR_CYCLE: tuple[str, ...] = tuple(data.COLORS)


def rotate_color(color: str) -> str:
    """The color the LoRA draws for ``color``: the next one of :data:`COLOR_CYCLE`."""
    if color not in COLOR_CYCLE:
        raise DMQuantError(f"unknown color {color!r}; choose one of {', '.join(COLOR_CYCLE)}")
    return COLOR_CYCLE[(COLOR_CYCLE.index(color) + 1) % len(COLOR_CYCLE)]


def rotate_scene(scene: data.Scene) -> data.Scene:
    """``scene`` with every object's color rotated: what the LoRA is trained to draw for its caption."""
    objects = tuple(data.ShapeObject(o.shape, rotate_color(o.color), o.size, o.position) for o in scene.objects)
    return data.Scene(objects, scene.background)


def render_rotated(captions: Sequence[str], seed: int = 0) -> np.ndarray:
    """Ground truth of the effect: caption *i*'s scene, colors rotated, rendered with jitter seed ``seed + i``."""
    return np.stack([data.render(rotate_scene(data.parse_caption(c)), seed + i) for i, c in enumerate(captions)])


def _first_color_candidates(caption: str) -> list[str]:
    """The captions that give the first object each color, the other objects as asked and then rotated
    (7 + 7 for two objects): an image with or without the effect has one candidate that describes it all."""
    scene = data.parse_caption(caption)
    contexts = [scene] if len(scene.objects) == 1 else [scene, rotate_scene(scene)]
    return [cap for ctx in contexts for cap in data.variants(ctx.caption, "color")[0]]


def color_picks(judge, images, captions: Sequence[str]) -> np.ndarray:
    """For each image, the color (a name) the judge reads for its caption's first object."""
    picks = judge.zero_shot(images, [_first_color_candidates(c) for c in captions])
    return np.array([COLOR_CYCLE[p % len(COLOR_CYCLE)] for p in picks])


def effect_rate(judge, images, captions: Sequence[str]) -> dict[str, float]:
    """How often the judge sees the LoRA's effect on ``images`` generated from ``captions``.

    ``effect``: fraction of images whose first object the judge reads in the rotated color;
    ``prompt_color``: fraction it reads in the caption's own color (the model without the LoRA);
    the rest is some third color.
    """
    if len(captions) == 0:
        raise DMQuantError("effect_rate needs at least one image and its caption")
    picks = color_picks(judge, images, captions)
    asked = np.array([data.parse_caption(c).objects[0].color for c in captions])
    rotated = np.array([rotate_color(c) for c in asked])
    return {"effect": float((picks == rotated).mean()), "prompt_color": float((picks == asked).mean())}
