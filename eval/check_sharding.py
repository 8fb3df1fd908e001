"""Check that generation sharded with accelerate gives the same images as one process.

    python eval/check_sharding.py --out /tmp/one.npy
    accelerate launch --multi_gpu --num_processes 2 eval/check_sharding.py --out /tmp/two.npy   # 2 CPU processes
    accelerate launch --cpu --num_processes 2 eval/check_sharding.py --out /tmp/cpu.npy      # one process (*)
    python eval/check_sharding.py --compare /tmp/one.npy /tmp/two.npy

(*) accelerate 1.15 starts a single process for ``--cpu`` unless ``--mpirun_hostfile`` is given; on a
machine without GPUs ``--multi_gpu`` starts torchrun processes that form a gloo group.

Also runs ``dmquant.metrics.evaluate`` under the launcher when ``--evaluate DIR`` is given, so the
metrics of a 1-process and a 2-process run can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-shapes-sd")
    p.add_argument("--prompts", default="calib/shapes_eval.txt")
    p.add_argument("--num-images", type=int, default=12)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out")
    p.add_argument("--evaluate", help="also run evaluate() into this folder")
    p.add_argument("--compare", nargs=2)
    args = p.parse_args()
    if args.compare:
        a, b = (np.load(f) for f in args.compare)
        same = a.shape == b.shape and np.array_equal(a, b)
        print(f"{args.compare[0]} vs {args.compare[1]}: shapes {a.shape} {b.shape}, identical: {same}")
        return 0 if same else 1

    import torch
    from accelerate import PartialState

    from dmquant import zoo
    from dmquant.metrics import GenerationConfig, evaluate, generate, read_prompts

    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    cfg = GenerationConfig(num_inference_steps=args.steps, batch_size=args.batch_size, progress=False)
    prompts = read_prompts(args.prompts, args.num_images)
    images = generate(zoo.load(args.model), prompts, cfg)
    if state.is_main_process and args.out:
        np.save(args.out, images)
        print(f"[{state.num_processes} process(es)] saved {images.shape} to {args.out}")
    if args.evaluate:
        m = evaluate(args.model, prompts, args.num_images, args.evaluate, reference=args.model, config=cfg)
        if state.is_main_process:
            print(json.dumps({k: m[k] for k in ("clip_score", "fid", "psnr_vs_reference", "ssim_vs_reference")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
