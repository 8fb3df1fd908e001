"""Memory of a quantized SD1.5 UNet: bytes on disk, bits per weight, and peak RSS while loading.

The UNet is the full SD1.5 architecture built from its config with random weights. Each format is
saved to a temporary folder and loaded back in a fresh process (peak RSS growth during the load):

* fp32 / fp16: diffusers ``save_pretrained`` and ``UNet2DConditionModel.from_pretrained``;
* W8 (per channel) and W4 (groups of 64): dmquant's saved quantized denoiser, loaded with
  ``dmquant.load_quantized_denoiser`` (built on the meta device, tensors assigned in place).

Peak RSS is read from /proc (VmHWM of the fresh process, minus its RSS before the load): once right
after the load (safetensors maps the file, so pages become resident as they are read), and once
after every tensor has been read, which is the honest figure for a model about to run.

    python eval/bench_memory.py [--out eval/bench_memory.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import dmquant
from dmquant.bench import folder_bytes, peak_rss_while_loading
from dmquant.models.full_size import sd15_unet
from dmquant.nn.wrap import quant_layers
from dmquant.serialization import save_quantized_denoiser

FORMATS = {
    "W8 (per channel)": {"name": "w8", "weights": {"bits": 8}, "activations": None},
    "W4 (group 64)": {"name": "w4g64", "weights": {"bits": 4, "granularity": "group", "group_size": 64},
                      "activations": None},
}


def measure_diffusers(dtype: torch.dtype, root: Path) -> dict:
    folder = root / str(dtype).split(".")[-1]
    sd15_unet(dtype=dtype).save_pretrained(folder)
    load = peak_rss_while_loading(str(folder), "dmquant.bench:load_diffusers_unet")
    return {"bytes": folder_bytes(folder), **load}


def measure_quantized(recipe: dict, root: Path) -> dict:
    unet = sd15_unet()
    dmquant.quantize(unet, recipe, progress=False)
    dmquant.freeze(unet)
    qweights = [q for _, m in quant_layers(unet) for q in m.qweights]
    q_bytes = sum(q.nbytes() for q in qweights)
    q_weights = sum(torch.Size(q.shape).numel() for q in qweights)
    folder = root / recipe["name"]
    save_quantized_denoiser(unet, folder, dmquant.load_recipe(recipe))
    load = peak_rss_while_loading(str(folder), "dmquant.serialization:load_quantized_denoiser")
    return {"bytes": folder_bytes(folder), "bits_per_weight": round(q_bytes * 8 / q_weights, 3),
            "quantized_fraction": round(q_weights / sum(p.numel() for p in sd15_unet().parameters()), 4), **load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, dtype in (("FP32", torch.float32), ("FP16", torch.float16)):
            rows[name] = measure_diffusers(dtype, root)
            print(name, rows[name], flush=True)
        for name, recipe in FORMATS.items():
            rows[name] = measure_quantized(recipe, root)
            print(name, rows[name], flush=True)
    fp32 = rows["FP32"]["bytes"]
    mib = 1 << 20
    print("\n| format | file (MiB) | vs FP32 | bits/weight (quantized layers) | peak RSS: load (MiB) | "
          "peak RSS: load + every tensor read (MiB) | that / file |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        resident = r["peak_rss_resident_bytes"]
        print(f"| {name} | {r['bytes'] / mib:.0f} | {r['bytes'] / fp32:.1%} | {r.get('bits_per_weight', '-')} | "
              f"{r['peak_rss_load_bytes'] / mib:.0f} | {resident / mib:.0f} | {resident / r['bytes']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
