import warnings

import pytest
import torch
import torch.nn.functional as F

from dmquant.kernels import int8_attention, int8_attention_reference
from dmquant.kernels._dispatch import run_with_fallback
from dmquant.kernels.attention import K_BLOCK, quantize_blocks, smooth_k


def _qkv(b, h, n_q, n_kv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k = torch.randn(b, h, n_kv, d, generator=g)
    k[..., :3] += 15.0 * torch.randn(3, generator=g)  # outlier channels, shared by the tokens
    k[..., 5] *= 2.0  # and one with twice the spread
    v = torch.randn(b, h, n_kv, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _metrics(out, exact):
    out, exact = out.double().flatten(), exact.double().flatten()
    cos = F.cosine_similarity(out, exact, dim=0).item()
    return cos, ((out - exact).abs().sum() / exact.abs().sum()).item()


SHAPES = [  # (batch, heads, queries, keys, head_dim)
    (1, 2, 200, 200, 40),   # SD1.5-like head size, tail blocks on both sides
    (2, 1, 130, 130, 64),
    (1, 2, 150, 77, 72),    # cross-attention with few keys, PixArt head size
    (1, 1, 65, 33, 128),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernel_matches_exact_attention(shape):
    b, h, n_q, n_kv, d = shape
    q, k, v = _qkv(b, h, n_q, n_kv, d)
    exact = F.scaled_dot_product_attention(q, k, v)
    out = int8_attention(q, k, v, backend="triton")
    assert out.shape == exact.shape and out.dtype == q.dtype
    cos, rel_l1 = _metrics(out, exact)
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)
    ref = int8_attention_reference(q, k, v)
    assert (out - ref).abs().max().item() < 2e-3


def test_torch_path_matches_exact_attention_fp16():
    q, k, v = _qkv(2, 2, 300, 300, 64, dtype=torch.float16)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = int8_attention(q, k, v)  # CPU tensors: the torch path
    assert out.dtype == torch.float16
    cos, rel_l1 = _metrics(out, exact)
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)


def test_triton_fp16_inputs():
    q, k, v = _qkv(1, 2, 140, 100, 40, dtype=torch.float16)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    cos, rel_l1 = _metrics(int8_attention(q, k, v, backend="triton"), exact)
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)


def test_k_quantization_kernel_is_exact():
    from dmquant.kernels import _attention_triton

    _, k, _ = _qkv(2, 2, 8, 150, 40)
    kq, ks = _attention_triton.quantize_k(k, k.float().mean(dim=2).contiguous())
    ref_q, ref_s = quantize_blocks(smooth_k(k), K_BLOCK)
    assert kq.shape == (4, 192, 64) and ks.shape == (4, 3)
    assert torch.equal(kq[:, :150, :40], ref_q.reshape(4, 150, 40))
    assert torch.count_nonzero(kq[:, 150:]) == 0 and torch.count_nonzero(kq[..., 40:]) == 0
    assert torch.equal(ks.repeat_interleave(K_BLOCK, dim=1)[:, :150], ref_s.reshape(4, 150))


def test_smoothing_makes_channel_offsets_free():
    q, k, v = _qkv(1, 2, 130, 90, 64, seed=1)
    offset = 50.0 * torch.randn(64)
    cos, rel_l1 = _metrics(int8_attention(q, k + offset, v, backend="triton"), int8_attention(q, k, v))
    assert cos > 0.99999 and rel_l1 < 1e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_key_bias_masks_keys(backend):
    q, k, v = _qkv(2, 2, 100, 77, 64, seed=2)
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[0, 20:] = False
    keep[1, 70:] = False
    bias = torch.zeros(2, 77).masked_fill(~keep, float("-inf"))
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    cos, rel_l1 = _metrics(int8_attention(q, k, v, key_bias=bias, backend=backend), exact)
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)


def test_rejects_unsupported_head_dim():
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError):
        int8_attention(q, q, q)


def test_fallback_warns_once_and_uses_slow_path():
    calls = []

    def fast():
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_with_fallback("test-kernel", "auto", fast, lambda: 7) == 7
        assert run_with_fallback("test-kernel", "auto", fast, lambda: 8) == 8
    assert len([w for w in caught if "test-kernel" in str(w.message)]) == 1
    assert len(calls) == 1  # the failed kernel is not retried
    with pytest.raises(RuntimeError):
        run_with_fallback("test-kernel", "triton", fast, lambda: 7)


def test_k_sums_on_device_match_the_mean():
    from dmquant.kernels import _attention_triton

    _, k, _ = _qkv(1, 2, 8, 600, 40)  # three chunks of the K sums, a tail block
    kq, ks = _attention_triton.quantize_k(k, None)
    ref_q, ref_s = quantize_blocks(smooth_k(k), K_BLOCK)
    assert kq.shape == (2, 640, 64) and ks.shape == (2, 10)
    assert (kq[:, :600, :40].int() - ref_q.reshape(2, 600, 40).int()).abs().max() <= 1
    torch.testing.assert_close(ks.repeat_interleave(K_BLOCK, dim=1)[:, :600], ref_s.reshape(2, 600))
    assert torch.count_nonzero(kq[:, 600:]) == 0


# -- pv="fp8": float8 e4m3 P·V (SageAttention2's recipe) ------------------------------------------------
FP8_SHAPES = [  # (batch, heads, queries, keys, head_dim, block_n of the interpreted kernel)
    (1, 2, 130, 200, 64, 64),    # tail blocks on both sides
    (1, 2, 130, 200, 64, 128),   # two key blocks of 64 share one K scale
    (1, 1, 65, 128, 128, 128),   # whole blocks (EVEN)
    (1, 2, 100, 77, 40, 64),     # padded head dim, fewer keys than a block
]


def _qkv_offset(b, h, n_q, n_kv, d, dtype=torch.float32, seed=0):
    """Random Q, K, V with a key offset shared by the tokens (as eval/bench_gpu.py) and a V offset."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (n_q, n_kv, n_kv))
    k = k + 0.5 * torch.randn(1, h, 1, d, generator=g)
    v = v + torch.randn(1, h, 1, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_triton_kernel_matches_its_reference(shape):
    from dmquant.kernels import _attention_triton

    b, h, n_q, n_kv, d, block_n = shape
    q, k, v = _qkv_offset(b, h, n_q, n_kv, d)
    out = _attention_triton.attention(q, k, v, d ** -0.5, None, pv="fp8", block_n=block_n)
    ref = int8_attention_reference(q, k, v, pv="fp8")
    cos, rel_l1 = _metrics(out, ref)
    assert cos >= 0.99999 and rel_l1 <= 2e-3, (cos, rel_l1)  # only rare FP8 rounding ties of P differ
    cos, rel_l1 = _metrics(out, F.scaled_dot_product_attention(q, k, v))
    assert cos >= 0.999 and rel_l1 <= 0.05, (cos, rel_l1)


def test_fp8_public_entry_point_runs_the_kernel():
    q, k, v = _qkv_offset(1, 2, 70, 90, 64, dtype=torch.float16, seed=3)
    out = int8_attention(q, k, v, backend="triton", pv="fp8")
    assert out.dtype == torch.float16 and out.shape == q.shape
    cos, _ = _metrics(out, int8_attention_reference(q, k, v, pv="fp8"))
    assert cos >= 0.99999, cos


@pytest.mark.parametrize("d", [64, 128])
def test_fp8_reference_matches_exact_attention(d):
    q, k, v = _qkv_offset(1, 2, 256, 2048, d, dtype=torch.float16, seed=4)  # near-uniform rows: the hard case
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = int8_attention(q, k, v, pv="fp8")  # CPU tensors: the torch path
    assert out.dtype == torch.float16
    cos, rel_l1 = _metrics(out, exact)
    assert cos >= 0.999 and rel_l1 <= 0.05, (cos, rel_l1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp8_key_bias_masks_keys(backend):
    q, k, v = _qkv(2, 2, 100, 77, 64, seed=2)
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[0, 20:] = False
    keep[1, 70:] = False
    bias = torch.zeros(2, 77).masked_fill(~keep, float("-inf"))
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    cos, rel_l1 = _metrics(int8_attention(q, k, v, key_bias=bias, backend=backend, pv="fp8"), exact)
    assert cos >= 0.999 and rel_l1 <= 0.05, (cos, rel_l1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp8_smoothing_makes_value_offsets_free(backend):
    q, k, v = _qkv(1, 2, 130, 90, 64, seed=1)
    offset = 50.0 * torch.randn(64)
    with_offset = int8_attention(q, k, v + offset, backend=backend, pv="fp8") - offset
    cos, rel_l1 = _metrics(with_offset, int8_attention(q, k, v, backend=backend, pv="fp8"))
    assert cos > 0.9999 and rel_l1 < 1e-2, (cos, rel_l1)


def test_v_fp8_quantization_kernel_matches_reference():
    from dmquant.kernels import _attention_triton
    from dmquant.kernels.attention import quantize_v_fp8

    _, _, v = _qkv_offset(2, 1, 8, 300, 40, seed=5)  # two chunks of the V statistics, a tail block
    vq, vs, vm = _attention_triton.quantize_v_fp8(v, 384)
    codes, scale, mean = quantize_v_fp8(v)
    assert vq.shape == (2, 64, 384) and vq.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(vs[:, :40], scale.reshape(2, 40))
    torch.testing.assert_close(vm[:, :40], mean.reshape(2, 40))
    got, want = vq[:, :40, :300].float(), codes.reshape(2, 300, 40).transpose(1, 2).float()
    mismatched = got != want  # the means are summed in another order: rare neighbours on the grid
    assert mismatched.float().mean() < 1e-3
    assert ((got - want).abs()[mismatched] <= want.abs()[mismatched] / 8 + 2 ** -9).all()
    assert torch.count_nonzero(vq[:, :, 300:].float()) == 0 and torch.count_nonzero(vq[:, 40:].float()) == 0


def test_fp8_rounding_before_the_interpreters_cast_is_exact():
    """The interpreter's FP32->FP8 cast mis-rounds carries into the exponent (Triton 3.8: 127.7 -> 64);
    the kernels round to the e4m3 grid first on the CPU, after which the cast must equal torch's."""
    import triton
    import triton.language as tl

    from dmquant.kernels import _attention_triton
    from dmquant.kernels._dispatch import launcher

    globals()["_round_e4m3"] = _attention_triton._round_e4m3  # a jitted function resolves callees as globals

    @triton.jit
    def cast(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, _round_e4m3(tl.load(X + i)).to(tl.float8e4nv))  # noqa: F821

    g = torch.Generator().manual_seed(0)
    x = torch.cat([448 * torch.rand(900, generator=g), -448 * torch.rand(900, generator=g),
                   0.02 * torch.randn(200, generator=g), torch.tensor([448.0, -447.9, 127.7, 2.0 ** -10, 0.0] * 4
                                                                      + [1.0] * 28)])
    y = torch.empty(2048, dtype=torch.float8_e4m3fn)
    launcher(cast, x.device)[(1,)](x, y, N=2048)
    assert torch.equal(y.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_pv_auto_keeps_fp16_on_the_cpu():
    from dmquant.kernels.attention import resolve_pv

    q, k, v = _qkv(1, 1, 40, 50, 64, seed=6)
    assert resolve_pv("auto", q) == "fp16" and resolve_pv("fp8", q) == "fp8"
    assert torch.equal(int8_attention(q, k, v), int8_attention(q, k, v, pv="fp16"))
    assert torch.equal(int8_attention_reference(q, k, v), int8_attention_reference(q, k, v, pv="fp16"))
    with pytest.raises(ValueError):
        int8_attention(q, k, v, pv="fp4")
