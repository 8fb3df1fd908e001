"""CPU speed of one SD1.5 UNet denoising step: dmquant's integer path against FP32, BF16 and the peers.

The UNet is the full SD1.5 architecture built from its config with random weights (speed does not
depend on the values); 64x64 latents, batch 2 (classifier-free guidance), 77 text tokens. Every
configuration runs in this one process, one after another, and is reported as a ratio to FP32:

* fp32, bf16: the plain diffusers UNet, eager;
* dmquant w8a8 / w4a8: calibrated on two synthetic steps (min-max ranges: speed does not depend on
  them), frozen, so linear and conv layers run int8 x uint8 on oneDNN (``w8a8`` is the static recipe,
  today's ``w8a8-static``); ``w8a8-token``: today's ``w8a8`` (per-token int8 inputs of linear layers,
  int8 weight-only convolutions, FP attention), frozen; ``w8a8-token-before``: the same model on the CPU path
  it had before 2026-12-01 (per-token GEMMs on ``torch._int_mm``, each weight dequantized whole), for an A/B;
* torchao ``Int8DynamicActivationInt8WeightConfig`` and optimum-quanto W8A8 (qint8 weights and
  activations, calibrated, frozen): eager, as their users run them.
* ``<recipe>-bf16`` (e.g. ``w8a8-token-bf16``): the recipe applied to the UNet in bfloat16 (calibrated on
  bfloat16 inputs), frozen: its float parts (weight-only convolutions, attention) then compute in bfloat16;
* ``<config>+compile``: the same after regional ``torch.compile`` (inductor on the CPU;
  :func:`dmquant.bench.compile_regions`), the compile time in ``setup_seconds``; e.g.
  ``torchao-int8dyn+compile``, the peer a user would pick, and ``w8a8+compile``.

Then the GEMM alone at UNet shapes: fp32 ``F.linear`` against oneDNN int8 (quantize + GEMM +
dequantize) and ``torch._int_mm`` (GEMM only); int8 VNNI does 4x the multiply-adds of fp32 per cycle.

    pip install -e ".[bench]"
    python eval/bench_speed.py [--repeats 3] [--only fp32,w8a8] [--latent-size 64] [--out eval/bench_speed.json]
    python eval/bench_speed.py --only fp32,w8a8 --interleave --repeats 5   # steps alternate round by round
    python eval/bench_speed.py --only fp32,w8a8 --profile                  # where each step's time goes
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import dmquant
from dmquant.bench import compile_regions, denoiser_inputs, time_step, uncompile
from dmquant.models.full_size import sd15_unet
from dmquant.nn import layers

SPEED_RECIPES = {  # "w8a8" here is the static recipe (today's w8a8-static); "w8a8-token" is today's w8a8
    "w8a8-token": {"name": "w8a8-token-speed", "weights": {"bits": 8}, "attention": None,
                   "activations": {"bits": 8, "granularity": "token", "symmetric": False},
                   "layers": {"conv:*": {"weight_only": True}}},
    # the same with SmoothQuant's factors in front of the per-token inputs (x / s: one more elementwise op per layer)
    "w8a8-token-smooth": {"name": "w8a8-token-smooth-speed", "weights": {"bits": 8}, "attention": None,
                          "activations": {"bits": 8, "granularity": "token", "symmetric": False},
                          "layers": {"conv:*": {"weight_only": True}}, "smoothing": {"alpha": 0.5}},
    # int8 convolutions on inputs quantized on the fly, one range per sample (oneDNN), linear per token
    "w8a8-sample": {"name": "w8a8-sample-speed", "weights": {"bits": 8}, "attention": None,
                    "activations": {"bits": 8, "granularity": "token", "symmetric": False},
                    "layers": {"conv:*": {"activations": {"granularity": "sample"}}}},
    # the same with the linear inputs per sample too (oneDNN's GEMM instead of torch._int_mm)
    "w8a8-sample-all": {"name": "w8a8-sample-all-speed", "weights": {"bits": 8}, "attention": None,
                        "activations": {"bits": 8, "granularity": "sample", "symmetric": False}},
    "w8a8": {"name": "w8a8-speed", "weights": {"bits": 8}, "activations": {"bits": 8},
             "attention": {"bits": 8, "probs_bits": None}},
    "w4a8": {"name": "w4a8-speed", "weights": {"bits": 4}, "activations": {"bits": 8},
             "attention": {"bits": 8, "probs_bits": None}},
}
GEMM_SHAPES = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 640), (2048, 640, 5120),
               (512, 1280, 1280), (4096, 1280, 1280)]


def build(name: str, base: torch.nn.Module, calib_inputs):
    if name == "fp32":
        return base
    if name == "bf16":
        return copy.deepcopy(base).to(torch.bfloat16)
    if name.endswith("-bf16") and name.removesuffix("-bf16") in SPEED_RECIPES:  # a bfloat16 model, quantized
        model = copy.deepcopy(base).to(torch.bfloat16)
        calib = [_bf16_inputs(inputs) for inputs in calib_inputs]
        dmquant.quantize(model, SPEED_RECIPES[name.removesuffix("-bf16")], calibration_data=calib, progress=False)
        dmquant.freeze(model)
        return model
    if name in SPEED_RECIPES:
        model = copy.deepcopy(base)
        dmquant.quantize(model, SPEED_RECIPES[name], calibration_data=calib_inputs, progress=False)
        dmquant.freeze(model)
        return model
    if name == "w8a8-token-before":  # today's w8a8 on the CPU path before 2026-12-01: torch._int_mm, whole weights
        model = build("w8a8-token", base, calib_inputs)
        for module in model.modules():
            prepared = getattr(module, "kernels", {}).get("cpu-int8-token") if hasattr(module, "kernels") else None
            if prepared:
                prepared[0].pop("packed", None)
        forward = model.forward

        def unsliced(*args, **kwargs):
            chunk, layers.DEQUANT_CHUNK = layers.DEQUANT_CHUNK, 1 << 62
            try:
                return forward(*args, **kwargs)
            finally:
                layers.DEQUANT_CHUNK = chunk

        model.forward = unsliced
        return model
    if name == "torchao-int8dyn":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = copy.deepcopy(base)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model
    if name == "quanto-w8a8":
        from optimum.quanto import Calibration, freeze, qint8, quantize

        model = copy.deepcopy(base)
        quantize(model, weights=qint8, activations=qint8)
        with Calibration(), torch.no_grad():
            for args, kwargs in calib_inputs:
                model(*args, **kwargs)
        freeze(model)
        return model
    raise SystemExit(f"unknown configuration {name}")


def _bf16_inputs(inputs):
    """The step inputs of a bfloat16 model: latents and text states in bfloat16, the timestep as is."""
    (sample, timestep), kwargs = inputs
    return (sample.bfloat16(), timestep), {"encoder_hidden_states": kwargs["encoder_hidden_states"].bfloat16()}


def _prepared(name: str, base, inputs, calib):
    """The configuration ``name`` built (and compiled: its first call), its step inputs and setup seconds."""
    start = time.perf_counter()
    config, compiled = name.removesuffix("+compile"), name.endswith("+compile")
    model = build(config, base, calib)
    blocks = compile_regions(model) if compiled else []
    step_inputs = _bf16_inputs(inputs) if config == "bf16" or config.endswith("-bf16") else inputs
    if compiled:  # the first call compiles
        time_step(model, step_inputs, warmup=0, repeats=1)
    return model, blocks, step_inputs, time.perf_counter() - start


def bench_unet(names, repeats: int, latent_size: int, interleave: bool = False) -> list[dict]:
    """Seconds per step of each configuration. ``interleave``: every model is built first, then the steps
    alternate (one step of each configuration per round, ``repeats`` rounds), so a host whose speed drifts
    during the run slows every configuration alike; each ratio to FP32 is then the median of the rounds'."""
    base = sd15_unet()
    inputs = denoiser_inputs(base, batch=2, latent_size=latent_size)
    calib = [denoiser_inputs(base, batch=2, latent_size=latent_size, seed=s) for s in (1, 2)]
    rows, times = [], {}
    if interleave:
        built = {}
        for name in names:
            built[name] = _prepared(name, base, inputs, calib)
            time_step(built[name][0], built[name][2], warmup=0, repeats=1)  # the warm-up step
            print(f"  {name:16s} built (setup {built[name][3]:.0f} s)", flush=True)
        times = {name: [] for name in names}
        for round_ in range(repeats):
            for name in names:
                model, _, step_inputs, _ = built[name]
                times[name].append(time_step(model, step_inputs, warmup=0, repeats=1))
            print(f"  round {round_ + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
        for name in names:
            rows.append({"config": name, "seconds_per_step": round(statistics.median(times[name]), 3),
                         "setup_seconds": round(built[name][3], 1), "seconds_per_round": [round(t, 3) for t in times[name]]})
            uncompile(built[name][1])
    else:
        for name in names:
            model, blocks, step_inputs, setup = _prepared(name, base, inputs, calib)
            seconds = time_step(model, step_inputs, warmup=1, repeats=repeats)
            rows.append({"config": name, "seconds_per_step": round(seconds, 3), "setup_seconds": round(setup, 1)})
            print(f"  {name:16s} {seconds:7.3f} s/step  (setup {setup:.0f} s)", flush=True)
            uncompile(blocks)
            if model is not base:
                del model
            gc.collect()
    fp32 = next((r for r in rows if r["config"] == "fp32"), None)
    for row in rows:
        if fp32 is None:
            row["speedup_vs_fp32"] = None
        elif interleave:  # the median of the per-round ratios
            row["speedup_vs_fp32"] = round(statistics.median(
                a / b for a, b in zip(fp32["seconds_per_round"], row["seconds_per_round"])), 2)
        else:
            row["speedup_vs_fp32"] = round(fp32["seconds_per_step"] / row["seconds_per_step"], 2)
    return rows


def profile_unet(names, latent_size: int, rows: int = 12) -> None:
    """One step of each configuration under ``torch.profiler`` (after a warm-up step): its heaviest operators by
    their own time, and how much of the step attention (the fused SDPA kernel) takes."""
    base = sd15_unet()
    inputs = denoiser_inputs(base, batch=2, latent_size=latent_size)
    calib = [denoiser_inputs(base, batch=2, latent_size=latent_size, seed=s) for s in (1, 2)]
    for name in names:
        model, blocks, step_inputs, _ = _prepared(name, base, inputs, calib)
        time_step(model, step_inputs, warmup=0, repeats=1)
        with torch.profiler.profile() as prof:
            time_step(model, step_inputs, warmup=0, repeats=1)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        print(f"\n{name}: {total / 1e6:.3f} s of operator time, attention {attention / 1e6:.3f} s "
              f"({100 * attention / total:.0f}%)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
        uncompile(blocks)


def bench_gemm(repeats: int = 5) -> list[dict]:
    rows = []
    for m, k, n in GEMM_SHAPES:
        rows.append(gemm_row(m, k, n, repeats))
        r = rows[-1]
        print(f"  gemm {m}x{k}x{n}: fp32 {r['fp32_gflops']} GFLOP/s, int8 {r['int8_gops']} GOP/s "
              f"({r['int8_speedup']}x), _int_mm {r['int_mm_gops']} GOP/s ({r['int_mm_speedup']}x)", flush=True)
    return rows


def gemm_row(m: int, k: int, n: int, repeats: int) -> dict:
    from dmquant.formats import format_named
    from dmquant.kernels import cpu_int8, int8_gemm
    from dmquant.quantizers.affine import qparams_from_range

    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    packed = cpu_int8.prepack_linear(w_q)
    w_t = w_q.t().contiguous()
    x_q8 = torch.randint(-128, 127, (m, k), dtype=torch.int8)

    def fp32():
        return F.linear(x, w)

    def int8_full():
        codes = cpu_int8.quantize_uint8(x, 0.02, 128)
        return cpu_int8.int8_linear(codes, 0.02, 128, packed, w_scale)

    def int_mm():
        return torch._int_mm(x_q8, w_t)

    colsum, grid = w_q.to(torch.int32).sum(dim=1), format_named("int", 8, signed=False)

    def per_token():  # w8a8's linear layers on the CPU: each row's range, quantize, GEMM, epilogue
        scale, zero = qparams_from_range(x.amin(dim=1), x.amax(dim=1), grid, False)
        return cpu_int8.int8_linear_per_row(x, scale, zero, packed, w_scale, w_scale * colsum, None)

    def per_token_int_mm():  # the same on torch._int_mm (the CPU path without oneDNN, and before 2026-12-01)
        scale, zero = qparams_from_range(*torch.aminmax(x, dim=1), grid, False)
        return int8_gemm.per_row_int8_linear_eager(x, scale, zero - 128, w_q, w_scale, colsum, None)

    t = {name: _median(fn, repeats) for name, fn in (("fp32", fp32), ("int8", int8_full), ("int_mm", int_mm),
                                                     ("per_token", per_token), ("per_token_int_mm", per_token_int_mm))}
    flops = 2 * m * k * n
    return {"shape": [m, k, n], "fp32_gflops": round(flops / t["fp32"] / 1e9, 1),
            "int8_gops": round(flops / t["int8"] / 1e9, 1), "int_mm_gops": round(flops / t["int_mm"] / 1e9, 1),
            "int8_speedup": round(t["fp32"] / t["int8"], 2), "int_mm_speedup": round(t["fp32"] / t["int_mm"], 2),
            "per_token_ms": round(t["per_token"] * 1e3, 2), "fp32_ms": round(t["fp32"] * 1e3, 2),
            "per_token_speedup": round(t["fp32"] / t["per_token"], 2),
            "per_token_int_mm_ms": round(t["per_token_int_mm"] * 1e3, 2),
            "per_token_int_mm_speedup": round(t["fp32"] / t["per_token_int_mm"], 2)}


def _median(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--only", default="fp32,bf16,w8a8,w4a8,torchao-int8dyn,quanto-w8a8")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--interleave", action="store_true",
                        help="build every configuration first, then alternate their steps round by round")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: one profiled step of each configuration, its heaviest operators")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"SD1.5 UNet step, batch 2, {args.latent_size}x{args.latent_size} latents; {machine}", flush=True)
    if args.profile:
        profile_unet(args.only.split(","), args.latent_size)
        return
    unet_rows = bench_unet(args.only.split(","), args.repeats, args.latent_size, args.interleave)
    gemm_rows = [] if args.skip_gemm else bench_gemm()
    print("\n| config | s / step | speed-up vs FP32 |\n|---|---|---|")
    for r in unet_rows:
        print(f"| {r['config']} | {r['seconds_per_step']:.3f} | {r['speedup_vs_fp32']}x |")
    if gemm_rows:
        print("\n| GEMM M×K×N | FP32 GFLOP/s | int8 GOP/s (quantize+GEMM+dequant) | speed-up | _int_mm GOP/s | speed-up "
              "| FP32 ms | per-token int8 ms (w8a8's CPU path) | speed-up | per-token on torch._int_mm ms | speed-up |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in gemm_rows:
            m, k, n = r["shape"]
            print(f"| {m}×{k}×{n} | {r['fp32_gflops']} | {r['int8_gops']} | {r['int8_speedup']}x | "
                  f"{r['int_mm_gops']} | {r['int_mm_speedup']}x | {r['fp32_ms']} | {r['per_token_ms']} | "
                  f"{r['per_token_speedup']}x | {r['per_token_int_mm_ms']} | {r['per_token_int_mm_speedup']}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "unet": unet_rows, "gemm": gemm_rows}, f, indent=2)


if __name__ == "__main__":
    main()
