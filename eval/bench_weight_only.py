"""Weight-only GEMM (W4A16, W8A16) against FP16 ``F.linear``, in one command (issue 15).

    python eval/bench_weight_only.py --out w4a16.json          # CUDA: the shapes below, about 2 minutes
    python eval/bench_weight_only.py --device cpu --tiny       # smoke test: tiny shapes, the torch path

Per shape ``M x N x K`` and weight variant (``w4g32``: 4-bit in groups of 32, the ``w4a16`` recipe;
``w4g64``; ``w8``: 8-bit per output channel), the median time of

* ``fp16``: ``F.linear`` on the FP16 weight (cuBLAS), the baseline;
* ``fused``: :func:`dmquant.kernels.weight_only.w4a16_linear` (Triton, dequantization inside the GEMM);
* ``deq_torch``: the torch path, dequantize the whole weight (``QuantizedTensor.dequantize``) then
  ``F.linear``: what the reference backend does per call;
* ``deq_triton``: the one-pass Triton dequantization then ``F.linear`` (the backend's kxk-conv path);

with ratios to ``fp16``, the weight bytes ratio (FP16 weight / codes + scales) and the SQNR of ``fused``
against :func:`~dmquant.kernels.weight_only.w4a16_linear_reference`. On CUDA the times come from
``triton.testing.do_bench_cudagraph`` (replayed CUDA graphs, no launch overhead; autotuning runs before
capture), eager ``do_bench`` if capture fails; on the CPU from a few timed calls. ``run(device, shapes)``
is the importable entry point (the GPU benchmark calls it); ``--out`` writes its rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dmquant.kernels.int4 import quantize_int4  # noqa: E402
from dmquant.kernels.weight_only import w4a16_linear, w4a16_linear_reference  # noqa: E402

# M x N x K: SD1.5 UNet at 512 px, batch 2 (classifier-free guidance): 64x64 / 32x32 / 16x16 tokens, the
# GEGLU and FF projections, cross-attention K/V over 77 text tokens, one 3072-wide square layer
SHAPES = [(8192, 320, 320), (8192, 2560, 320), (8192, 320, 1280), (2048, 640, 640), (2048, 5120, 640),
          (512, 1280, 1280), (154, 320, 768), (4096, 3072, 3072)]
TINY_SHAPES = [(37, 48, 128), (5, 64, 256)]
VARIANTS = {"w4g32": (4, 32), "w4g64": (4, 64), "w8": (8, None)}
METHODS = ("fp16", "fused", "deq_torch", "deq_triton")


def make_weight(n: int, k: int, bits: int, group: int | None, device, seed: int = 0):
    """``(fp16-ish float weight, qdata, scale)``: symmetric, int4 packed in groups or int8 per channel."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    if bits == 4:
        qdata, scale = quantize_int4(w, group)
    else:
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        qdata = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return w.to(device), qdata.to(device), scale.reshape(-1).to(device)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref, err = ref.double(), out.double() - ref.double()
    noise = err.pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def time_ms(fn, device: torch.device) -> tuple[float, str]:
    """Median milliseconds of ``fn`` and how they were measured."""
    fn()
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        torch.cuda.synchronize()
        try:
            return do_bench_cudagraph(fn, rep=50, return_mode="median"), "cudagraph"
        except Exception as err:  # capture can fail (a sync inside); keep the eager figure
            print(f"    (cuda graph timing failed: {type(err).__name__}: {err})", file=sys.stderr)
            return do_bench(fn, warmup=10, rep=50, return_mode="median"), "eager"
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), "cpu"


def _methods(x, w16, qdata, scale, group, bias) -> dict:
    return {
        "fp16": lambda: F.linear(x, w16, bias),
        "fused": lambda: w4a16_linear(x, qdata, scale, group, bias, method="fused"),
        "deq_torch": lambda: w4a16_linear(x, qdata, scale, group, bias, backend="torch"),
        "deq_triton": lambda: w4a16_linear(x, qdata, scale, group, bias, method="dequant"),
    }


def run(device, shapes=None, variants=("w4g32", "w4g64", "w8"), dtype=torch.float16) -> list[dict]:
    """One row per shape and weight variant: times (ms), ratios to FP16, weight bytes ratio, SQNR (dB)."""
    device = torch.device(device)
    rows = []
    for m, n, k in shapes or SHAPES:
        g = torch.Generator().manual_seed(m * 31 + n * 7 + k)
        x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        bias = (torch.randn(n, generator=g) / 10).to(device=device, dtype=dtype)
        for name in variants:
            bits, group = VARIANTS[name]
            w, qdata, scale = make_weight(n, k, bits, group, device)
            fns = _methods(x, w.to(dtype), qdata, scale, group, bias)
            if device.type != "cuda":  # no Triton off CUDA: the fused and one-pass paths are the torch path
                fns = {key: fns[key] for key in ("fp16", "fused", "deq_torch")}
            row = {"M": m, "N": n, "K": k, "variant": name, "bits": bits, "group": group, "dtype": str(dtype),
                   "device": device.type}
            ref = w4a16_linear_reference(x, qdata, scale, group, bias)
            sqnr = sqnr_db(fns["fused"](), ref)
            row["sqnr_db"] = None if math.isinf(sqnr) else round(sqnr, 2)  # None: bit-identical (strict JSON)
            for key, fn in fns.items():
                ms, how = time_ms(fn, device)
                row[f"{key}_ms"] = round(ms, 5)
                row["timing"] = how
            for key in fns:
                if key != "fp16":
                    row[f"{key}_ratio"] = round(row[f"{key}_ms"] / row["fp16_ms"], 3)
            stored = qdata.numel() * qdata.element_size() + scale.numel() * scale.element_size()
            row["weight_memory_ratio"] = round(n * k * 2 / stored, 3)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    def cell(key):
        return f"{row[key]:.4f}" if key in row else "-"

    def ratio(key):
        return f"{row[key]:.2f}x" if key in row else "-"

    sqnr = "exact" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
    return (f"| {row['M']}x{row['N']}x{row['K']} | {row['variant']} | {cell('fp16_ms')} | {cell('fused_ms')} | "
            f"{ratio('fused_ratio')} | {cell('deq_torch_ms')} | {ratio('deq_torch_ratio')} | {cell('deq_triton_ms')} "
            f"| {ratio('deq_triton_ratio')} | {row['weight_memory_ratio']:.2f}x | {sqnr} |")


HEADER = ("| M x N x K | weights | fp16 ms | fused ms | fused/fp16 | deq+linear (torch) ms | /fp16 | "
          "deq+linear (triton) ms | /fp16 | fp16 bytes / stored | SQNR dB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *(_line(r) for r in rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test; the CPU runs the torch path)")
    parser.add_argument("--variants", nargs="+", default=["w4g32", "w4g64", "w8"], choices=sorted(VARIANTS))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --tiny for the smoke test", file=sys.stderr)
        return 2
    print(HEADER, flush=True)
    rows = run(args.device, TINY_SHAPES if args.tiny else SHAPES, args.variants, getattr(torch, args.dtype))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
