"""Acceptance check of the zoo: the judge's zero-shot accuracy on generated images, and the FP grid.

    python -m dmquant.zoo.check [--num-images 200] [--out eval]
    python -m dmquant.zoo.check --sd <folder> --models sd --skip-grid --out <dir>   # a retraining trial
    python -m dmquant.zoo.check --flux <folder> --models flux --skip-grid --out <dir>

- tiny-shapes-sd: images from held-out captions (the 200 of calib/shapes_eval.txt, never seen in
  training) and from training-split captions;
- tiny-shapes-flux: like tiny-shapes-sd (held-out and training-split captions), its own scheduler
  (FlowMatchEulerDiscreteScheduler) at the same steps and guidance scale;
- tiny-shapes-dit: a class model has no label for a held-out pair, so it is measured on
  training-split single-object captions (mapped to their "<color> <shape>" class), with the
  ``marginal`` accuracy (it is not told size, position or background);
- the judge itself on the procedural ground truth of the same captions (its ceiling), and on the
  ground truth passed through tiny-shapes-sd's VAE (what its decoder can show at best).

Writes ``<out>/zoo_accuracy.json`` and ``<out>/zoo_fp_grid.png`` (the 12 prompts of
calib/shapes_grid.txt: ground truth, then 4 seeds of tiny-shapes-sd, then 2 seeds of tiny-shapes-dit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image

from dmquant import zoo
from dmquant.generation import GenerationConfig, generate
from dmquant.metrics.images import captioned_rows
from dmquant.zoo import data
from dmquant.zoo.judge import JUDGE, attribute_accuracy
from dmquant.zoo.prompt_sets import GRID_PROMPTS

# the evaluation protocol of eval/README.md
STEPS, GUIDANCE, SEED = 25, 5.0, 0


def vae_round_trip(vae, truth: np.ndarray) -> np.ndarray:
    """Ground-truth scenes through the VAE (posterior mode, then decode): what the decoder can show."""
    x = torch.from_numpy(truth).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


def accuracy_report(num_images: int = 200, batch_size: int = 50, sd=None, models=("sd", "dit", "flux"),
                    flux=None, caption_seeds: tuple[int, int] = (7, 8), seed: int = SEED) -> dict:
    """The judge's accuracy on generated images (and on the ground truth and its VAE round trip).

    ``sd`` / ``flux``: a pipeline to measure instead of the zoo's tiny-shapes-sd / tiny-shapes-flux (a trial).
    ``caption_seeds``: the seeds of the held-out and the training-split captions (the protocol's are 7 and 8);
    ``seed``: image i is generated (and its ground truth rendered) from ``seed + i``."""
    judge = zoo.load(JUDGE)
    cfg = GenerationConfig(num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=seed, batch_size=batch_size)
    heldout = data.sample_captions(num_images, seed=caption_seeds[0], split="heldout")
    train = data.sample_captions(num_images, seed=caption_seeds[1], split="train")
    report: dict = {"protocol": cfg.to_dict(), "num_images": num_images}
    pipes = {"tiny-shapes-sd": sd if sd is not None else zoo.load("tiny-shapes-sd")} if "sd" in models else {}
    if "dit" in models:
        pipes["tiny-shapes-dit"] = zoo.load("tiny-shapes-dit")
    if "flux" in models:
        pipes["tiny-shapes-flux"] = flux if flux is not None else zoo.load("tiny-shapes-flux")
    for name, caps in (("heldout", heldout), ("train", train)):
        truth = np.stack([data.render(data.parse_caption(c), seed + i) for i, c in enumerate(caps)])
        report[f"judge_on_ground_truth_{name}"] = attribute_accuracy(judge, truth, caps)
        vae_pipe = pipes.get("tiny-shapes-sd") or pipes.get("tiny-shapes-flux")  # the same VAE weights
        if vae_pipe is not None:
            rec = vae_round_trip(vae_pipe.vae, truth)
            report[f"judge_on_vae_round_trip_{name}"] = attribute_accuracy(judge, rec, caps)
    runs = [("tiny-shapes-sd", heldout, "heldout"), ("tiny-shapes-sd", train, "train"), ("tiny-shapes-dit", train, "train"),
            ("tiny-shapes-flux", heldout, "heldout"), ("tiny-shapes-flux", train, "train")]
    for model, caps, split in [r for r in runs if r[0] in pipes]:
        t = time.time()
        images = generate(pipes[model], caps, cfg, distributed=False)
        seconds = round(time.time() - t, 1)
        entry = attribute_accuracy(judge, images, caps) if not model.endswith("-dit") else {}
        entry["marginal"] = attribute_accuracy(judge, images, caps, marginal=True)
        report[f"{model}_{split}"] = {**entry, "seconds_generation": seconds}
        print(model, split, report[f"{model}_{split}"], flush=True)
    return report


def fp_grid(prompts=GRID_PROMPTS, sd_seeds=4, dit_seeds=2) -> np.ndarray:
    sd, dit = zoo.load("tiny-shapes-sd"), zoo.load("tiny-shapes-dit")
    rows, labels = [], []
    for k, p in enumerate(prompts):
        truth = data.render(data.parse_caption(p), None)[None]
        cfg = GenerationConfig(num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, progress=False)
        sd_imgs = generate(sd, [p] * sd_seeds, cfg, distributed=False)
        first = data.parse_caption(p).objects[0]
        if (first.shape, first.color) in data.HELDOUT_PAIRS:
            dit_imgs = np.full((dit_seeds, *truth.shape[1:]), 255, dtype=np.uint8)  # no DiT class for held-out pairs
        else:
            dit_imgs = generate(dit, [p] * dit_seeds, cfg, distributed=False)
        rows.append(np.concatenate([truth, sd_imgs, dit_imgs]))
        tag = " [held out]" if data.parse_caption(p).heldout else ""
        labels.append(f"{k + 1:2d}. {p}{tag}")
    return captioned_rows(rows, labels, scale=3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--models", default="sd,dit,flux", help="which of sd, dit, flux to measure")
    p.add_argument("--sd", type=Path, default=None,
                   help="a tiny-shapes-sd folder to measure instead of the zoo's (e.g. a retraining trial)")
    p.add_argument("--flux", type=Path, default=None, help="a tiny-shapes-flux folder to measure instead of the zoo's")
    p.add_argument("--caption-seeds", default="7,8",
                   help="seeds of the held-out and the training-split captions (the protocol's: 7,8; others measure "
                        "the models on captions they were not checked on)")
    p.add_argument("--seed", type=int, default=SEED, help="image i is generated from seed + i (the protocol's: 0)")
    args = p.parse_args(argv)
    try:
        caption_seeds = tuple(int(x) for x in args.caption_seeds.split(","))
    except ValueError:
        caption_seeds = ()
    if len(caption_seeds) != 2:
        p.error(f"--caption-seeds takes two integers (held-out, training split), e.g. 7,8; got {args.caption_seeds!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_grid:
        Image.fromarray(fp_grid()).save(args.out / "zoo_fp_grid.png")
        print(f"wrote {args.out / 'zoo_fp_grid.png'}", flush=True)
    if not args.skip_accuracy:
        sd = None
        if args.sd is not None:
            sd = StableDiffusionPipeline.from_pretrained(str(args.sd))
            sd.set_progress_bar_config(disable=True)
        flux = None
        if args.flux is not None:
            flux = StableDiffusion3Pipeline.from_pretrained(str(args.flux))
            flux.set_progress_bar_config(disable=True)
        report = accuracy_report(args.num_images, sd=sd, models=tuple(args.models.split(",")), flux=flux,
                                 caption_seeds=caption_seeds, seed=args.seed)
        if args.sd is not None:
            report["sd_folder"] = str(args.sd)
        if args.flux is not None:
            report["flux_folder"] = str(args.flux)
        (args.out / "zoo_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
