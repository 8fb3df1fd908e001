"""Train tiny-shapes-dit: a class-conditioned DiTTransformer2DModel on the shared VAE's latents.

    python -m dmquant.zoo.train_vae             # first, once (~6 min)
    python -m dmquant.zoo.train_dit             # ~11 min on 2 idle CPU cores

Classes are the training (color, shape) pairs ("red circle", ...: 24 classes, the held-out pairs
have none); size, position and background vary freely. 10% of the labels are replaced by DiTPipeline's
null class (id 1000), the same id in every block, so classifier-free guidance works. Writes a
DiTPipeline folder (save_pretrained layout, safetensors, ``id2label``) to
dmquant/zoo/weights/tiny-shapes-dit/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from dmquant.zoo import _training, configs, data
from dmquant.zoo.train_sd import encode_latents, inference_scheduler

NAME = "tiny-shapes-dit"
NULL_CLASS = 1000  # hard-coded in diffusers' DiTPipeline


def class_names() -> list[str]:
    """The DiT's labels: "<color> <shape>" for every training pair, in a fixed order."""
    return [f"{c} {s}" for s in data.SHAPES for c in data.COLORS if (s, c) not in data.HELDOUT_PAIRS]


def main(argv=None) -> None:
    p = _training.base_parser(__doc__, steps=8000, batch_size=64, lr=1e-3, seed=4)
    p.add_argument("--num-scenes", type=int, default=30000)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--vae", type=Path, default=configs.WEIGHTS_DIR / "tiny-shapes-sd" / "vae")
    p.add_argument("--out", type=Path, default=configs.WEIGHTS_DIR / NAME)
    p.add_argument("--arch", type=json.loads, default={},
                   help="JSON object of model arguments that replace configs.DIT's")
    p.add_argument("--name", default=NAME, help="model name written in train_log.json")
    _training.add_budget_arguments(p)
    args = p.parse_args(argv)
    _training.seed_everything(args.seed, args.threads)
    vae = AutoencoderKL.from_pretrained(str(args.vae)).to(args.device).eval()
    names = class_names()
    images, captions = data.make_dataset(args.num_scenes, seed=args.seed, split="train", two_object_prob=0.0)
    labels = []
    for cap in captions:
        obj = data.parse_caption(cap).objects[0]
        labels.append(names.index(f"{obj.color} {obj.shape}"))
    labels_all = torch.tensor(np.array(labels)).to(args.device)
    lat_mean, lat_std = encode_latents(vae, _training.to_tensor_images(images).to(args.device))

    model = DiTTransformer2DModel(**{**configs.DIT, **args.arch}).to(args.device).train()
    for m in model.modules():  # drop labels ourselves, consistently across blocks
        if hasattr(m, "class_embedder"):
            m.class_embedder.dropout_prob = 0.0
    noise_sched = DDPMScheduler(**configs.NOISE_SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    log = _training.Logger(args.name, args.steps, args.log_every)
    for step in _training.budgeted_steps(opt, args.steps, args.lr, log, args.time_budget, cuts=args.schedule_cuts):
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen).to(args.device)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen).to(args.device)
        noise = torch.randn(x0.shape, generator=gen).to(args.device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen).to(args.device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = (torch.rand(args.batch_size, generator=gen) < args.class_dropout).to(args.device)
        y = torch.where(drop, torch.full_like(labels_all[idx], NULL_CLASS), labels_all[idx])
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.step(step, loss.item())

    for m in model.modules():
        if hasattr(m, "class_embedder"):
            m.class_embedder.dropout_prob = args.class_dropout
    id2label = {i: n for i, n in enumerate(names)}
    pipe = DiTPipeline(transformer=model.cpu().eval(), vae=vae.cpu(), scheduler=inference_scheduler(), id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # stored in model_index.json, passed back by from_pretrained
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    _training.write_train_log(args.out, args.name, args, log, steps_done=log.total)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
