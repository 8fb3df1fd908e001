import math

import numpy as np
import pytest

from dmquant.errors import DMQuantError
from dmquant.metrics.fidelity import (
    fidelity_metrics,
    identical_psnr,
    lpips,
    lpips_available,
    psnr,
    psnr_per_image,
    ssim,
)


def _images(seed=0, n=4, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_psnr_of_identical_images_is_inf_and_ssim_is_one():
    a = _images()
    assert psnr(a, a.copy()) == math.inf
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-5)


def test_an_identical_image_among_differing_ones_counts_at_a_one_level_error():
    a = _images()
    b = a.copy()
    b[1:] ^= 1  # every value of images 1..3 one level off (MSE (1/255)^2): 48.13 dB each; image 0 identical
    one_level = 10 * math.log10(255.0 ** 2)
    assert psnr_per_image(a, b)[0] == math.inf
    assert identical_psnr(32 * 32 * 3) == pytest.approx(one_level + 10 * math.log10(3072))  # 83.0 dB
    assert psnr(a, b) == pytest.approx((identical_psnr(3072) + 3 * one_level) / 4)
    assert psnr(a, a.copy()) == math.inf  # every pair identical: still inf


def test_psnr_of_known_noise_matches_closed_form():
    a = np.full((3, 32, 32, 3), 128, dtype=np.uint8)
    sign = np.where(np.random.default_rng(1).random(a.shape) < 0.5, -1, 1)
    b = (a.astype(int) + 8 * sign).astype(np.uint8)  # every pixel off by exactly 8/255
    assert psnr(b, a) == pytest.approx(20 * math.log10(255 / 8), abs=1e-5)
    # per-image mean: images with different MSE average their PSNRs, not their MSEs
    c = b.copy()
    c[1] = (a[1].astype(int) + 4 * sign[1]).astype(np.uint8)
    expected = (2 * 20 * math.log10(255 / 8) + 20 * math.log10(255 / 4)) / 3
    assert psnr(c, a) == pytest.approx(expected, abs=1e-5)


def test_ssim_drops_with_noise():
    a = _images(2)
    noisy = np.clip(a.astype(int) + np.random.default_rng(3).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert 0.0 < ssim(noisy, a) < 0.99


def test_mismatched_sizes_raise():
    with pytest.raises(DMQuantError, match="shapes"):
        psnr(_images(size=32), _images(size=16))
    with pytest.raises(DMQuantError, match="mismatched sizes"):
        psnr([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)], _images(n=2))


def test_lpips_reports_none_without_weights():
    a = _images(n=2)
    value = lpips(a, a)
    assert (value is None) == (not lpips_available())
    assert set(fidelity_metrics(a, a)) == {"psnr_vs_reference", "ssim_vs_reference", "lpips_vs_reference"}


def test_per_image_psnr_and_the_paired_difference_of_two_sets():
    import numpy as np

    from dmquant.metrics.fidelity import paired_difference, psnr, psnr_per_image

    ref = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    images = ref.copy()
    images[1] += 255  # every pixel off by the full range: MSE 1, 0 dB
    images[2, 0, 0, 0] = 255  # one pixel of 48: MSE 1/48
    per_image = psnr_per_image(images, ref)
    assert per_image[0] == np.inf and per_image[1] == 0.0 and abs(per_image[2] - 10 * np.log10(48)) < 1e-5
    assert psnr(images[1:], ref[1:]) == float(per_image[1:].mean())
    d = paired_difference([3.0, 5.0, np.inf, 4.0], [1.0, 1.0, 2.0, 2.0])  # the identical image left out
    assert d["images"] == 3 and d["mean"] == 8.0 / 3 and 2.0 <= d["ci95"][0] <= d["ci95"][1] <= 4.0
