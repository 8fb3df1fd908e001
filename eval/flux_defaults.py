"""tiny-shapes-flux (SD3-style MMDiT): which layers to keep in full precision, and whether the joint
attention's text and image tokens need separate activation ranges, measured (issue 13).

``--sets``: each row is a shipped recipe with one more group of layers kept in full precision on top of
the SD3 adapter's defaults, measured with the protocol of eval/ablate_time.py (64 held-out captions,
25 Euler steps, guidance 5, PSNR / SSIM / CLIP against FP of the same seeds; cached in
eval/ablation_outliers/ beside the other flux rows). Weight bytes: the transformer's Linear / Conv2d
weights with the quantized layers as stored (codes and scales) and the full-precision ones in 16 bits.

    OMP_NUM_THREADS=1 python eval/flux_defaults.py --recipes w8a8,w4a8-rtn --sets default,adaln,text,adaln+text
    OMP_NUM_THREADS=1 python eval/flux_defaults.py --ranges --recipes w8a8

``--ranges``: the joint attention's Q / K / V concatenate the image tokens (first 64) and the text
tokens. Per module, the min / max of each part over the calibration runs (full precision), then the
recipe with every joint attention's Q / K / V quantizer replaced by the same 8-bit asymmetric min-max
fake quantizer with one range for all tokens (``joint``) or one per part (``separate``): PSNR against FP.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_time import (  # noqa: E402
    MODELS,
    calib_inputs,
    fingerprint,
    generate,
    prompts_for,
    reference_images,
    run_config,
)

import dmquant  # noqa: E402
from dmquant.config import QuantConfig, load_recipe  # noqa: E402
from dmquant.metrics.fidelity import fidelity_metrics  # noqa: E402
from dmquant.models.adapters import find_denoiser  # noqa: E402
from dmquant.nn.wrap import selected  # noqa: E402
from dmquant.quantizers.qtensor import weight_storage_bytes  # noqa: E402

OUT = Path(__file__).resolve().parent / "ablation_outliers"
ADALN = ("*.norm1.linear", "*.norm1_context.linear")
TEXT = ("*.add_q_proj", "*.add_k_proj", "*.add_v_proj", "*.to_add_out", "*.ff_context.*")
SETS = {"default": (), "adaln": ADALN, "text": TEXT, "adaln+text": ADALN + TEXT}
W8_SETS = {"adaln-w8": ADALN}  # these layers quantized with 8-bit weights instead (a ``layers`` override)
LAYERS = (nn.Linear, nn.Conv2d)
IMAGE_TOKENS = 64  # 8 x 8 latents, patch 1: the image part comes first in SD3's joint attention


def weight_bytes(denoiser: nn.Module, config, adapter) -> int:
    """Stored weight bytes: quantized layers as packed codes + scales, full-precision layers in 16 bits."""
    total = 0
    for name, m in denoiser.named_modules():
        if type(m) not in LAYERS:
            continue
        if selected(name, config, adapter):
            w, _ = config.layer_sections(name)
            total += weight_storage_bytes(m.weight.shape, w.bits, w.granularity, w.group_size, w.symmetric)
        else:
            total += 2 * m.weight.numel()
    return total


def set_config(base: QuantConfig, recipe: str, name: str) -> QuantConfig:
    """``base`` with the layers of the set ``name`` in full precision (or, for ``W8_SETS``, at 8-bit weights)."""
    if name in W8_SETS:
        data = {**base.to_dict(), "name": f"{recipe}-{name}"}
        data["layers"] = {pattern: {"weights": {"bits": 8}} for pattern in W8_SETS[name]}
        return QuantConfig.from_dict(data)
    return replace(base, name=f"{recipe}-fp-{name}", exclude=base.exclude + SETS[name])


def run_sets(recipes: list[str], sets: list[str], n: int, calib_prompts: int) -> None:
    _, den, adapter = find_denoiser(dmquant.zoo.load(MODELS["flux"]))
    for recipe in recipes:
        for name in sets:
            config = set_config(load_recipe(recipe), recipe, name)
            variant = f"{recipe}+{name}" if name in W8_SETS else f"{recipe}+fp:{name}"
            r = run_config("flux", config, variant, config.name, n, calib_prompts, out=OUT)
            print(f"flux {recipe} {name}: PSNR {r['psnr_vs_reference']:.2f} "
                  f"SSIM {r['ssim_vs_reference']:.4f} CLIP {r['clip_score']:.2f} (FP {r['clip_score_fp']:.2f}) "
                  f"weights {weight_bytes(den, config, adapter) / 1024:.1f} KiB "
                  f"(all 16-bit {sum(2 * m.weight.numel() for m in den.modules() if type(m) in LAYERS) / 1024:.1f}) "
                  f"calib {r['calibration_seconds']}s", flush=True)


# -- the joint attention's ranges ----------------------------------------------------------------------
class _SDPARecorder(TorchFunctionMode):
    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.sink.append(args[:3])
        return func(*args, **(kwargs or {}))


class _Recording:
    """Processor wrapper: per call, the per-part (image, text) min / max of Q, K, V."""

    def __init__(self, processor, stats: dict):
        self.processor, self.stats = processor, stats

    def __call__(self, attn, *args, **kwargs):
        sink: list = []
        with _SDPARecorder(sink):
            out = self.processor(attn, *args, **kwargs)
        for q, k, v in sink:
            for key, x in zip("qkv", (q, k, v)):
                for part, y in (("image", x[..., :IMAGE_TOKENS, :]), ("text", x[..., IMAGE_TOKENS:, :])):
                    lo, hi = self.stats.get((key, part), (float("inf"), float("-inf")))
                    self.stats[(key, part)] = (min(lo, float(y.min())), max(hi, float(y.max())))
        return out


def record_ranges(pipe, prompts: list[str], steps: int = 25) -> dict[str, dict]:
    """{attention module: {(q|k|v, image|text): (min, max)}} over full-precision runs of ``prompts``."""
    _, den, _ = find_denoiser(pipe)
    stats: dict[str, dict] = {}
    originals = {}
    for name, m in den.named_modules():
        if hasattr(m, "processor") and hasattr(m, "add_q_proj"):
            stats[name] = {}
            originals[name] = m.processor
            m.processor = _Recording(m.processor, stats[name])
    try:
        for i in range(0, len(prompts), 8):
            pipe(prompts[i:i + 8], num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                 generator=torch.Generator().manual_seed(i))
    finally:
        for name, proc in originals.items():
            den.get_submodule(name).processor = proc
    return stats


class SegmentQuant(nn.Module):
    """8-bit asymmetric fake quantization of ``[B, H, S, D]`` with a static range per token part."""

    def __init__(self, ranges: list[tuple[float, float]], split: int | None, bits: int = 8):
        super().__init__()
        self.ranges, self.split, self.levels = ranges, split, 2**bits - 1

    def _quant(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        scale = max(hi - lo, 1e-8) / self.levels
        zero = round(-lo / scale)
        return (torch.clamp(torch.round(x / scale) + zero, 0, self.levels) - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self._quant(x, *self.ranges[0])
        return torch.cat([self._quant(x[..., :self.split, :], *self.ranges[0]),
                          self._quant(x[..., self.split:, :], *self.ranges[1])], dim=-2)


def install_ranges(den: nn.Module, stats: dict, mode: str) -> None:
    """Every joint attention's Q / K / V quantizer: ``joint`` or ``separate`` ranges, or ``full precision``."""
    for name, parts in stats.items():
        quant = den.get_submodule(name).dmq_quant
        for key in "qkv":
            img, txt = parts[(key, "image")], parts[(key, "text")]
            if mode == "full precision":
                setattr(quant, key, nn.Identity())
            elif mode == "separate":
                setattr(quant, key, SegmentQuant([img, txt], IMAGE_TOKENS))
            else:
                setattr(quant, key, SegmentQuant([(min(img[0], txt[0]), max(img[1], txt[1]))], None))


def run_ranges(recipe: str, n: int, calib_prompts: int) -> None:
    weights = fingerprint("flux")
    ref = reference_images("flux", n, weights, OUT)
    calib, prompts = prompts_for("flux", n)
    pipe = dmquant.zoo.load(MODELS["flux"])
    config = load_recipe(recipe)
    calib = calib[: config.calibration.max_prompts]
    stats = record_ranges(pipe, list(calib))
    for name, parts in stats.items():
        cells = ", ".join(f"{k} {p} [{lo:.2f}, {hi:.2f}]" for (k, p), (lo, hi) in sorted(parts.items()))
        print(f"{name}: {cells}", flush=True)
    dmquant.quantize(pipe, config, prompts=calib_inputs(pipe, "flux", calib), progress=False,
                     guidance_scale=5.0)
    _, den, _ = find_denoiser(pipe)
    print(f"flux {recipe} (dmquant's calibrated joint ranges): PSNR "
          f"{fidelity_metrics(generate(pipe, prompts), ref)['psnr_vs_reference']:.2f}", flush=True)
    for mode in ("joint", "separate", "full precision"):
        install_ranges(den, stats, mode)
        metrics = fidelity_metrics(generate(pipe, prompts), ref)
        print(f"flux {recipe} joint attention Q/K/V {mode if mode != 'full precision' else 'in'} "
              f"{'min-max image/text ranges' if mode != 'full precision' else 'full precision'}: "
              f"PSNR {metrics['psnr_vs_reference']:.2f} SSIM {metrics['ssim_vs_reference']:.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="w8a8,w4a8-rtn")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--ranges", action="store_true")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--calib-prompts", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.ranges:
        for recipe in args.recipes.split(","):
            run_ranges(recipe, args.num_images, args.calib_prompts)
        return
    sets = args.sets.split(",")
    unknown = [s for s in sets if s not in SETS and s not in W8_SETS]
    if unknown:
        raise SystemExit(f"unknown sets {unknown}: use {', '.join([*SETS, *W8_SETS])}")
    run_sets(args.recipes.split(","), sets, args.num_images, args.calib_prompts)


if __name__ == "__main__":
    main()
