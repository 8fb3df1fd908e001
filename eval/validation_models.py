"""Validation models: siblings of the zoo models, trained separately, to decide recipes on more than one model.

    python eval/validation_models.py --list
    python eval/validation_models.py val-sd-wide [val-sd-small ...]   # train (one torch thread each)

Each sibling differs from its zoo model the way real models differ from each other (issue 18): width and
depth, text-encoder size, the caption dropout it was trained with (so the guidance scale it likes),
epsilon vs v-prediction, training length and seed. They share tiny-shapes-sd's VAE (the latent space of
the shapes task); their folders under eval/models/ link vae/ (and, for the flow model, the frozen text
encoders it was trained on) to the zoo's instead of copying them, so each weighs a few MiB and is
committed: the folders are the cache, retraining is only needed to check the recipe of a model.

Training is seeded and single-threaded, with a time budget: the step count that fitted is in each
folder's train_log.json (``steps_done``); ``--steps N`` without the budget reproduces the same weights
bit for bit on the same torch build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "eval" / "models"
ZOO = ROOT / "dmquant" / "zoo" / "weights"

# name -> (zoo training module, its zoo model, arguments, what differs from the zoo model)
VARIANTS: dict[str, tuple[str, str, list[str], str]] = {
    "val-sd-wide": (
        "dmquant.zoo.train_sd", "tiny-shapes-sd",
        ["--unet-arch", json.dumps(dict(block_out_channels=[64, 128, 128], layers_per_block=1,
                                        cross_attention_dim=96, attention_head_dim=16)),
         "--text-arch", json.dumps(dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                                        num_attention_heads=4, projection_dim=96)),
         "--prediction-type", "v_prediction", "--caption-dropout", "0.2", "--seed", "21",
         "--steps", "3000", "--time-budget", "1200"],
        "2x wider UNet with 1 layer per block, 3-layer 96-d text encoder, v-prediction, 20% caption dropout",
    ),
    "val-sd-small": (
        "dmquant.zoo.train_sd", "tiny-shapes-sd",
        ["--unet-arch", json.dumps(dict(block_out_channels=[32, 32, 64], layers_per_block=1, cross_attention_dim=32,
                                        attention_head_dim=8, use_linear_projection=True)),
         "--text-arch", json.dumps(dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, projection_dim=32)),
         "--caption-dropout", "0.05", "--seed", "22", "--steps", "1500", "--time-budget", "600"],
        "narrow UNet (32, 32, 64) with linear projections, 1-layer 32-d text encoder, 5% caption dropout, short training",
    ),
    "val-sd-deep": (
        "dmquant.zoo.train_sd", "tiny-shapes-sd",
        ["--unet-arch", json.dumps(dict(block_out_channels=[32, 64, 96], layers_per_block=2,
                                        transformer_layers_per_block=2, attention_head_dim=16)),
         "--text-arch", json.dumps(dict(num_hidden_layers=4)),
         "--color-word-dropout", "0", "--size-word-dropout", "0", "--lr", "5e-4", "--seed", "23",
         "--steps", "3000", "--time-budget", "1200"],
        "2 transformer layers per block and a 96-channel bottom, 4-layer text encoder, no attribute dropout, lr 5e-4",
    ),
    "val-dit-deep": (
        "dmquant.zoo.train_dit", "tiny-shapes-dit",
        ["--arch", json.dumps(dict(num_layers=6, num_attention_heads=6, attention_head_dim=16)),
         "--class-dropout", "0.15", "--seed", "24", "--steps", "3000", "--time-budget", "900"],
        "6 blocks of width 96 (the zoo DiT: 4 of width 128), 15% class dropout",
    ),
    "val-flux-small": (
        "dmquant.zoo.train_flux", "tiny-shapes-flux",
        ["--arch", json.dumps(dict(num_layers=4, num_attention_heads=4, attention_head_dim=16, qk_norm=None)),
         "--caption-dropout", "0.15", "--seed", "25", "--steps", "3000", "--time-budget", "900", "--ema", "0.998"],
        "4 joint blocks, 4 heads of 16, no QK norm, 15% caption dropout",
    ),
}

# components a sibling shares with its zoo model, linked instead of copied (the same bytes)
# (the DiT sibling trains on tiny-shapes-sd's VAE, so it links that one: see build)
SHARED = {"tiny-shapes-sd": ("vae",),
          "tiny-shapes-flux": ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3")}


def path(name: str) -> Path:
    """The folder of a validation model (a diffusers pipeline folder); raises if it was not built."""
    if name not in VARIANTS:
        raise KeyError(f"unknown validation model {name!r}: choose from {', '.join(VARIANTS)}")
    folder = MODELS_DIR / name
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is missing: build it with `python eval/validation_models.py {name}`")
    return folder


def _content(f: Path):
    """A file's bytes; for a JSON config its data without ``_name_or_path`` (where it was loaded from)."""
    if f.suffix == ".json":
        data = json.loads(f.read_text())
        data.pop("_name_or_path", None)
        return data
    return f.read_bytes()


def _link_shared(folder: Path, zoo_model: str) -> None:
    for sub in SHARED[zoo_model]:
        target = folder / sub
        source = ZOO / zoo_model / sub
        if not target.is_dir() or target.is_symlink():
            continue
        same = all((source / f.name).is_file() and _content(source / f.name) == _content(f)
                   for f in target.iterdir() if f.is_file())
        if same:
            shutil.rmtree(target)
            target.symlink_to(os.path.relpath(source, folder))


def _store_half(folder: Path) -> None:
    """Float32 weights of the trained components (not the linked ones) rewritten in float16."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*/*.safetensors"):
        if f.parent.is_symlink():
            continue
        state = load_file(str(f))
        save_file({k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in state.items()},
                  str(f), metadata={"format": "pt"})


def build(name: str, threads: int = 1) -> Path:
    module, zoo_model, args, _ = VARIANTS[name]
    out = MODELS_DIR / name
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it first to retrain")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp-train")
    cmd = [sys.executable, "-m", module, *args, "--threads", str(threads), "--out", str(tmp)]
    if module.endswith("train_sd"):
        cmd += ["--name", name, "--vae", str(ZOO / zoo_model / "vae")]
    elif module.endswith("train_dit"):
        cmd += ["--name", name, "--vae", str(ZOO / "tiny-shapes-sd" / "vae")]
    else:
        cmd += ["--name", name]
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    _link_shared(tmp, "tiny-shapes-sd" if zoo_model == "tiny-shapes-dit" else zoo_model)
    _store_half(tmp)
    tmp.rename(out)
    print(f"{name}: built in {time.time() - t0:.0f} s -> {out}", flush=True)
    return out


def check(name: str, num_images: int = 100, guidance: float = 5.0) -> dict:
    """The judge's shape / color accuracy of a model (zoo or validation) on held-out captions (the zoo check's
    captions and seeds; the class-conditioned DiTs: training-pair classes, marginal accuracy)."""
    from diffusers import DiffusionPipeline

    from dmquant import zoo
    from dmquant.generation import GenerationConfig, generate
    from dmquant.zoo import data
    from dmquant.zoo.judge import JUDGE, attribute_accuracy

    folder = zoo.path(name) if name.startswith("tiny-") else path(name)
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    judge = zoo.load(JUDGE)
    dit = "dit" in name
    caps = data.sample_captions(num_images, seed=8 if dit else 7, split="train" if dit else "heldout")
    inputs = caps
    if dit:
        from dmquant.diffusers_io import class_id

        inputs = [class_id(pipe, c) for c in caps]
    cfg = GenerationConfig(guidance_scale=guidance, batch_size=50, progress=False)
    t0 = time.time()
    images = generate(pipe, inputs, cfg, distributed=False)
    result = attribute_accuracy(judge, images, caps, marginal=True) if dit else attribute_accuracy(judge, images, caps)
    return {"model": name, "guidance": guidance, "num_images": num_images, **result,
            "seconds_generation": round(time.time() - t0, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*")
    p.add_argument("--list", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check", action="store_true", help="measure the judge's accuracy of the named models instead")
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--guidance", default="3,5,7.5")
    a = p.parse_args(argv)
    if a.check:
        import torch

        torch.set_num_threads(a.threads)
        for name in a.names:
            for g in a.guidance.split(","):
                print(json.dumps(check(name, a.num_images, float(g))), flush=True)
        return
    if a.list or not a.names:
        for name, (_, zoo_model, _, what) in VARIANTS.items():
            built = (MODELS_DIR / name / "model_index.json").is_file()
            print(f"{name:16s} sibling of {zoo_model:16s} {'built' if built else 'not built':9s} {what}")
        return
    for name in a.names:
        if name not in VARIANTS:
            sys.exit(f"error: unknown validation model {name!r}: choose from {', '.join(VARIANTS)}")
    for name in a.names:
        build(name, a.threads)


if __name__ == "__main__":
    main()
