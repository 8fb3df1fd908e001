"""FID through clean-fid, with Inception features (real models) or any feature extractor (the zoo).

``features`` picks the feature space:

- ``"inception"``: clean-fid's "clean" mode (Inception-V3 torchscript, PIL bicubic resize to 299);
  its weights are downloaded once by clean-fid into /tmp, so offline they must already be there;
- ``"tiny-shapes-clip"`` or any :class:`~dmquant.zoo.judge.ClipModel` / open_clip spec: the
  image tower's embeddings (unnormalised), images kept at their size (the model resizes if it must);
- a callable: clean-fid's ``custom_feat_extractor`` (float N x 3 x H x W in [0, 255] -> N x D).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dmquant.diffusers_io import hub_offline
from dmquant.errors import DMQuantError
from dmquant.metrics.clip_score import load_clip
from dmquant.metrics.images import as_uint8_batch, save_pngs
from dmquant.zoo.judge import ClipModel

INCEPTION_FILE = "/tmp/inception-2015-12-05.pt"


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (clean-fid's implementation)."""
    from cleanfid.fid import frechet_distance as _fd

    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(feats_a, rowvar=False)), np.atleast_2d(np.cov(feats_b, rowvar=False))
    return float(_fd(mu1, s1, mu2, s2))


def _extractor(features: Any, device: str) -> tuple[Callable | None, Callable | None, str]:
    """(custom_feat_extractor, custom_fn_resize, name) for clean-fid."""
    if callable(features) and not isinstance(features, ClipModel):
        return features, _keep_size, getattr(features, "__name__", "custom")
    if features == "inception":
        if not Path(INCEPTION_FILE).is_file() and hub_offline():
            raise DMQuantError(
                f"FID with Inception features needs clean-fid's weights at {INCEPTION_FILE} and the network is "
                "off; copy that file there (from a connected machine: python -c 'import cleanfid.features as f; "
                "f.feature_extractor()') or use features='tiny-shapes-clip'"
            )
        return None, None, "inception"
    clip = load_clip(features, device)
    return clip_features(clip), _keep_size, clip.name


def clip_features(clip: ClipModel) -> Callable:
    """A clean-fid ``custom_feat_extractor`` from a CLIP image tower: float N,3,H,W in [0, 255] -> N x D."""

    def extract(batch: torch.Tensor) -> torch.Tensor:
        images = batch.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return clip.image_features(images, normalize=False)

    return extract


def _keep_size(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def compute_fid(images_a, images_b, features: Any = "inception", batch_size: int = 64, device: str = "cpu") -> float:
    """FID between two image sets (uint8 N x H x W x 3 arrays, tensors or PIL lists), via clean-fid."""
    from cleanfid import fid as cfid

    a, b = as_uint8_batch(images_a), as_uint8_batch(images_b)
    for name, s in (("first", a), ("second", b)):
        if len(s) < 2:
            raise DMQuantError(f"FID needs at least 2 images per set; the {name} set has {len(s)}")
    extractor, resize, _ = _extractor(features, device)
    with tempfile.TemporaryDirectory(prefix="dmquant-fid-") as tmp:
        save_pngs(a, Path(tmp) / "a")
        save_pngs(b, Path(tmp) / "b")
        try:
            score = cfid.compute_fid(
                str(Path(tmp) / "a"), str(Path(tmp) / "b"), mode="clean", num_workers=0, batch_size=batch_size,
                device=torch.device(device), custom_feat_extractor=extractor, custom_fn_resize=resize,
                verbose=False, use_dataparallel=False,
            )
        except OSError as e:  # clean-fid's download of the Inception weights
            raise DMQuantError(f"clean-fid could not load its feature extractor ({e}); see dmquant.metrics.fid") from e
    return float(max(score, 0.0)) if np.isfinite(score) else float(score)
