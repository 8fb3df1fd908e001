"""Latency per denoising step and memory of a denoiser (``dmquant bench``), on synthetic inputs.

Speed does not depend on the input values, so a step is timed on random latents of the model's
own shape, with a classifier-free-guidance batch of 2 by default.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from dmquant.errors import DMQuantError
from dmquant.loading import load_pipeline
from dmquant.models.adapters import find_denoiser


def denoiser_inputs(denoiser: torch.nn.Module, batch: int = 2, latent_size: int | None = None,
                    text_tokens: int = 77, seed: int = 0) -> tuple[tuple, dict]:
    """One step's ``(args, kwargs)`` for a UNet2DConditionModel (SD1.5/SDXL), a DiT, a PixArt or a FLUX
    transformer (``latent_size`` latent pixels a side, packed 2x2 into tokens for FLUX)."""
    cfg = denoiser.config
    size = latent_size or cfg.sample_size
    g = torch.Generator().manual_seed(seed)
    param = next(denoiser.parameters())
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(param.device, param.dtype)
    t = torch.full((batch,), 500, dtype=torch.long)
    name = type(denoiser).__name__
    if name.startswith("UNet2DCondition"):
        ctx = torch.randn(batch, text_tokens, cfg.cross_attention_dim, generator=g).to(x)
        kwargs = {"encoder_hidden_states": ctx}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and the size/crop conditioning
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            time_ids = torch.tensor([size * 8, size * 8, 0, 0, size * 8, size * 8], dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g).to(x),
                                           "time_ids": time_ids.repeat(batch, 1).to(x)}
        return (x, t), kwargs
    if name == "FluxTransformer2DModel":  # packed 2x2 latents: ``size`` x ``size`` latent pixels
        side = size // 2
        tokens = torch.randn(batch, side * side, cfg.in_channels, generator=g).to(x)
        ctx = torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(x)
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        kwargs = {"encoder_hidden_states": ctx, "timestep": torch.full((batch,), 0.5).to(x),
                  "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(x),
                  "img_ids": img_ids.reshape(-1, 3).to(x), "txt_ids": torch.zeros(text_tokens, 3).to(x),
                  "guidance": torch.full((batch,), 3.5).to(x) if cfg.guidance_embeds else None}
        return (tokens,), kwargs
    if name == "DiTTransformer2DModel":
        return (x,), {"timestep": t, "class_labels": torch.arange(batch) % 10}
    if name == "PixArtTransformer2DModel":
        ctx = torch.randn(batch, text_tokens, cfg.caption_channels, generator=g).to(x)
        added = {"resolution": None, "aspect_ratio": None}
        return (x,), {"encoder_hidden_states": ctx, "timestep": t, "added_cond_kwargs": added}
    raise DMQuantError(f"dmquant bench does not know the inputs of {name}")


@torch.no_grad()
def time_step(denoiser: torch.nn.Module, inputs: tuple[tuple, dict], warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock seconds of one denoiser call (synchronised when the denoiser is on a GPU)."""
    args, kwargs = inputs
    device = next(denoiser.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        denoiser(*args, **kwargs)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        denoiser(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def peak_rss_while_loading(model: str, loader: str = "dmquant.loading:load_pipeline") -> dict:
    """Load ``model`` with ``loader`` (``module:function``) in a fresh process; the load's peak RSS growth."""
    module, function = loader.split(":")
    code = (
        "import importlib, json, sys\n"
        "import torch, diffusers  # imported before measuring: their memory is not the model's\n"
        f"load = getattr(importlib.import_module({module!r}), {function!r})\n"
        "def status(key):  # VmRSS: now; VmHWM: peak of this address space (ru_maxrss survives exec)\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
        "    return int(line.split()[1])\n"
        "before = status('VmRSS:')\n"
        "model = load(sys.argv[1])\n"
        "after = status('VmHWM:')\n"
        "parts = model.components.values() if hasattr(model, 'components') else [model]\n"
        "tensors = [t for p in parts if isinstance(p, torch.nn.Module) for t in p.state_dict().values()]\n"
        "tensors += [t for t in (model.values() if isinstance(model, dict) else []) if torch.is_tensor(t)]\n"
        "for t in tensors:  # read every page of every tensor: memory-mapped weights become resident\n"
        "    t.reshape(-1)[::512].sum()\n"
        "touched = status('VmHWM:')\n"
        "print(json.dumps({'before_kib': before, 'after_kib': after, 'touched_kib': touched}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise DMQuantError(f"loading {model} failed: {out.stderr.strip().splitlines()[-1]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_rss_load_bytes": max(0, data["after_kib"] - data["before_kib"]) * 1024,
            "peak_rss_resident_bytes": max(0, data["touched_kib"] - data["before_kib"]) * 1024}


def denoiser_weight_bytes(denoiser: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in denoiser.state_dict().values())


def bench_model(model: str, batch: int = 2, latent_size: int | None = None, repeats: int = 3,
                measure_load: bool = True) -> dict:
    """Latency of one denoising step, and memory, of a model or saved quantized folder."""
    pipe = load_pipeline(model)
    _, denoiser, _ = find_denoiser(pipe)
    inputs = denoiser_inputs(denoiser, batch, latent_size)
    report = {"model": model, "batch": batch, "latent_size": inputs[0][0].shape[-1],
              "threads": torch.get_num_threads(),
              "seconds_per_step": round(time_step(denoiser, inputs, repeats=repeats), 4),
              "denoiser_bytes": denoiser_weight_bytes(denoiser)}
    if Path(model).is_dir():
        report["folder_bytes"] = folder_bytes(model)
    if measure_load:
        report.update(peak_rss_while_loading(model))
    return report


def format_report(report: dict) -> str:
    mib = 1 << 20
    lines = [f"model            {report['model']}",
             f"step latency     {report['seconds_per_step'] * 1000:.1f} ms  (batch {report['batch']}, "
             f"{report['latent_size']}x{report['latent_size']} latents, {report['threads']} threads)",
             f"denoiser memory  {report['denoiser_bytes'] / mib:.1f} MiB"]
    if "folder_bytes" in report:
        lines.append(f"on disk          {report['folder_bytes'] / mib:.1f} MiB (whole folder)")
    if "peak_rss_load_bytes" in report:
        lines.append(f"peak RSS (load)  {report['peak_rss_load_bytes'] / mib:.1f} MiB")
    return "\n".join(lines)


def load_diffusers_unet(folder: str):
    """A plain diffusers UNet from a folder, in the dtype it was saved in (memory-benchmark baseline)."""
    path = next(Path(folder).glob("*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype)


COMPILE_REGIONS = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D", "FluxTransformerBlock",
                   "FluxSingleTransformerBlock")


def compile_regions(model: torch.nn.Module, regions=COMPILE_REGIONS) -> list[torch.nn.Module]:
    """Regional compilation (as diffusers' ``compile_repeated_blocks``): each transformer, ResNet and
    resampling block is compiled in place (``nn.Module.compile``), so alike blocks share compiled code and
    compiling takes a fraction of a whole-model compile; the blocks hold nearly all the FLOPs. Returns the
    compiled blocks (see :func:`uncompile`)."""
    blocks = [m for m in model.modules() if type(m).__name__ in regions]
    for m in blocks:
        m.compile(dynamic=False)
    return blocks


def uncompile(blocks: list[torch.nn.Module]) -> None:
    """Undo :func:`compile_regions`."""
    for m in blocks:
        m._compiled_call_impl = None

