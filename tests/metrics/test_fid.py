import numpy as np
import pytest

import dmquant.metrics.fid as fid_mod
from dmquant.errors import DMQuantError
from dmquant.metrics.fid import compute_fid, frechet_distance
from dmquant.zoo import data


def test_frechet_distance_closed_form_for_a_shift():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    shift = np.arange(8) / 4.0
    # same covariance, means apart by `shift`: FD = |shift|^2 exactly
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-6)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_fid_with_the_judge_features():
    real, _ = data.make_dataset(128, seed=31, two_object_prob=0.0)
    other, _ = data.make_dataset(128, seed=32, two_object_prob=0.0)
    assert compute_fid(real, real, "tiny-shapes-clip") == pytest.approx(0.0, abs=1e-3)
    same_distribution = compute_fid(real, other, "tiny-shapes-clip")
    circles = np.stack([data.render(data.Scene((data.ShapeObject("circle", "red", "large", "center"),), "black"), i)
                        for i in range(128)])  # one scene only: far from the data distribution
    assert 0.0 < 3 * same_distribution < compute_fid(real, circles, "tiny-shapes-clip")


def test_fid_with_a_custom_callable_extractor():
    real, _ = data.make_dataset(16, seed=33)

    def mean_color(batch):  # float N x 3 x H x W in [0, 255]
        return batch.mean(dim=(2, 3))

    value = compute_fid(real, real.copy(), mean_color)
    assert value == pytest.approx(0.0, abs=1e-6)


def test_fid_needs_two_images_per_set():
    real, _ = data.make_dataset(4, seed=34)
    with pytest.raises(DMQuantError, match="at least 2"):
        compute_fid(real[:1], real, "tiny-shapes-clip")


def test_inception_offline_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fid_mod, "INCEPTION_FILE", str(tmp_path / "missing.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real, _ = data.make_dataset(4, seed=35)
    with pytest.raises(DMQuantError, match="Inception"):
        compute_fid(real, real, "inception")
