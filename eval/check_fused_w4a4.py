"""Does the frozen W4A4 layer's fused path compute what the simulation calibrated? (CPU, trained DiT)

The zoo's tiny-shapes-dit is quantized with ``w4a4-g64`` (the fused kernel's layout) from four
synthetic calls, frozen, and run for one denoiser step on four inputs with its outlier layers on each
path: ``off`` (backend ``reference``: the unfused torch ops the simulation uses), ``torch`` (backend
``fused-int4``, the fused op's torch reference) and ``triton`` (``fused-int4``, the Triton kernel,
through its interpreter on the CPU). Printed: the SQNR
of each against the simulation and against full precision, and the simulation's own SQNR.

    python eval/check_fused_w4a4.py                  # fp32
    python eval/check_fused_w4a4.py --dtype float16  # fp16, as a GPU user runs it
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_gpu import output  # noqa: E402

import dmquant  # noqa: E402
from dmquant.bench import denoiser_inputs  # noqa: E402
from dmquant.nn.backends import fused_int4_supported  # noqa: E402
from dmquant.nn.wrap import quant_layers  # noqa: E402
from dmquant.quantizers.affine import sqnr_db  # noqa: E402


def step_inputs(model, seed: int, dtype: torch.dtype):
    (x,), kwargs = denoiser_inputs(model, batch=4, seed=seed)
    kwargs["timestep"] = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(seed))
    return (x.to(dtype),), kwargs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--recipe", default="w4a4-g64")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    base = dmquant.zoo.load("tiny-shapes-dit").transformer.eval().to(dtype)
    inputs = step_inputs(base, 0, dtype)
    reference = output(base, inputs)
    model = copy.deepcopy(base)
    dmquant.quantize(model, args.recipe, calibration_data=[step_inputs(base, s, dtype) for s in (1, 2, 3, 4)],
                     progress=False)
    simulation = output(model, inputs)
    dmquant.freeze(model)
    layers = [m for _, m in quant_layers(model) if m.outlier is not None and fused_int4_supported(m)]
    print(f"{args.recipe}, {args.dtype}: {len(layers)} outlier layers the fused kernel computes; simulation vs FP "
          f"{sqnr_db(reference, simulation):.2f} dB")
    paths = {"off": ("reference", "auto"), "torch": ("fused-int4", "torch"), "triton": ("fused-int4", "triton")}
    for backend, (name, kernel) in paths.items():
        for layer in layers:
            layer.backend, layer.kernel = name, kernel
        out = output(model, inputs)
        print(f"  frozen, path {backend:6s}: vs simulation {sqnr_db(simulation, out):7.2f} dB, "
              f"vs FP {sqnr_db(reference, out):6.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
