"""Acceptance check of the zoo: the judge's zero-shot accuracy on generated images, and the FP grid.

    python -m dmquant.zoo.check [--num-images 200] [--out eval]

- tiny-shapes-sd: images from held-out captions (the 200 of calib/shapes_eval.txt, never seen in
  training) and from training-split captions;
- tiny-shapes-dit: a class model has no label for a held-out pair, so it is measured on
  training-split single-object captions (mapped to their "<color> <shape>" class), with the
  ``marginal`` accuracy (it is not told size, position or background);
- the judge itself on the procedural ground truth of the same captions (its ceiling).

Writes ``<out>/zoo_accuracy.json`` and ``<out>/zoo_fp_grid.png`` (the 12 prompts of
calib/shapes_grid.txt: ground truth, then 4 seeds of tiny-shapes-sd, then 2 seeds of tiny-shapes-dit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dmquant.zoo import data
from dmquant.zoo.prompt_sets import GRID_PROMPTS

# the evaluation protocol of eval/README.md
STEPS, GUIDANCE, SEED = 25, 5.0, 0


def accuracy_report(num_images: int = 200, batch_size: int = 50) -> dict:
    from dmquant import zoo
    from dmquant.metrics.generation import GenerationConfig, generate
    from dmquant.zoo.judge import attribute_accuracy

    judge = zoo.load("tiny-shapes-clip")
    cfg = GenerationConfig(num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, batch_size=batch_size)
    heldout = data.sample_captions(num_images, seed=7, split="heldout")
    train = data.sample_captions(num_images, seed=8, split="train")
    report: dict = {"protocol": cfg.to_dict(), "num_images": num_images}
    for name, caps in (("heldout", heldout), ("train", train)):
        truth = np.stack([data.render(data.parse_caption(c), SEED + i) for i, c in enumerate(caps)])
        report[f"judge_on_ground_truth_{name}"] = attribute_accuracy(judge, truth, caps)
    for model, caps, split in (("tiny-shapes-sd", heldout, "heldout"), ("tiny-shapes-sd", train, "train"),
                               ("tiny-shapes-dit", train, "train")):
        t = time.time()
        images = generate(zoo.load(model), caps, cfg, distributed=False)
        seconds = round(time.time() - t, 1)
        entry = attribute_accuracy(judge, images, caps) if model.endswith("-sd") else {}
        entry["marginal"] = attribute_accuracy(judge, images, caps, marginal=True)
        report[f"{model}_{split}"] = {**entry, "seconds_generation": seconds}
        print(model, split, report[f"{model}_{split}"], flush=True)
    return report


def fp_grid(prompts=GRID_PROMPTS, sd_seeds=4, dit_seeds=2) -> np.ndarray:
    from dmquant import zoo
    from dmquant.metrics.generation import GenerationConfig, generate
    from dmquant.metrics.images import captioned_rows

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
    args = p.parse_args(argv)
    from PIL import Image

    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fp_grid()).save(args.out / "zoo_fp_grid.png")
    print(f"wrote {args.out / 'zoo_fp_grid.png'}", flush=True)
    if not args.skip_accuracy:
        report = accuracy_report(args.num_images)
        (args.out / "zoo_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
