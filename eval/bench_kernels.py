"""Correctness and speed of dmquant's Triton kernels on a GPU, in one command.

    python eval/bench_kernels.py            # on a CUDA machine (about 3 minutes, autotuning included)
    python eval/bench_kernels.py --dry-run  # tiny shapes on the CPU through Triton's interpreter, no timing
    python eval/bench_kernels.py --sweep    # headline shapes: each kernel configuration timed on its own

Attention: ``int8_attention`` against ``F.scaled_dot_product_attention`` (torch's default backend) at
SD1.5 / SDXL / PixArt shapes, accuracy against exact FP32 attention. GEMM: ``int4_linear`` (W4A8 per
token, W4A4 per group of 64, W4A4 + rank-32 low-rank branch + bias) against BF16 ``F.linear``
(cuBLAS), accuracy against ``int4_linear_reference``. Times are medians of ``triton.testing``
benchmarks (CUDA events, warm-up included), eager and replayed from a CUDA graph (no launch overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dmquant.kernels import int4_linear, int4_linear_reference, int8_attention, quantize_int4  # noqa: E402

# name, batch, heads, queries, keys, head_dim, key padding mask
ATTENTION = [
    ("SD1.5 self 64x64 d40", 2, 8, 4096, 4096, 40, False),
    ("SD1.5 self 64x64 d64", 2, 8, 4096, 4096, 64, False),
    ("SD1.5 cross 77 d40", 2, 8, 4096, 77, 40, False),
    ("SDXL self 64x64 d64", 2, 10, 4096, 4096, 64, False),
    ("SDXL self 32x32 d64", 2, 20, 1024, 1024, 64, False),
    ("PixArt self 1024px d72", 2, 16, 4096, 4096, 72, False),
    ("PixArt cross 120 masked", 2, 16, 4096, 120, 72, True),
]
# name, M, N, K
GEMM = [
    ("UNet 1280x1280 (M=4096)", 4096, 1280, 1280),
    ("SD1.5 GEGLU 320->2560", 8192, 2560, 320),
    ("PixArt qkv 1152", 8192, 1152, 1152),
    ("PixArt FF down 4608->1152", 8192, 1152, 4608),
]
DRY_ATTENTION = [("dry self", 1, 2, 200, 200, 40, False), ("dry cross masked", 1, 2, 130, 77, 72, True)]
DRY_GEMM = [("dry", 40, 48, 192)]
RANK = 32


def cos_rel_l1(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    out, exact = out.double().flatten(), exact.double().flatten()
    return F.cosine_similarity(out, exact, dim=0).item(), ((out - exact).abs().sum() / exact.abs().sum()).item()


def bench(fn) -> tuple[float, float]:
    """(eager median ms, CUDA-graph median ms) of ``fn``."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    eager = do_bench(fn, warmup=10, rep=40, return_mode="median")
    try:
        graph = do_bench_cudagraph(fn, rep=30, return_mode="median")
    except Exception as err:  # capture can fail (e.g. a sync inside); keep the eager figure
        print(f"    (cuda graph timing failed: {type(err).__name__}: {err})")
        graph = float("nan")
    return eager, graph


def attention_inputs(b, h, n_q, n_kv, d, masked, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)

    def heads(n, offset=0.0):  # (B, N, H*D) projections viewed as (B, H, N, D), as diffusers does
        t = torch.randn(b, n, h * d, device=device, generator=gen) + offset
        return t.to(dtype).view(b, n, h, d).transpose(1, 2)

    channel_bias = 4.0 * torch.randn(h * d, device=device, generator=gen)
    q, k, v = heads(n_q), heads(n_kv, channel_bias), heads(n_kv)
    bias = None
    if masked:
        bias = torch.zeros(b, n_kv, device=device)
        bias[:, n_kv // 3:] = float("-inf")
        bias[0, :] = 0.0
    return q, k, v, bias


def run_attention(row, device, dtype, timing):
    name, b, h, n_q, n_kv, d, masked = row
    q, k, v, bias = attention_inputs(b, h, n_q, n_kv, d, masked, device, dtype)
    mask = None if bias is None else bias[:, None, None, :]
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    out = int8_attention(q, k, v, key_bias=bias, backend="triton")
    result = {"name": name}
    result["cos"], result["l1"] = cos_rel_l1(out, exact)
    if timing:
        result["int8"] = bench(lambda: int8_attention(q, k, v, key_bias=bias, backend="triton"))
        if row in ATTENTION[:2]:  # the first version of the kernel, side by side
            from dmquant.kernels import _attention_triton as A

            first = A._tuned(A.BASELINE_CONFIGS)
            result["first"] = bench(lambda: A.attention(q, k, v, d ** -0.5, bias, kernel=first, fused_mean=False,
                                                        even=False))
        mask16 = None if mask is None else mask.to(dtype)
        result["sdpa"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask16))
    return result


def gemm_variants(x, packed, scales, extras):
    return {
        "w4a8": lambda: int4_linear(x, packed, scales, act_bits=8, backend="triton"),
        "w4a4": lambda: int4_linear(x, packed, scales, act_bits=4, act_group=64, backend="triton"),
        "w4a4+lr": lambda: int4_linear(x, packed, scales, act_bits=4, act_group=64, backend="triton", **extras),
    }


def run_gemm(row, device, dtype, timing):
    name, m, n, k = row
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    w = torch.randn(n, k, device=device, generator=gen) / k ** 0.5
    packed, scales = quantize_int4(w)
    scales = scales.t().contiguous().t()  # column-major: how a deployed layer keeps them for the kernel
    extras = dict(lora_down=(torch.randn(RANK, k, device=device, generator=gen) / k ** 0.5).to(dtype),
                  lora_up=(0.1 * torch.randn(n, RANK, device=device, generator=gen) / RANK ** 0.5).to(dtype),
                  bias=torch.randn(n, device=device, generator=gen).to(dtype))
    settings = {"w4a8": dict(act_bits=8), "w4a4": dict(act_bits=4, act_group=64),
                "w4a4+lr": dict(act_bits=4, act_group=64, **extras)}
    result = {"name": name}
    for variant, fn in gemm_variants(x, packed, scales, extras).items():
        ref = int4_linear_reference(x.double(), packed, scales, **settings[variant])
        result[f"err_{variant}"] = ((fn().double() - ref).norm() / ref.norm()).item()
        if timing:
            result[variant] = bench(fn)
    if timing:
        w16 = w.to(dtype)
        result["bf16"] = bench(lambda: F.linear(x, w16))
        if row in GEMM[:1]:  # the first version of the kernels (prologue and main), side by side
            from dmquant.kernels import _gemm_triton as G

            first = G._tuned(G.BASELINE_CONFIGS)
            for variant, qmax, per_group in (("w4a8", 127, False), ("w4a4", 7, True)):
                def fn(qmax=qmax, per_group=per_group):
                    xq, xs, _ = G.quantize_activations(x, qmax, per_group, None, None, tiled=False)
                    return G.w4_gemm(xq, xs, packed, scales, None, None, None, dtype, kernel=first)
                result[f"first_{variant}"] = bench(fn)
    return result


def breakdown(device, dtype, gemm_dtype):
    """Where the time of the two headline shapes goes: prologues vs main kernels (CUDA-graph ms)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dmquant.kernels import _attention_triton, _gemm_triton

    for d in (40, 64):
        q, k, v, _ = attention_inputs(2, 8, 4096, 4096, d, False, device, dtype)
        times = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    times.append(f"{backend.name} {bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))[1]:.4f}")
            except Exception as err:
                times.append(f"{backend.name} n/a ({type(err).__name__})")
        print(f"  SDPA backends, SD1.5 d{d} (ms): " + ", ".join(times))
    mean = k.mean(dim=2, dtype=torch.float32).contiguous()
    print(f"  attention d64: K mean {bench(lambda: k.mean(dim=2, dtype=torch.float32))[1]:.4f} ms, "
          f"K quant {bench(lambda: _attention_triton.quantize_k(k, mean))[1]:.4f} ms")
    x = torch.randn(4096, 1280, device=device).to(gemm_dtype)
    packed, scales = quantize_int4(torch.randn(1280, 1280, device=device))
    scales = scales.t().contiguous().t()
    xq, xs, _ = _gemm_triton.quantize_activations(x, 7, True, None, None)
    print(f"  gemm 4096x1280x1280 w4a4: prologue "
          f"{bench(lambda: _gemm_triton.quantize_activations(x, 7, True, None, None))[1]:.4f} ms, main "
          f"{bench(lambda: _gemm_triton.w4_gemm(xq, xs, packed, scales, None, None, None, gemm_dtype))[1]:.4f} ms")
    for kernel in (_attention_triton._attn_tuned, _gemm_triton._gemm_tuned):
        for key, config in getattr(kernel, "cache", {}).items():
            print(f"  autotuned {kernel.fn.__name__} {key[:3]} -> {config}")


ATTN_SWEEP = [  # (BLOCK_M, num_warps, num_stages)
    (128, 8, 2), (128, 8, 3), (128, 8, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (256, 8, 2),
]
GEMM_SWEEP = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, GROUPS_PER_ITER, SWAP)
    (128, 128, 8, 3, 1, 0), (128, 128, 8, 4, 1, 0), (128, 128, 8, 3, 2, 0), (128, 256, 8, 3, 1, 0),
    (256, 128, 8, 3, 1, 0), (128, 64, 4, 4, 1, 0),
    (128, 128, 8, 3, 1, 1), (128, 128, 8, 4, 1, 1), (128, 128, 8, 3, 2, 1), (128, 256, 8, 3, 1, 1),
    (256, 128, 8, 3, 1, 1), (128, 128, 4, 3, 1, 1), (128, 64, 4, 4, 1, 1), (64, 128, 4, 4, 1, 1),
]


def sweep(device, dtype, gemm_dtype) -> None:
    """Each configuration of the two kernels timed on its own at the acceptance shapes (CUDA-graph ms)."""
    from dmquant.kernels import _attention_triton as A
    from dmquant.kernels import _gemm_triton as G

    def timed(label, fn, ref=None):
        try:
            out = fn()
            err = "" if ref is None else f"  maxdiff vs first version {(out.float() - ref.float()).abs().max().item():.2e}"
            print(f"  {label:48s} {bench(fn)[1]:.4f} ms{err}", flush=True)
        except Exception as exc:
            print(f"  {label:48s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)

    def attention_sweep(d):
        q, k, v, _ = attention_inputs(2, 8, 4096, 4096, d, False, device, dtype)
        scale = d ** -0.5
        print(f"attention SD1.5 self 2x8x4096 d{d}")
        timed("sdpa (default backend)", lambda: F.scaled_dot_product_attention(q, k, v))
        base_kernel = A._tuned(A.BASELINE_CONFIGS)
        ref = A.attention(q, k, v, scale, None, kernel=base_kernel, fused_mean=False, even=False)
        timed("first version (autotuned, torch mean, masks)",
              lambda: A.attention(q, k, v, scale, None, kernel=base_kernel, fused_mean=False, even=False))
        timed("first version + fused K mean",
              lambda: A.attention(q, k, v, scale, None, kernel=base_kernel, fused_mean=True, even=False))
        mean = k.mean(dim=2, dtype=torch.float32).contiguous()
        timed("K mean (torch) + K quant", lambda: A.quantize_k(k, mean))
        timed("K sums + K quant (fused mean)", lambda: A.quantize_k(k, None))
        for cfg in ATTN_SWEEP:
            kern = A._tuned([cfg])
            timed(f"BM{cfg[0]} w{cfg[1]} s{cfg[2]} (EVEN, fused mean)",
                  lambda kern=kern: A.attention(q, k, v, scale, None, kernel=kern), ref)

    attention_sweep(40)
    m, n, kk = 4096, 1280, 1280
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, kk, device=device, generator=gen).to(gemm_dtype)
    w = torch.randn(n, kk, device=device, generator=gen) / kk ** 0.5
    packed, scales = quantize_int4(w)
    scales = scales.t().contiguous().t()
    print(f"GEMM {m}x{n}x{kk}")
    w16 = w.to(gemm_dtype)
    timed("bf16 F.linear", lambda: F.linear(x, w16))
    def gemm_sweep(label, qmax, per_group):
        timed(f"{label} prologue, first version", lambda: G.quantize_activations(x, qmax, per_group, None, None, tiled=False))
        timed(f"{label} prologue, tiled", lambda: G.quantize_activations(x, qmax, per_group, None, None, tiled=True))
        xq, xs, _ = G.quantize_activations(x, qmax, per_group, None, None)
        old_q, old_s, _ = G.quantize_activations(x, qmax, per_group, None, None, tiled=False)
        print(f"  tiled prologue == first version: {torch.equal(xq, old_q) and torch.equal(xs, old_s)}")
        base_kernel = G._tuned(G.BASELINE_CONFIGS)
        ref = G.w4_gemm(xq, xs, packed, scales, None, None, None, gemm_dtype, kernel=base_kernel)
        timed(f"{label} main, first version (autotuned)",
              lambda: G.w4_gemm(xq, xs, packed, scales, None, None, None, gemm_dtype, kernel=base_kernel))
        for cfg in GEMM_SWEEP:
            kern = G._tuned([cfg])
            timed(f"{label} main BM{cfg[0]} BN{cfg[1]} w{cfg[2]} s{cfg[3]} gpi{cfg[4]} swap{cfg[5]}",
                  lambda kern=kern: G.w4_gemm(xq, xs, packed, scales, None, None, None, gemm_dtype, kernel=kern), ref)

    for label, qmax, per_group in (("w4a4 g64", 7, True), ("w4a8 per token", 127, False)):
        gemm_sweep(label, qmax, per_group)
    attention_sweep(64)


def speedup(base, new, i):
    return base[i] / new[i]


def print_tables(attn_rows, gemm_rows):
    print("\n=== attention: int8_attention vs F.scaled_dot_product_attention (fp16; ms = CUDA-graph median) ===")
    print(f"{'shape':28s} {'sdpa ms':>8s} {'int8 ms':>8s} {'x graph':>8s} {'x eager':>8s} {'cos':>8s} {'relL1':>7s}")
    for r in attn_rows:
        t, s = r["int8"], r["sdpa"]
        print(f"{r['name']:28s} {s[1]:8.4f} {t[1]:8.4f} {speedup(s, t, 1):8.2f} {speedup(s, t, 0):8.2f} "
              f"{r['cos']:8.5f} {r['l1']:7.4f}")
    for r in attn_rows:
        if "first" in r:
            print(f"  {r['name']}: first version {r['first'][1]:.4f} ms -> {r['int8'][1]:.4f} ms "
                  f"({speedup(r['first'], r['int8'], 1):.2f}x); vs sdpa {speedup(r['sdpa'], r['first'], 1):.2f}x -> "
                  f"{speedup(r['sdpa'], r['int8'], 1):.2f}x")
    print("\n=== GEMM: int4_linear vs BF16 F.linear (cuBLAS) (ms = CUDA-graph median; x = speed-up) ===")
    print(f"{'shape':27s} {'bf16 ms':>8s} {'w4a8 ms':>8s} {'x':>5s} {'w4a4 ms':>8s} {'x':>5s} "
          f"{'+lr32 ms':>8s} {'x':>5s} {'x eager a4':>10s} {'max err':>8s}")
    for r in gemm_rows:
        b = r["bf16"]
        err = max(r[f"err_{v}"] for v in ("w4a8", "w4a4", "w4a4+lr"))
        print(f"{r['name']:27s} {b[1]:8.4f} {r['w4a8'][1]:8.4f} {speedup(b, r['w4a8'], 1):5.2f} "
              f"{r['w4a4'][1]:8.4f} {speedup(b, r['w4a4'], 1):5.2f} {r['w4a4+lr'][1]:8.4f} "
              f"{speedup(b, r['w4a4+lr'], 1):5.2f} {speedup(b, r['w4a4'], 0):10.2f} {err:8.1e}")
    for r in gemm_rows:
        for v in ("w4a8", "w4a4"):
            if f"first_{v}" in r:
                print(f"  {r['name']} {v}: first version {r['first_' + v][1]:.4f} ms -> {r[v][1]:.4f} ms "
                      f"({speedup(r['first_' + v], r[v], 1):.2f}x); vs bf16 {speedup(r['bf16'], r['first_' + v], 1):.2f}x"
                      f" -> {speedup(r['bf16'], r[v], 1):.2f}x")


def run_all(rows, runner, device, dtype, timing):
    done = []
    for row in rows:
        try:
            result = runner(row, device, dtype, timing)
        except Exception:
            print(f"  {row[0]}: FAILED\n{traceback.format_exc()}", flush=True)
            continue
        print(f"  {result}", flush=True)
        done.append(result)
    return done


def check_accuracy(attn_rows, gemm_rows) -> bool:
    ok = all(r["cos"] >= 0.999 and r["l1"] <= 0.02 for r in attn_rows)
    return ok and all(r[f"err_{v}"] < 1e-2 for r in gemm_rows for v in ("w4a8", "w4a4", "w4a4+lr"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter), no timing")
    parser.add_argument("--sweep", action="store_true", help="time each kernel configuration at the headline shapes")
    args = parser.parse_args()
    if args.sweep:
        import triton

        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
        sweep(torch.device("cuda"), torch.float16, torch.bfloat16)
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype, timing = torch.device("cpu"), torch.float16, False
        attn_shapes, gemm_shapes = DRY_ATTENTION, DRY_GEMM
    else:
        device, dtype, timing = torch.device("cuda"), torch.float16, True
        attn_shapes, gemm_shapes = ATTENTION, GEMM
        import triton

        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    gemm_dtype = torch.bfloat16 if timing else torch.float32
    print("headline shapes first:", flush=True)  # the acceptance shapes, in case time runs out
    attn_rows = run_all(attn_shapes[:2], run_attention, device, dtype, timing)
    gemm_rows = run_all(gemm_shapes[:1], run_gemm, device, gemm_dtype, timing)
    print("other shapes:", flush=True)
    attn_rows += run_all(attn_shapes[2:], run_attention, device, dtype, timing)
    gemm_rows += run_all(gemm_shapes[1:], run_gemm, device, gemm_dtype, timing)
    if timing:
        print("breakdown:")
        try:
            breakdown(device, dtype, gemm_dtype)
        except Exception:
            print(traceback.format_exc())
        print_tables(attn_rows, gemm_rows)
    ok = check_accuracy(attn_rows, gemm_rows) and len(attn_rows) == len(attn_shapes) and len(gemm_rows) == len(
        gemm_shapes)
    print(f"\naccuracy checks: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
