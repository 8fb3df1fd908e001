"""One SD1.5 UNet step on a CUDA GPU with dmquant's frozen recipes: latency, GPU memory, fidelity.

The UNet is the full SD1.5 architecture built from its config with random weights (speed and memory
do not depend on the values); 64x64 latents, batch 2 (classifier-free guidance), 77 text tokens.
Every configuration runs in this one process, one after another:

* ``fp16``: the plain diffusers UNet in half precision (SDPA attention, cuBLAS);
* each recipe: the fp16 UNet on the GPU is quantized (calibrated on two synthetic steps), then frozen
  (``dmquant.freeze``), as a user's ``quantize`` + ``save``/``load`` would leave it.

Reported per configuration: median step time (CUDA-synchronised), GPU memory held by the model after
freezing, peak GPU memory during a step, and the SQNR of the step's output against the simulation it
was frozen from (frozen kernels compute what was calibrated) and against fp16.

    python eval/bench_gpu.py [--recipes w8a8,w8a8-sage,w4a8-rtn,w4a16,w4a4-g64] [--out bench_gpu.json]
    python eval/bench_gpu.py --device cpu --tiny     # a small UNet on the CPU: checks the script only

A lent GPU machine without diffusers: unpack the diffusers wheel (``pip download diffusers --no-deps``)
into an ignored folder of the checkout, carry it, and run with ``PYTHONPATH=<that folder>``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import dmquant  # noqa: E402
from dmquant.bench import denoiser_inputs, time_step  # noqa: E402
from dmquant.quantizers.affine import sqnr_db  # noqa: E402

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
    block_out_channels=(64, 128), attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def build_unet(tiny: bool):
    from diffusers import UNet2DConditionModel

    from dmquant.models.full_size import sd15_unet

    if not tiny:
        return sd15_unet()
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


def to(inputs, device, dtype):
    args, kwargs = inputs
    move = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def output(model, inputs) -> torch.Tensor:
    args, kwargs = inputs
    return model(*args, **kwargs).sample.float()


def mem_mib(device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def measure(name, model, inputs, device, repeats, ref_fp, ref_sim=None) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resident = mem_mib(device)
    out = output(model, inputs)
    seconds = time_step(model, inputs, warmup=2, repeats=repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    row = {"config": name, "ms_per_step": round(1000 * seconds, 2), "model_mib": round(resident, 1),
           "peak_mib": round(peak, 1), "sqnr_vs_fp16_db": round(sqnr_db(ref_fp, out), 2)}
    if ref_sim is not None:
        row["sqnr_vs_simulation_db"] = round(sqnr_db(ref_sim, out), 2)
        row["simulation_sqnr_vs_fp16_db"] = round(sqnr_db(ref_fp, ref_sim), 2)
    print(f"  {row}", flush=True)
    return row


def quantized(base, recipe, calib, inputs):
    """(frozen model, output of the simulation it was frozen from, quantize seconds)."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    dmquant.quantize(model, recipe, calibration_data=calib, progress=False)
    seconds = time.perf_counter() - start
    sim = output(model, inputs)
    dmquant.freeze(model)
    return model, sim, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="w8a8,w8a8-sage,w4a8-rtn,w4a16,w4a4-g64")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small UNet (script check on the CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    base = build_unet(args.tiny).to(device, dtype)
    size = 8 if args.tiny else 64
    inputs = to(denoiser_inputs(base, batch=2, latent_size=size), device, dtype)
    calib = [to(denoiser_inputs(base, batch=2, latent_size=size, seed=s), device, dtype) for s in (1, 2)]
    ref = output(base, inputs)
    rows = [measure("fp16" if dtype == torch.float16 else "fp32", base, inputs, device, args.repeats, ref)]
    base_mib = rows[0]["model_mib"]
    base = base.cpu()  # only the model being measured stays on the GPU
    for recipe in args.recipes.split(","):
        try:
            model, sim, seconds = quantized(base.to(device), recipe, calib, inputs)
            base = base.cpu()
            row = measure(recipe, model, inputs, device, args.repeats, ref, sim)
            row["quantize_seconds"] = round(seconds, 1)
            rows.append(row)
        except Exception:
            print(f"  {recipe}: FAILED\n{traceback.format_exc()}", flush=True)
        finally:
            base = base.cpu()
            model = sim = None
            gc.collect()
    fp_ms = rows[0]["ms_per_step"]
    print(f"\n{'config':12s} {'ms/step':>8s} {'x fp16':>7s} {'model MiB':>10s} {'x mem':>6s} {'peak MiB':>9s} "
          f"{'SQNR fp16':>9s} {'SQNR sim':>9s} {'sim vs fp16':>11s}")
    for r in rows:
        print(f"{r['config']:12s} {r['ms_per_step']:8.2f} {fp_ms / r['ms_per_step']:7.2f} {r['model_mib']:10.1f} "
              f"{base_mib / r['model_mib'] if r['model_mib'] else float('nan'):6.2f} {r['peak_mib']:9.1f} "
              f"{r['sqnr_vs_fp16_db']:9.2f} {r.get('sqnr_vs_simulation_db', float('nan')):9.2f} "
              f"{r.get('simulation_sqnr_vs_fp16_db', float('nan')):11.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if len(rows) == 1 + len(args.recipes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
