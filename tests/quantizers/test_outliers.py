import pytest
import torch

from dmquant.errors import DMQuantError
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.outliers import hadamard, hadamard_factors, rotate, smoothing_factors, svd_split
from dmquant.quantizers.weight import WeightQuantizer


def test_smoothing_leaves_the_output_unchanged_and_balances_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 3] *= 50  # an outlier channel
    w = torch.randn(16, 32, generator=g)
    s = smoothing_factors(x.abs().amax(0), w, alpha=0.5)
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    before = x.abs().amax(0).max() / x.abs().amax(0).median()
    after = (x / s).abs().amax(0).max() / (x / s).abs().amax(0).median()
    assert after < before / 4


def test_hadamard_is_orthogonal_and_rotation_preserves_the_output():
    for n in (8, 40, 320):
        h = hadamard(n, seed=1)
        assert torch.allclose(h @ h.t(), torch.eye(n), atol=1e-5)
    x, w = torch.randn(10, 320), torch.randn(7, 320)
    h = hadamard(320)
    assert torch.allclose((x @ h) @ (w @ h).t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    with pytest.raises(DMQuantError, match="even dimension"):
        hadamard(15)


@pytest.mark.parametrize("n", [2, 8, 40, 320, 1152, 2048])
@pytest.mark.parametrize("seed", [None, 3])
def test_factored_rotation_matches_the_dense_hadamard_product(n, seed):
    x = torch.randn(2, 5, n, dtype=torch.float64)
    dense = x @ hadamard(n, seed).double()
    factored = rotate(x, tuple(t if t is None else t.double() for t in hadamard_factors(n, seed)))
    assert factored.shape == x.shape
    assert (factored - dense).abs().max().item() < 1e-6  # the float32 factors rounded, nothing else
    signs, a, c = hadamard_factors(n, seed)
    assert a.shape[0] * c.shape[0] == n & -n and a.shape[0] <= c.shape[0] <= 2 * a.shape[0]
    half = rotate(x.half(), tuple(t if t is None else t.half() for t in (signs, a, c)))
    assert half.dtype == torch.float16 and sqnr_db(dense.float(), half.float()) > 55
    sliced = rotate(x, tuple(t if t is None else t.double() for t in (signs, a, c)), chunk=2 * n)  # 2 rows a slice
    assert torch.equal(sliced, factored)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(256, 64)
    x[:, 5] *= 40
    rotated = x @ hadamard(64)
    assert rotated.abs().max() < x.abs().max() / 3


def test_svd_split_is_exact_without_quantization_and_reduces_4bit_error():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g) * 3  # strong low-rank part
    w = low + 0.1 * torch.randn(64, 128, generator=g)
    l1, l2, r = svd_split(w, 8)
    assert l1.shape == (64, 8) and l2.shape == (8, 128)
    assert torch.allclose(l1 @ l2 + r, w, atol=1e-5)
    q = WeightQuantizer(4, granularity="group", group_size=64)
    q.calibrate(w)
    plain = sqnr_db(w, q(w))
    q.calibrate(r)
    with_branch = sqnr_db(w, l1 @ l2 + q(r))
    assert with_branch > plain + 10.0


def test_rank_larger_than_the_layer_is_an_error():
    with pytest.raises(DMQuantError, match="rank=65 is larger than this layer allows"):
        svd_split(torch.randn(64, 128), 65)


def test_smoothing_factors_of_a_conv_weight_and_their_bounds():
    w = torch.randn(8, 4, 3, 3)
    s = smoothing_factors(torch.tensor([1.0, 4.0, 9.0, 16.0]), w, alpha=1.0)
    assert torch.allclose(s, torch.tensor([1.0, 4.0, 9.0, 16.0]))  # alpha = 1: the activations' maxima alone
    with pytest.raises(DMQuantError, match="one activation maximum per input channel \\(4\\)"):
        smoothing_factors(torch.ones(8), w)
    with pytest.raises(DMQuantError, match="alpha=1.5 must lie in"):
        smoothing_factors(torch.ones(4), w, alpha=1.5)
    l1, l2, r = svd_split(w, 3)  # a conv weight: its matrix view [out, in * kh * kw]
    assert l2.shape == (3, 36) and r.shape == w.shape
    assert torch.allclose((l1 @ l2).reshape(w.shape) + r, w, atol=1e-5)
