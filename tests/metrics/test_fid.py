import numpy as np
import pytest
import torch

import dmquant.metrics.fid as fid_mod
from dmquant.errors import DMQuantError
from dmquant.metrics.fid import compute_fid, fid_features, frechet_distance, paired_fid_difference
from dmquant.metrics.images import save_pngs
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


def test_fid_from_per_image_features_is_clean_fids_folder_fid(tmp_path):
    from cleanfid import fid as cfid

    a, _ = data.make_dataset(24, seed=36)
    b, _ = data.make_dataset(24, seed=37)

    def mean_and_spread(batch):  # float N x 3 x H x W in [0, 255] -> N x 6
        return torch.cat([batch.mean(dim=(2, 3)), batch.std(dim=(2, 3))], 1)

    save_pngs(a, tmp_path / "a")
    save_pngs(b, tmp_path / "b")
    theirs = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", num_workers=0,
                              device=torch.device("cpu"), custom_feat_extractor=mean_and_spread,
                              custom_fn_resize=fid_mod._keep_size, verbose=False, use_dataparallel=False)
    feats = fid_features(a, mean_and_spread)
    assert feats.shape == (24, 6)
    assert frechet_distance(feats, fid_features(b, mean_and_spread)) == pytest.approx(theirs, rel=1e-6)
    assert compute_fid(a, b, mean_and_spread) == pytest.approx(theirs, rel=1e-6)


def test_paired_fid_difference_ranks_the_closer_set_and_is_antisymmetric():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 4))
    near = ref + 0.1 * rng.normal(size=ref.shape) + 0.05  # a small shift of the mean
    far = ref + 0.1 * rng.normal(size=ref.shape) + 0.5
    d = paired_fid_difference(near, far, ref, resamples=300)
    assert d["difference"] == pytest.approx(frechet_distance(near, ref) - frechet_distance(far, ref))
    assert d["difference"] < -0.9 and d["ci95"][1] < -0.8  # FD of a shift of 0.5 in 4 dims: 1.0; of 0.05: 0.01
    back = paired_fid_difference(far, near, ref, resamples=300)
    assert back["difference"] == pytest.approx(-d["difference"])
    assert back["ci95"] == pytest.approx([-d["ci95"][1], -d["ci95"][0]])
    same = paired_fid_difference(near, near.copy(), ref, resamples=50)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(DMQuantError, match="one length"):
        paired_fid_difference(near[:10], far, ref)
