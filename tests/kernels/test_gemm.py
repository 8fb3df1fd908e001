import pytest
import torch

from dmquant.kernels import int4_linear, int4_linear_reference, pack_int4, quantize_activations, quantize_int4
from dmquant.kernels.gemm import int_matmul

MODES = [(8, None), (8, 64), (4, 64), (4, None)]  # (act_bits, act_group)


def _problem(m=40, n=48, k=192, r=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 20.0  # an outlier input channel
    w = torch.randn(n, k, generator=g) / k ** 0.5
    packed, scales = quantize_int4(w)
    extras = dict(smooth=torch.rand(k, generator=g) + 0.5, lora_down=torch.randn(r, k, generator=g) / k ** 0.5,
                  lora_up=torch.randn(n, r, generator=g) / r ** 0.5, bias=torch.randn(n, generator=g))
    return x.to(dtype), packed, scales, {name: t.to(dtype) for name, t in extras.items()}


@pytest.mark.parametrize("act_bits,act_group", MODES)
def test_prologue_quantization_is_exact(act_bits, act_group):
    from dmquant.kernels import _gemm_triton

    x, _, _, extras = _problem()
    inv = (1.0 / extras["smooth"]).contiguous()
    xq, xs, lr = _gemm_triton.quantize_activations(x, 2 ** (act_bits - 1) - 1, act_group is not None, inv,
                                                    extras["lora_down"])
    ref_q, ref_s = quantize_activations(x, act_bits, act_group, inv)
    assert torch.equal(xq, ref_q) and torch.equal(xs, ref_s)
    assert ref_q.abs().max().item() == 2 ** (act_bits - 1) - 1
    torch.testing.assert_close(lr, (x * inv) @ extras["lora_down"].t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_bits,act_group", [(8, None), (4, 64)])
def test_integer_part_is_exact(act_bits, act_group):
    g = torch.Generator().manual_seed(3)
    qmax = 2 ** (act_bits - 1) - 1
    m, n, k = 37, 40, 256
    x = torch.randint(-qmax, qmax + 1, (m, k), generator=g)
    x[:, ::64] = qmax  # every row (and group) reaches qmax: activation scale exactly 1
    q = torch.randint(-8, 8, (n, k), generator=g)
    out = int4_linear(x.float(), pack_int4(q), torch.ones(n, k // 64), act_bits=act_bits, act_group=act_group,
                      backend="triton")
    exact = (x.double() @ q.double().t()).float()
    assert torch.equal(out, exact)


@pytest.mark.parametrize("act_bits,act_group", MODES)
def test_triton_matches_reference(act_bits, act_group):
    x, packed, scales, extras = _problem()
    kw = dict(act_bits=act_bits, act_group=act_group, **extras)
    ref = int4_linear_reference(x, packed, scales, **kw)
    out = int4_linear(x, packed, scales, backend="triton", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    cpu = int4_linear(x, packed, scales, **kw)  # CPU tensors: torch path (torch._int_mm)
    torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-4)


def test_fp16_and_batched_input_without_extras():
    x, packed, scales, _ = _problem(m=20, n=32, k=128, dtype=torch.float16)
    x3 = x.reshape(4, 5, 128)
    out = int4_linear(x3, packed, scales, backend="triton")
    ref = int4_linear_reference(x3, packed, scales)
    assert out.shape == (4, 5, 32) and out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_quantization_error_is_small_and_groups_contain_the_outlier():
    from dmquant.kernels import dequantize_int4

    x, packed, scales, _ = _problem(m=64, n=64, k=256)
    full = x @ dequantize_int4(packed, scales).t()

    def error(bits, group):
        out = int4_linear(x, packed, scales, act_bits=bits, act_group=group)
        return ((out - full).norm() / full.norm()).item()

    assert error(8, 64) < 0.6 * error(8, None) and error(8, None) < 0.05
    assert error(4, 64) < 0.2


def test_int_matmul_paths_agree():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (33, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-8, 8, (24, 64), generator=g, dtype=torch.int8)
    exact = (a.long() @ b.long().t()).int()
    assert torch.equal(int_matmul(a, b), exact)
    assert torch.equal(int_matmul(a[:16], b), exact[:16])  # M <= 16: no torch._int_mm


def test_bad_arguments():
    x, packed, scales, extras = _problem()
    with pytest.raises(ValueError):
        int4_linear(x, packed, scales, act_bits=6)
    with pytest.raises(ValueError):
        int4_linear(x, packed, scales, act_group=32)
    with pytest.raises(ValueError):
        int4_linear(x, packed, scales, lora_down=extras["lora_down"])


def test_two_groups_per_iteration_and_config_pruning():
    from dmquant.kernels import _gemm_triton

    x, packed, scales, _ = _problem(m=24, n=40, k=256)
    xq, xs, _ = _gemm_triton.quantize_activations(x, 7, True, None, None)
    one = _gemm_triton.w4_gemm(xq, xs, packed, scales, None, None, None, torch.float32)
    two = _gemm_triton.w4_gemm(xq, xs, packed, scales, None, None, None, torch.float32, groups_per_iter=2)
    assert torch.equal(one, two)
    kept = _gemm_triton._prune(_gemm_triton._gemm_configs(), {"K": 320})
    assert kept and all(c.kwargs["GROUPS_PER_ITER"] == 1 for c in kept)


def test_column_major_scales_give_the_same_result():
    x, packed, scales, extras = _problem(m=20, n=40, k=128)
    col_major = scales.t().contiguous().t()
    assert col_major.stride(0) == 1
    out = int4_linear(x, packed, col_major, act_bits=4, act_group=64, backend="triton")
    assert torch.equal(out, int4_linear(x, packed, scales, act_bits=4, act_group=64, backend="triton"))


@pytest.mark.parametrize("act_bits,act_group", MODES)
def test_tiled_prologue_matches_the_looped_one(act_bits, act_group):
    from dmquant.kernels import _gemm_triton

    x, _, _, extras = _problem(m=37, k=320)
    inv = (1.0 / extras["smooth"]).contiguous()
    qmax = 2 ** (act_bits - 1) - 1
    tiled = _gemm_triton.quantize_activations(x, qmax, act_group is not None, inv, None, tiled=True)
    looped = _gemm_triton.quantize_activations(x, qmax, act_group is not None, inv, None, tiled=False)
    assert torch.equal(tiled[0], looped[0]) and torch.equal(tiled[1], looped[1])


def test_swapped_tile_gives_the_same_result():
    from dmquant.kernels import _gemm_triton

    x, packed, scales, _ = _problem(m=24, n=40, k=256)
    for per_group in (True, False):
        xq, xs, _ = _gemm_triton.quantize_activations(x, 7, per_group, None, None)
        plain = _gemm_triton.w4_gemm(xq, xs, packed, scales, None, None, None, torch.float32)
        swapped = _gemm_triton.w4_gemm(xq, xs, packed, scales, None, None, None, torch.float32, swap=True)
        assert torch.equal(plain, swapped)
