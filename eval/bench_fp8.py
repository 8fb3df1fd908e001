"""Speed of the float8 W8A8 linear (``dmquant.kernels.fp8.fp8_linear``: activation quantization in eager
PyTorch + ``torch._scaled_mm`` with row-wise scales) against the 16-bit ``F.linear``, on a CUDA GPU with
float8 tensor cores (compute capability 8.9+). Prints one line per shape and dtype.

    PYTHONPATH=. python eval/bench_fp8.py
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from dmquant.kernels import fp8

SHAPES = [(4096, 320, 320), (4096, 1280, 5120), (8192, 4096, 4096), (16384, 3072, 12288)]  # (M, K, N)


def bench(fn, n: int = 50) -> float:
    """Milliseconds per call (CUDA events, after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def row(m: int, k: int, n: int, dt: torch.dtype) -> str:
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt)
    ws = w.float().abs().amax(1) / 448
    wc = (w.float() / ws[:, None]).to(torch.float8_e4m3fn)
    bias = torch.randn(n, device=dev, dtype=dt)
    act = x.float().abs().amax() / 448
    codes, sa = fp8.quantize_rows(x, None)
    t_ref = bench(partial(F.linear, x, w, bias))
    t_tok = bench(partial(fp8.fp8_linear, x, wc, ws, None, bias))
    t_st = bench(partial(fp8.fp8_linear, x, wc, ws, act, bias))
    t_gemm = bench(partial(torch._scaled_mm, codes, wc.t(), scale_a=sa, scale_b=ws.reshape(1, -1), bias=bias,
                           out_dtype=dt))
    return (f"M{m} K{k} N{n} {dt}: F.linear {t_ref:.3f} ms, fp8 token {t_tok:.3f} ms ({t_ref / t_tok:.2f}x), "
            f"fp8 static {t_st:.3f} ms ({t_ref / t_st:.2f}x), scaled_mm alone {t_gemm:.3f} ms ({t_ref / t_gemm:.2f}x)")


def main() -> None:
    if not (torch.cuda.is_available() and fp8.capable(torch.device("cuda"))):
        raise SystemExit("needs a CUDA GPU with float8 tensor cores (compute capability 8.9 or newer)")
    print("torch", torch.__version__, "capability", torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    for m, k, n in SHAPES:
        for dt in (torch.bfloat16, torch.float16):
            print(row(m, k, n, dt), flush=True)


if __name__ == "__main__":
    main()
