"""CLIP score with any open_clip model: a built-in name with a tag or local weights, a local folder,
or the zoo's judge ``tiny-shapes-clip``. The score itself is torchmetrics' ``clip_score``
(``max(100 * cos(E_image, E_text), 0)``, averaged), fed through a small adapter. The models are
:class:`dmquant.zoo.judge.ClipModel` objects.

Model specs understood by :func:`load_clip`:

- ``"tiny-shapes-clip"``: the zoo judge (shipped weights, offline);
- ``"local-dir:/path"``: a folder with ``open_clip_config.json`` and weights (open_clip's own schema);
- ``"ViT-B-32:laion2b_s34b_b79k"``: an open_clip architecture and pretrained tag (downloaded, so it
  needs the hub or a filled cache);
- ``"ViT-B-32:/path/to/weights.safetensors"``: an architecture and a local checkpoint file.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from dmquant import zoo
from dmquant.errors import DMQuantError
from dmquant.metrics.images import as_uint8_batch
from dmquant.zoo.judge import JUDGE, ClipModel

DEFAULT_REAL_CLIP = "ViT-L-14:openai"  # used for prompts outside the shapes grammar


class _TMModel:  # the (model, processor) pair torchmetrics' clip_score accepts from a callable
    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip
        self.config = None

    def to(self, device):  # torchmetrics moves the model to the images' device; ours stays put
        return self

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.model.encode_image(pixel_values).float()

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.model.encode_text(input_ids).float()


class _TMProcessor:
    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": self.clip.pixel_values(torch.stack(list(images)))}
        ids = self.clip.tokenizer(list(text)).to(self.clip.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_CACHE: dict[tuple[str, str], ClipModel] = {}


def load_clip(spec: str | ClipModel = JUDGE, device: str = "cpu") -> ClipModel:
    """A :class:`ClipModel` from a spec (see the module doc); cached per (spec, device)."""
    if isinstance(spec, ClipModel):
        return spec
    key = (spec, device)
    if key not in _CACHE:
        if spec == JUDGE:
            _CACHE[key] = zoo.load(JUDGE, device=device)
        elif spec.startswith("local-dir:") and not os.path.isdir(spec[len("local-dir:"):]):
            raise DMQuantError(f"no such folder for the CLIP model: {spec[len('local-dir:'):]}")
        else:
            _CACHE[key] = ClipModel.from_open_clip(spec, device=device)
    return _CACHE[key]


def _images_and_prompts(images, prompts: Sequence[str]):
    """(uint8 batch, prompt list), or DMQuantError unless there is one prompt per image and at least one."""
    batch, prompts = as_uint8_batch(images), list(prompts)
    if len(batch) != len(prompts):
        raise DMQuantError(f"CLIP score needs one prompt per image: {len(batch)} images, {len(prompts)} prompts")
    if len(batch) == 0:
        raise DMQuantError("CLIP score of an empty image set")
    return batch, prompts


def compute_clip_score(images, prompts: Sequence[str], model: str | ClipModel = JUDGE, device: str = "cpu") -> float:
    """Mean CLIP score (0..100) of images against their prompts, computed by torchmetrics."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    batch, prompts = _images_and_prompts(images, prompts)
    clip = load_clip(model, device)
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)
    score = tm_clip_score(tensor, prompts, model_name_or_path=lambda: (_TMModel(clip), _TMProcessor(clip)))
    return float(score)


def clip_scores_per_image(images, prompts: Sequence[str], model: str | ClipModel = JUDGE,
                          device: str = "cpu") -> list[float]:
    """The CLIP score of each image against its prompt, ``max(100 * cos, 0)``, in one batched pass: what a paired
    comparison of two image sets from the same prompts and seeds needs
    (:func:`dmquant.metrics.fidelity.paired_difference`). Their mean is :func:`compute_clip_score` only while no
    cosine is negative: torchmetrics takes ``max(., 0)`` of the mean, not of each image."""
    batch, prompts = _images_and_prompts(images, prompts)
    clip = load_clip(model, device)
    with torch.no_grad():
        cos = (clip.image_features(batch) * clip.text_features(prompts)).sum(-1)
    return torch.clamp(100 * cos, min=0).tolist()
