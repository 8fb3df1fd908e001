"""What a Hadamard rotation of the inputs costs a frozen int8 linear layer on the CPU (issue 18's lead: rotation
helps static 8-bit inputs on every transformer cell of the protocol, but it must not eat the static recipe's speed).

For linear layers of today's transformer widths (PixArt 1152, SD3 1536, FLUX 3072 and their MLPs), ``tokens`` rows:
the frozen layer of the static recipe (int8 weights per channel, int8 inputs with one calibrated range, the
oneDNN int8 GEMM where available) without a rotation, the shipped `w8a8`'s layer (int8 inputs per token, computed
on the fly) for comparison, the static one with the rotation as dmquant applies it (each Sylvester block
as the Kronecker product of two small ones: ``2·sqrt(block)`` multiply-adds per channel), and with the dense
``n x n`` product it replaced; FP32 ``F.linear`` for reference. Median of ``--repeats`` calls, one process, the
configurations of one shape timed side by side (round-robin).

    OMP_NUM_THREADS=2 python eval/bench_rotation.py [--tokens 2048] [--repeats 7] [--out eval/bench_rotation.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.calibration.observe import observe_activations
from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.nn import outlier
from dmquant.nn.layers import QuantLinear
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import input_quantizers, weight_quantizers
from dmquant.quantizers.outliers import hadamard

SHAPES = [(1152, 1152), (1152, 4608), (4608, 1152), (1536, 1536), (3072, 3072), (3072, 12288), (12288, 3072),
          (15360, 3072)]  # (in, out); 15360 -> 3072: FLUX's single-block proj_out


STATIC = ActQuantConfig(bits=8, method="minmax")
PER_TOKEN = ActQuantConfig(bits=8, granularity="token", symmetric=False)  # the shipped w8a8's linear inputs


def frozen_layer(d_in: int, d_out: int, rotation: bool, x: torch.Tensor, acts: ActQuantConfig = STATIC) -> nn.Module:
    """The w8a8 layer (static inputs unless ``acts`` says otherwise), calibrated on ``x`` and frozen (with its
    kernels prepared)."""
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    q = QuantLinear.wrap(layer, weight_quantizers(WeightQuantConfig(bits=8)), input_quantizers(acts, None, None))
    if rotation:
        q.attach_outlier_branch(OutlierBranch(d_in, d_out, None, rotation_seed=0), layer.weight)
    q.calibrate_weight()
    observe_activations(q, [((x,), {})], progress=False)
    frozen = q.frozen_copy()
    frozen.prepare_kernels()
    return frozen


class DenseRotation:
    """Within the block, branches rotate by the dense ``x @ H`` product (the form before 2026-12-01)."""

    def __enter__(self):
        self.saved = outlier.OutlierBranch._rotate
        outlier.OutlierBranch._rotate = lambda branch, x: x @ hadamard(branch.in_channels, branch.rotation_seed).to(x)
        return self

    def __exit__(self, *exc):
        outlier.OutlierBranch._rotate = self.saved


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@torch.no_grad()
def bench_shape(d_in: int, d_out: int, tokens: int, repeats: int) -> dict:
    x = torch.randn(tokens, d_in)
    weight = torch.randn(d_out, d_in) / d_in ** 0.5
    plain, rotated = frozen_layer(d_in, d_out, False, x), frozen_layer(d_in, d_out, True, x)
    per_token = frozen_layer(d_in, d_out, False, x, PER_TOKEN)
    dense_h = hadamard(d_in, 0)
    calls = {"fp32": lambda: F.linear(x, weight), "int8": lambda: plain(x), "int8+rotation": lambda: rotated(x),
             "int8 per token": lambda: per_token(x),
             "rotation alone": lambda: rotated.outlier._rotate(x), "dense rotation alone": lambda: x @ dense_h}

    def int8_dense():
        with DenseRotation():
            return rotated(x)

    calls["int8+dense rotation"] = int8_dense
    for fn in calls.values():
        fn()  # warm-up
    times = {name: [] for name in calls}
    for _ in range(repeats):  # round-robin: a drifting host slows every configuration alike
        for name, fn in calls.items():
            times[name] += timed(fn, 1)
    ms = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    ref = rotated(x)
    with DenseRotation():
        dense_out = rotated(x)
    return {"shape": [d_in, d_out], "block": d_in & -d_in, "ms": ms,
            "rotation_overhead": round(ms["int8+rotation"] / ms["int8"] - 1, 3),
            "dense_rotation_overhead": round(ms["int8+dense rotation"] / ms["int8"] - 1, 3),
            "max_abs_diff_factored_vs_dense": float((ref - dense_out).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"frozen static int8 linear layers, {args.tokens} tokens; {machine}", flush=True)
    rows = []
    print("| in -> out | block | FP32 ms | int8 ms | int8 + rotation ms (overhead) | int8 + dense rotation ms (overhead)"
          " | rotation alone ms | dense rotation alone ms | int8 per token (w8a8) ms |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for d_in, d_out in SHAPES:
        r = bench_shape(d_in, d_out, args.tokens, args.repeats)
        ms = r["ms"]
        print(f"| {d_in} -> {d_out} | {r['block']} | {ms['fp32']} | {ms['int8']} | {ms['int8+rotation']} "
              f"(+{100 * r['rotation_overhead']:.0f}%) | {ms['int8+dense rotation']} "
              f"(+{100 * r['dense_rotation_overhead']:.0f}%) | {ms['rotation alone']} | {ms['dense rotation alone']} | "
              f"{ms['int8 per token']} |",
              flush=True)
        rows.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
