"""The zoo's judge ``tiny-shapes-clip``: a :class:`ClipModel` (any open_clip model, working on uint8 images),
and its zero-shot attribute accuracy: does an image show the shape / color it was asked for?

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
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dmquant.errors import DMQuantError
from dmquant.metrics.images import as_uint8_batch
from dmquant.zoo import data
from dmquant.zoo.data import variants

JUDGE = "tiny-shapes-clip"

_NUISANCE = ("size", "position", "background")


@dataclass
class ClipModel:
    """An open_clip model with its tokenizer and image normalisation, working on uint8 images."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    device: str = "cpu"

    @classmethod
    def from_open_clip(cls, spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32, name: str | None = None):
        import open_clip

        model_name, pretrained = spec, None
        if not spec.startswith(("local-dir:", "hf-hub:")) and ":" in spec:
            model_name, pretrained = spec.split(":", 1)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError) as e:
            raise DMQuantError(
                f"cannot load the CLIP model {spec!r}: {str(e).splitlines()[0][:300]}. Offline, use the zoo judge "
                f"{JUDGE!r}, 'local-dir:<folder>' or '<arch>:<local weights file>'"
            ) from e
        model = model.to(dtype=dtype).eval()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = tuple(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        std = tuple(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        for t in getattr(preprocess, "transforms", []):  # the configured normalisation wins
            if type(t).__name__ == "Normalize":
                mean, std = tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std)
        return cls(model, tokenizer, int(size), mean, std, name or spec, device)

    # ------------------------------------------------------------------ encoders
    def pixel_values(self, images) -> torch.Tensor:
        """uint8 images (N,H,W,3 array / N,3,H,W tensor / PIL list) -> normalised model input."""
        x = torch.from_numpy(as_uint8_batch(images)).permute(0, 3, 1, 2).float().div(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        dtype = next(self.model.parameters()).dtype
        return ((x - mean) / std).to(self.device, dtype)

    @torch.no_grad()
    def image_features(self, images, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        x = self.pixel_values(images)
        out = torch.cat([self.model.encode_image(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        return F.normalize(out.float(), dim=-1) if normalize else out.float()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        texts = list(texts)
        outs = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            outs.append(self.model.encode_text(ids))
        out = torch.cat(outs)
        return F.normalize(out.float(), dim=-1) if normalize else out.float()

    def zero_shot(self, images, candidates: Sequence[Sequence[str]]) -> np.ndarray:
        """For image i, the index of the best-matching caption among ``candidates[i]``."""
        img = self.image_features(images)
        unique = list(dict.fromkeys(c for caps in candidates for c in caps))
        txt = self.text_features(unique)
        row = {c: i for i, c in enumerate(unique)}
        picks = []
        for i, caps in enumerate(candidates):
            picks.append(int((txt[[row[c] for c in caps]] @ img[i]).argmax()))
        return np.array(picks)


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
