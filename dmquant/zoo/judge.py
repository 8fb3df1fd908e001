"""Zero-shot attribute accuracy with the zoo's judge: does an image show the shape / color it was asked for?

Default (``marginal=False``): for each image generated from a grammar caption, the judge compares it
with the captions that differ from the prompt only in one attribute of the first object (e.g. only the
shape: circle, square, triangle, diamond) and picks the closest; accuracy is the fraction of images
where it picks the prompt.

``marginal=True`` is for models that are not told the other attributes (the class-conditioned DiT
draws size, position and background freely): the candidates then also range over every size,
position and background (single-object captions), and the attribute of the best caption is read off.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from dmquant.zoo import data
from dmquant.zoo.data import variants

_NUISANCE = ("size", "position", "background")


def _single_object_captions() -> list[tuple[dict, str]]:
    out = []
    for shape, color, size, pos, bg in itertools.product(data.SHAPES, data.COLORS, data.SIZES, data.POSITIONS,
                                                         data.BACKGROUNDS):
        scene = data.Scene((data.ShapeObject(shape, color, size, pos),), bg)
        out.append(({"shape": shape, "color": color, "size": size, "position": pos, "background": bg}, scene.caption))
    return out


def _marginal_accuracy(judge, images, captions: Sequence[str], attributes) -> dict[str, float]:
    table = _single_object_captions()
    txt = judge.text_features([c for _, c in table])
    img = judge.image_features(images)
    sims = (img @ txt.t()).numpy()  # images x all captions
    attrs = {k: np.array([a[k] for a, _ in table]) for k in ("shape", "color", "size", "position", "background")}
    out = {}
    for attr in attributes:
        hits = []
        for i, cap in enumerate(captions):
            first = data.parse_caption(cap).objects[0]
            fixed = [k for k in ("shape", "color") if k != attr]  # the other core attribute is given
            mask = np.ones(len(table), dtype=bool)
            for k in fixed:
                mask &= attrs[k] == getattr(first, k)
            best = np.flatnonzero(mask)[int(np.argmax(sims[i, mask]))]
            hits.append(attrs[attr][best] == getattr(first, attr))
        out[attr] = float(np.mean(hits))
    return out


def attribute_accuracy(
    judge, images, captions: Sequence[str], attributes=("shape", "color"), marginal: bool = False
) -> dict[str, float]:
    """{attribute: accuracy in [0, 1]} of ``judge`` (a ClipModel) on ``images`` vs ``captions``."""
    if marginal:
        bad = [a for a in attributes if a not in ("shape", "color")]
        if bad:
            raise ValueError(f"marginal accuracy is defined for shape and color, not {bad}")
        return _marginal_accuracy(judge, images, captions, attributes)
    out = {}
    for attr in attributes:
        cands, truth = zip(*(variants(c, attr) for c in captions))
        picks = judge.zero_shot(images, cands)
        out[attr] = float((picks == list(truth)).mean())
    return out
