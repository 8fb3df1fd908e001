"""GPU speed, memory and fidelity of dmquant's frozen recipes against fp16/bf16 and the peers, in one run.

Sections (``--sections``, in this order; each row is appended to ``--out`` as soon as it is measured, so
a run cut short still leaves its rows):

* ``sd15``, ``sdxl``: one UNet step (full SD1.5 / SDXL-base architecture, random weights, fp16, batch 2,
  64x64 / 128x128 latents, 77 tokens); ``flux``: a FLUX.1-dev-sized transformer stack (real widths,
  ``--flux-blocks`` double and single blocks, bf16, batch 1, 4096 image + 512 text tokens). Rows:
  the float model eager, replayed as a CUDA graph and ``torch.compile``-d (regionally: the
  repeated blocks, see ``compile_regions``); each of ``--recipes`` quantized on the GPU (two
  synthetic calibration steps) and frozen, eager, with its SQNR against the simulation it was frozen
  from; the ``--compile`` recipes compiled too; torchao's int8 dynamic quantization compiled (the peer
  a user would pick), when torchao imports.
  ``--conv-reference`` recipes are compiled once more with their convolutions on cuDNN (weights
  dequantized in the compiled graph); CUDA-graph replays of the eager models show the GPU time without
  Python launch overhead.
* ``attention``: 4096 tokens at head dims 64 and 128: SDPA per backend (default/cuDNN, FlashAttention-2,
  memory-efficient), the ``sageattention`` package when it imports, dmquant's int8 kernel.
* ``weight_only``: dmquant's W4A16 GEMM against fp16 ``F.linear`` (``eval/bench_weight_only.py``).
* a memory table: peak GPU memory per recipe and which of 6/8/12/16/24 GB cards it fits (the FLUX.1-dev
  row is derived from the stack's per-block bytes times 19 + 38 blocks, see the JSON's ``derived``).

Times: median of ``--repeats`` CUDA-event-timed calls after warm-up (compile included in the warm-up
and reported as ``compile_s``). All rows of a table come from the same process, side by side.

    python eval/bench_gpu.py --out $OUT/bench_gpu.json                      # a CUDA machine
    python eval/bench_gpu.py --device cpu --tiny --out /tmp/b.json         # tiny models: checks the script

A lent GPU machine without diffusers/torchao/sageattention: carry their wheels (see eval/README.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dmquant  # noqa: E402
from dmquant.bench import compile_regions, denoiser_inputs, uncompile  # noqa: E402
from dmquant.quantizers.affine import sqnr_db  # noqa: E402

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
CARDS_GB = (6, 8, 12, 16, 24)
CONTEXT_MIB = 500  # CUDA context and allocator slack on a card, roughly
FLUX_DEV_BLOCKS = (19, 38)


class Report:
    """Rows by section, written to ``path`` (JSON) after every row."""

    def __init__(self, path: str | None, meta: dict):
        self.path, self.data = path, {"meta": meta, "rows": [], "errors": [], "derived": []}
        self.start = time.perf_counter()

    def add(self, section: str, row: dict) -> dict:
        row = {"section": section, **row, "t": round(time.perf_counter() - self.start, 1)}
        self.data["rows"].append(row)
        print(f"  {row}", flush=True)
        self.save()
        return row

    def error(self, section: str, what: str) -> None:
        text = traceback.format_exc()
        print(f"  {section}/{what}: FAILED\n{text}", flush=True)
        self.data["errors"].append({"section": section, "what": what, "traceback": text[-3000:]})
        self.save()

    def save(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# -- models ------------------------------------------------------------------------------------------------
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
    block_out_channels=(64, 128), attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_SDXL = dict(TINY_UNET, addition_embed_type="text_time", addition_time_embed_dim=16,
                 projection_class_embeddings_input_dim=32 + 6 * 16, use_linear_projection=True)
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(8, 12, 12))


def build(section: str, tiny: bool, device: torch.device, flux_blocks: int):
    """``(model, inputs, calibration inputs, dtype)`` for a model section."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from dmquant.models import full_size

    gpu = device.type == "cuda"
    half = torch.float16 if gpu else torch.float32
    torch.manual_seed(0)
    if section == "sd15":
        model = UNet2DConditionModel(**TINY_UNET) if tiny else full_size.sd15_unet()
        dtype, batch, size, tokens = half, 2, 8 if tiny else 64, 77
    elif section == "sdxl":
        model = UNet2DConditionModel(**TINY_SDXL) if tiny else full_size.sdxl_unet(dtype=half)
        dtype, batch, size, tokens = half, 2, 8 if tiny else 128, 77
    elif section == "flux":
        dtype = torch.bfloat16 if gpu else torch.float32
        if tiny:
            model = FluxTransformer2DModel(**TINY_FLUX)
        else:
            model = full_size.flux_transformer(flux_blocks, flux_blocks, dtype=dtype, device=device)
        batch, size, tokens = 1, 8 if tiny else 128, 16 if tiny else 512
    else:
        raise ValueError(section)
    model = model.to(device, dtype).eval()
    inputs = denoiser_inputs(model, batch=batch, latent_size=size, text_tokens=tokens)
    calib = [denoiser_inputs(model, batch=batch, latent_size=size, text_tokens=tokens, seed=s) for s in (1, 2)]
    return model, on(inputs, device), [on(c, device) for c in calib], dtype


def on(inputs, device):
    args, kwargs = inputs

    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def output(model, inputs) -> torch.Tensor:
    args, kwargs = inputs
    out = model(*args, **kwargs)
    return (out.sample if hasattr(out, "sample") else out[0]).float()


# -- measuring ---------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(fn, device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms of ``repeats`` calls, seconds of the first call) after ``warmup`` calls."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            s = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - s))
    return statistics.median(times), first


def mib(device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def clean(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def cuda_graph(model, inputs):
    """A function replaying one captured call of ``model`` on ``inputs`` (its output is static)."""
    a, kw = inputs
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            model(*a, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static = model(*a, **kw)

    def replay():
        graph.replay()
        return static

    return replay


def measure(report, section, config, model, inputs, device, args, ref, extra=None, compiled=False, graphed=False):
    """One row: ``model`` eager, compiled (``torch.compile``, default mode) or replayed as a CUDA graph."""
    clean(device)
    resident = mib(device)
    breaks = 0
    a, kw = inputs
    if compiled:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        if args.compile_scope == "full":
            fn_model, blocks = torch.compile(model, dynamic=False), []
        else:
            fn_model, blocks = model, compile_regions(model)
        fn = lambda: fn_model(*a, **kw)  # noqa: E731
    elif graphed:
        fn = cuda_graph(model, inputs)
    else:
        fn = lambda: model(*a, **kw)  # noqa: E731
    ms, first = timed(fn, device, 2, args.repeats)
    out = fn()
    out = (out.sample if hasattr(out, "sample") else out[0]).float()
    if compiled:
        breaks = graph_breaks()
        uncompile(blocks)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    row = {"config": config, "compiled": compiled, "graphed": graphed, "ms": round(ms, 3), "model_mib": round(resident, 1),
           "peak_mib": round(peak, 1), "sqnr_vs_float_db": round(sqnr_db(ref, out), 2)}
    if compiled:
        row.update(compile_s=round(first, 1), graph_breaks=breaks, compile_scope=args.compile_scope)
    row.update(extra or {})
    return report.add(section, row), out


def backends_used(model, inputs) -> dict:
    """How many quantized layers each backend computes on one call (as ``auto`` picks them)."""
    from dmquant.nn import backends
    from dmquant.nn.layers import QuantLayer

    counts: dict[str, int] = {}

    def record(module, args):
        name = backends.choose(module, args[0]).name
        counts[name] = counts.get(name, 0) + 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, QuantLayer)]
    try:
        output(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return counts


def model_section(section, report, args, device):
    base, inputs, calib, dtype = build(section, args.tiny, device, args.flux_blocks)
    ref = output(base, inputs)
    fp = "fp16" if dtype == torch.float16 else ("bf16" if dtype == torch.bfloat16 else "fp32")
    measure(report, section, fp, base, inputs, device, args, ref)
    if args.graphs and device.type == "cuda":
        measure(report, section, fp, base, inputs, device, args, ref, graphed=True)
    if args.compile:
        try:
            measure(report, section, fp, base, inputs, device, args, ref, compiled=True)
        except Exception:
            report.error(section, f"{fp} compiled")
    keep = base.cpu()
    for recipe in [r for r in args.recipes.split(",") if r]:
        if report.elapsed() > args.budget_s:
            report.data["errors"].append({"section": section, "what": recipe, "traceback": "skipped: over budget"})
            break
        model = sim = None
        try:
            model = copy.deepcopy(keep).to(device)
            start = time.perf_counter()
            dmquant.quantize(model, recipe, calibration_data=calib, progress=False)
            quantize_s = time.perf_counter() - start
            sim = output(model, inputs)
            dmquant.freeze(model)
            extra = {"quantize_s": round(quantize_s, 1), "simulation_sqnr_vs_float_db": round(sqnr_db(ref, sim), 2),
                     "backends": backends_used(model, inputs)}
            row, out = measure(report, section, recipe, model, inputs, device, args, ref, extra)
            row["sqnr_vs_simulation_db"] = round(sqnr_db(sim, out), 2)
            report.save()
            if args.graphs and device.type == "cuda":
                grow, gout = measure(report, section, recipe, model, inputs, device, args, ref, graphed=True)
                grow["sqnr_vs_eager_db"] = round(sqnr_db(out, gout), 2)
            if recipe in args.compile.split(","):
                crow, cout = measure(report, section, recipe, model, inputs, device, args, ref, compiled=True)
                crow["sqnr_vs_eager_db"] = round(sqnr_db(out, cout), 2)
                report.save()
            if recipe in args.conv_reference.split(","):  # the convolutions on cuDNN with dequantized weights
                for m in model.modules():
                    if getattr(m, "kind", None) == "conv2d":
                        m.backend = "reference"
                measure(report, section, recipe + "+conv-ref", model, inputs, device, args, ref, compiled=True)
        except Exception:
            report.error(section, recipe)
        finally:
            model = sim = None
            clean(device)
    if args.torchao and report.elapsed() < args.budget_s:
        model = None
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            model = copy.deepcopy(keep).to(device)
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            measure(report, section, "torchao-int8-dynamic", model, inputs, device, args, ref, compiled=True)
        except Exception:
            report.error(section, "torchao")
        finally:
            model = None
            clean(device)
    if section == "flux" and not args.tiny:
        flux_dev_memory(report, keep, args.flux_blocks)
    keep = base = None
    clean(device)


def flux_dev_memory(report, base, blocks):
    """Per-recipe weight bytes of the whole FLUX.1-dev transformer, from the stack's rows: the non-block
    part plus the first double / single block's bytes times 19 / 38 (all blocks of a kind are alike)."""
    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

    double, single = nbytes(base.transformer_blocks[0]), nbytes(base.single_transformer_blocks[0])
    rest = nbytes(base) - blocks * (double + single)
    full = rest + FLUX_DEV_BLOCKS[0] * double + FLUX_DEV_BLOCKS[1] * single
    report.data["derived"].append({"what": "flux-dev float bytes", "bytes": full,
                                   "stack_bytes": nbytes(base), "ratio_full_to_stack": full / nbytes(base)})
    report.save()


# -- attention and kernels ---------------------------------------------------------------------------------
def attention_variants(q, k, v, sageattn, int8_attention) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    variants = {"sdpa-default": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash2", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        variants[name] = fn
    if sageattn is not None:
        variants["sageattention-pkg"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    variants["dmquant-int8"] = lambda: int8_attention(q, k, v, pv="fp16")
    variants["dmquant-int8-fp8pv"] = lambda: int8_attention(q, k, v, pv="fp8")
    return variants


def attention_section(report, args, device):
    from dmquant.kernels.attention import int8_attention

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = [(2, 10, 4096, 64), (1, 24, 4096, 128)] if not args.tiny else [(1, 2, 128, 64)]
    try:
        from sageattention import sageattn
    except Exception:
        sageattn = None
    for b, h, n, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3))
        k = k + 0.5 * torch.randn(1, h, 1, d, generator=g).to(device, dtype)  # a shared key offset, as real K has
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        variants = attention_variants(q, k, v, sageattn, int8_attention)
        base_ms = None
        for name, fn in variants.items():
            try:
                ms, _ = timed(fn, device, 3, args.repeats * 5)
                out = fn().float()
                cos = F.cosine_similarity(out.flatten(), exact.flatten(), dim=0).item()
                base_ms = ms if name == "sdpa-default" else base_ms
                report.add("attention", {"shape": f"B{b} H{h} N{n} d{d}", "config": name, "ms": round(ms, 4),
                                         "x_sdpa_default": round(base_ms / ms, 3) if base_ms else None,
                                         "cos": round(cos, 6)})
            except Exception:
                report.error("attention", f"{name} d{d}")


def weight_only_section(report, args, device):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_weight_only

    for row in bench_weight_only.run(device, bench_weight_only.TINY_SHAPES if args.tiny else None):
        report.add("weight_only", row)


# -- tables ------------------------------------------------------------------------------------------------
def print_tables(data: dict) -> None:
    rows = data["rows"]
    for section in ("sd15", "sdxl", "flux"):
        mine = [r for r in rows if r["section"] == section]
        if not mine:
            continue
        base = mine[0]
        comp = next((r for r in mine if r["config"] == base["config"] and r["compiled"]), None)
        mode = lambda r: "compiled" if r["compiled"] else ("graph" if r.get("graphed") else "eager")  # noqa: E731
        print(f"\n## {section}: {base['config']} eager {base['ms']:.2f} ms"
              + (f", compiled {comp['ms']:.2f} ms" if comp else ""))
        print("| config | mode | ms | x float eager | x float compiled | model MiB | x smaller | peak MiB "
              "| SQNR vs float | SQNR vs simulation | backends |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mine:
            xc = f"{comp['ms'] / r['ms']:.2f}" if comp else "-"
            smaller = base["model_mib"] / r["model_mib"] if r["model_mib"] else float("nan")
            print(f"| {r['config']} | {mode(r)} | {r['ms']:.2f} | {base['ms'] / r['ms']:.2f} "
                  f"| {xc} | {r['model_mib']:.0f} | {smaller:.2f} | {r['peak_mib']:.0f} | {r['sqnr_vs_float_db']:.1f} "
                  f"| {r.get('sqnr_vs_simulation_db', '-')} | {r.get('backends', '')} |")
        fits = [r for r in mine if mode(r) == "eager"]
        print("\n| config | peak MiB | " + " | ".join(f"{g} GB" for g in CARDS_GB) + " |")
        print("|---|---|" + "---|" * len(CARDS_GB))
        for r in fits:
            marks = ["yes" if r["peak_mib"] + CONTEXT_MIB <= g * 1024 else "no" for g in CARDS_GB]
            print(f"| {r['config']} | {r['peak_mib']:.0f} | " + " | ".join(marks) + " |")
    attn = [r for r in rows if r["section"] == "attention"]
    if attn:
        print("\n| shape | config | ms | x SDPA default | cos |\n|---|---|---|---|---|")
        for r in attn:
            print(f"| {r['shape']} | {r['config']} | {r['ms']:.4f} | {r['x_sdpa_default']} | {r['cos']:.6f} |")
    wo = [r for r in rows if r["section"] == "weight_only"]
    if wo:
        print("\n" + "\n".join(json.dumps(r) for r in wo))
    if data["errors"]:
        print(f"\n{len(data['errors'])} errors: " + ", ".join(f"{e['section']}/{e['what']}" for e in data["errors"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="sd15,attention,flux,weight_only,sdxl")
    parser.add_argument("--recipes", default="w8a8,w8a8-static,w8a8-fp8,w4a16,w4a4-g64",
                        help="recipes quantized, frozen and timed eagerly (fidelity against their simulation)")
    parser.add_argument("--compile", default="w8a8,w8a8-fp8",
                        help="of those, the recipes also timed under torch.compile ('' for none, nor the float one)")
    parser.add_argument("--compile-scope", choices=("regional", "full"), default="regional",
                        help="compile the repeated blocks (minutes less; a whole SD1.5 UNet took over 3 minutes to "
                             "compile on a 16-core H200 machine) or the whole model")
    parser.add_argument("--conv-reference", default="",
                        help="recipes also compiled with their convolutions on the reference backend (cuDNN)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="skip the CUDA-graph replay rows (eager kernels without launch overhead)")
    parser.add_argument("--no-torchao", dest="torchao", action="store_false")
    parser.add_argument("--flux-blocks", type=int, default=2, help="double and single blocks of the FLUX stack")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (checks the script on the CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="start no further section, recipe or peer after this many seconds (the tables and the "
                             "JSON are written either way)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "argv": sys.argv[1:]}
    for pkg in ("diffusers", "triton", "torchao", "sageattention"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except Exception:
            meta[pkg] = None
    print(meta, flush=True)
    torch._dynamo.config.cache_size_limit = 64
    report = Report(args.out, meta)
    for section in args.sections.split(","):
        if report.elapsed() > args.budget_s:
            report.data["errors"].append({"section": section, "what": "section", "traceback": "skipped: over budget"})
            continue
        print(f"\n# {section}", flush=True)
        try:
            if section in ("sd15", "sdxl", "flux"):
                model_section(section, report, args, device)
            elif section == "attention":
                attention_section(report, args, device)
            elif section == "weight_only":
                weight_only_section(report, args, device)
            else:
                raise ValueError(f"unknown section {section}")
        except Exception:
            report.error(section, "section")
        clean(device)
    report.data["meta"]["seconds"] = round(report.elapsed(), 1)
    report.save()
    print_tables(report.data)
    return 0 if not report.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
