"""CLIP score with any open_clip model: a built-in name with a tag or local weights, a local folder,
or the zoo's judge ``tiny-shapes-clip``. The score itself is torchmetrics' ``clip_score``
(``max(100 * cos(E_image, E_text), 0)``, averaged), fed through a small adapter.

Model specs understood by :func:`load_clip`:

- ``"tiny-shapes-clip"``: the zoo judge (shipped weights, offline);
- ``"local-dir:/path"``: a folder with ``open_clip_config.json`` and weights (open_clip's own schema);
- ``"ViT-B-32:laion2b_s34b_b79k"``: an open_clip architecture and pretrained tag (downloaded, so it
  needs the hub or a filled cache);
- ``"ViT-B-32:/path/to/weights.safetensors"``: an architecture and a local checkpoint file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dmquant.errors import DMQuantError
from dmquant.metrics.images import as_uint8_batch

DEFAULT_REAL_CLIP = "ViT-L-14:openai"  # used for prompts outside the shapes grammar
ZOO_CLIP = "tiny-shapes-clip"


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
                f"{ZOO_CLIP!r}, 'local-dir:<folder>' or '<arch>:<local weights file>'"
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

    def fid_feature_extractor(self):
        """A clean-fid ``custom_feat_extractor``: float N,3,H,W in [0, 255] -> N x D features."""

        def extract(batch: torch.Tensor) -> torch.Tensor:
            images = batch.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            return self.image_features(images, normalize=False)

        return extract

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

    # ------------------------------------------------------------------ torchmetrics adapter
    def as_torchmetrics(self):
        """(model, processor) in the shape torchmetrics' ``clip_score`` accepts as a callable's result."""
        return _TMModel(self), _TMProcessor(self)


class _TMModel:
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


def load_clip(spec: str | ClipModel = ZOO_CLIP, device: str = "cpu") -> ClipModel:
    """A :class:`ClipModel` from a spec (see the module doc); cached per (spec, device)."""
    if isinstance(spec, ClipModel):
        return spec
    key = (spec, device)
    if key not in _CACHE:
        if spec == ZOO_CLIP:
            from dmquant import zoo

            _CACHE[key] = zoo.load(ZOO_CLIP, device=device)
        elif spec.startswith("local-dir:") and not os.path.isdir(spec[len("local-dir:"):]):
            raise DMQuantError(f"no such folder for the CLIP model: {spec[len('local-dir:'):]}")
        else:
            _CACHE[key] = ClipModel.from_open_clip(spec, device=device)
    return _CACHE[key]


def compute_clip_score(images, prompts: Sequence[str], model: str | ClipModel = ZOO_CLIP, device: str = "cpu") -> float:
    """Mean CLIP score (0..100) of images against their prompts, computed by torchmetrics."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    batch = as_uint8_batch(images)
    prompts = list(prompts)
    if len(batch) != len(prompts):
        raise DMQuantError(f"CLIP score needs one prompt per image: {len(batch)} images, {len(prompts)} prompts")
    if len(batch) == 0:
        raise DMQuantError("CLIP score of an empty image set")
    clip = load_clip(model, device)
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)
    score = tm_clip_score(tensor, prompts, model_name_or_path=clip.as_torchmetrics)
    return float(score)
