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


def fid_features(images, features: Any = "inception", batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """The N x D features FID compares (uint8 N x H x W x 3 arrays, tensors or PIL lists): the images go through
    clean-fid's own path (PNG files, its resize, its extractor), so :func:`frechet_distance` of two feature sets is
    :func:`compute_fid` of the images, and per-image features allow paired comparisons (:func:`paired_fid_difference`)."""
    from cleanfid import fid as cfid
    from cleanfid.features import build_feature_extractor

    batch = as_uint8_batch(images)
    extractor, resize, _ = _extractor(features, device)
    with tempfile.TemporaryDirectory(prefix="dmquant-fid-") as tmp:
        save_pngs(batch, Path(tmp) / "a")
        try:
            model = extractor if extractor is not None else build_feature_extractor(
                "clean", torch.device(device), use_dataparallel=False)
            return np.asarray(cfid.get_folder_features(
                str(Path(tmp) / "a"), model, num_workers=0, batch_size=batch_size, device=torch.device(device),
                mode="clean", custom_fn_resize=resize, verbose=False), dtype=np.float64)
        except OSError as e:  # clean-fid's download of the Inception weights
            raise DMQuantError(f"clean-fid could not load its feature extractor ({e}); see dmquant.metrics.fid") from e


def compute_fid(images_a, images_b, features: Any = "inception", batch_size: int = 64, device: str = "cpu") -> float:
    """FID between two image sets (uint8 N x H x W x 3 arrays, tensors or PIL lists), via clean-fid."""
    a, b = as_uint8_batch(images_a), as_uint8_batch(images_b)
    for name, s in (("first", a), ("second", b)):
        if len(s) < 2:
            raise DMQuantError(f"FID needs at least 2 images per set; the {name} set has {len(s)}")
    score = frechet_distance(fid_features(a, features, batch_size, device), fid_features(b, features, batch_size, device))
    return float(max(score, 0.0)) if np.isfinite(score) else float(score)


def paired_fid_difference(feats_a: np.ndarray, feats_b: np.ndarray, feats_ref: np.ndarray, resamples: int = 1000,
                          seed: int = 0) -> dict:
    """FID(a, ref) - FID(b, ref) for two image sets made from the same prompts and seeds (row i of ``feats_a`` and
    ``feats_b``: the same prompt and seed; row i of ``feats_ref``: that prompt's reference image), with a bootstrap
    95% interval: the image indices are resampled once per draw and used for all three sets, so what the prompts
    share cancels and only the methods' difference varies. The FIDs of a resample are biased upwards (repeated
    images shrink the covariances), alike for both sets, so the interval is one of the difference, not of
    either FID."""
    a, b, ref = (np.asarray(f, dtype=np.float64) for f in (feats_a, feats_b, feats_ref))
    if not len(a) == len(b) == len(ref) or len(a) < 2:
        raise DMQuantError(f"paired FID needs three feature sets of one length >= 2 (got {len(a)}, {len(b)}, {len(ref)})")
    draws = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    diffs = np.array([frechet_distance(a[i], ref[i]) - frechet_distance(b[i], ref[i]) for i in draws])
    return {"difference": frechet_distance(a, ref) - frechet_distance(b, ref),
            "ci95": [float(q) for q in np.percentile(diffs, [2.5, 97.5])], "images": len(a)}
