"""Train the zoo LoRA ``tiny-shapes-sd-lora``: colors rotate (see ``dmquant.zoo.lora_effect``).

    python -m dmquant.zoo.train_lora --time-budget 780    # the shipped LoRA: 722 steps, 822 s (train_log.json)
    python -m dmquant.zoo.train_lora --steps 722          # the same step count without the budget

One torch thread by default: on the two shared cores of the development machine two threads ran 1.7 to
25 s per step against 1.1 to 1.6 s for one (other jobs took the second core).

A rank-8 LoRA (PEFT, Gaussian init, alpha = rank) on every attention projection (self and cross:
to_q, to_k, to_v, to_out.0) and feed-forward layer (ff.net.0.proj, ff.net.2) of tiny-shapes-sd's UNet;
the UNet's own weights, the text encoder and the VAE stay frozen. The targets are training-split scenes
rendered with every object's color rotated (:func:`dmquant.zoo.lora_effect.rotate_scene`) under their
unchanged captions, with the UNet's own loss (epsilon prediction on the SD noise schedule, 10% empty
captions so that classifier-free guidance keeps working). Writes diffusers' LoRA format
(``StableDiffusionPipeline.save_lora_weights``: ``pytorch_lora_weights.safetensors``, which
``pipe.load_lora_weights(folder)`` reads), ``lora.json`` (what it does) and ``train_log.json`` (with the
judge's effect rate on a few held-out prompts) to dmquant/zoo/weights/tiny-shapes-sd-lora/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from dmquant import zoo
from dmquant.generation import GenerationConfig, generate
from dmquant.prompts import read_prompts
from dmquant.zoo import _training, configs, data, lora_effect
from dmquant.zoo.train_sd import encode_latents

NAME = lora_effect.LORA_NAME
BASE = "tiny-shapes-sd"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "calib" / "shapes_eval.txt"


def rotated_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` training-split scenes rendered with rotated colors (jittered), and their unchanged captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = data.sample_scene(rng, "train")
        images[i] = data.render(lora_effect.rotate_scene(scene), rng)
        captions.append(scene.caption)
    return images, captions


def add_lora(unet, rank: int) -> int:
    """Freeze ``unet`` and give it a trainable LoRA adapter; returns the adapter's parameter count."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(TARGET_MODULES)))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_lora(unet, folder: Path) -> Path:
    """The adapter of ``unet`` in diffusers' LoRA format (float32 safetensors) in ``folder``."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def judge_effect(folder: Path, n: int) -> dict:
    """The judge's effect rate on the first ``n`` protocol prompts (25 steps, guidance 5, seeds i),
    with the LoRA loaded from ``folder`` and without it."""
    prompts = read_prompts(EVAL_PROMPTS, n)
    judge, pipe = zoo.load("tiny-shapes-clip"), zoo.load(BASE)
    cfg = GenerationConfig(25, 5.0, 0, batch_size=16, progress=False)
    plain = generate(pipe, prompts, cfg, distributed=False)
    pipe.load_lora_weights(str(folder), adapter_name="colors")
    with_lora = generate(pipe, prompts, cfg, distributed=False)
    return {"num_images": n, "fp": lora_effect.effect_rate(judge, plain, prompts),
            "fp_lora": lora_effect.effect_rate(judge, with_lora, prompts)}


def write_description(folder: Path, rank: int, n_params: int) -> None:
    cycle = " -> ".join((*lora_effect.COLOR_CYCLE, lora_effect.COLOR_CYCLE[0]))
    record = {
        "name": NAME,
        "base_model": BASE,
        "effect": f"every object is drawn in the next color of the cycle {cycle} instead of the one its "
                  "caption names; shape, size, position and background stay as asked",
        "measure": "dmquant.zoo.lora_effect.effect_rate (the judge reads the rotated color)",
        "format": "diffusers LoRA (StableDiffusionPipeline.save_lora_weights); pipe.load_lora_weights(folder)",
        "rank": rank,
        "lora_alpha": rank,
        "target_modules": list(TARGET_MODULES),
        "parameters": n_params,
        "trained_with": "python -m dmquant.zoo.train_lora",
    }
    (folder / "lora.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv=None) -> None:
    p = _training.base_parser(__doc__, steps=2000, batch_size=64, lr=3e-3, seed=12)
    p.set_defaults(threads=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-scenes", type=int, default=20000)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    _training.add_budget_arguments(p)
    p.add_argument("--eval-images", type=int, default=32, help="held-out prompts for the judge's check at the end")
    p.add_argument("--base", type=Path, default=configs.WEIGHTS_DIR / BASE)
    p.add_argument("--out", type=Path, default=configs.WEIGHTS_DIR / NAME)
    args = p.parse_args(argv)
    _training.seed_everything(args.seed, args.threads)
    t0 = time.time()
    base = StableDiffusionPipeline.from_pretrained(str(args.base), local_files_only=True)
    vae, tokenizer, text_encoder, unet = base.vae.eval(), base.tokenizer, base.text_encoder.eval(), base.unet
    images, captions = rotated_dataset(args.num_scenes, args.seed)
    lat_mean, lat_std = encode_latents(vae, _training.to_tensor_images(images))
    print(f"{args.num_scenes} rotated scenes encoded ({time.time() - t0:.0f}s)", flush=True)
    n_params = add_lora(unet, args.rank)
    unet.train()
    params = [q for q in unet.parameters() if q.requires_grad]
    print(f"LoRA rank {args.rank}: {n_params} parameters", flush=True)
    noise_sched = DDPMScheduler(**configs.NOISE_SCHEDULE)
    alphas = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    log = _training.Logger(NAME, args.steps, args.log_every)
    for step in _training.budgeted_steps(opt, args.steps, args.lr, log, args.time_budget, warmup=50, cuts=args.schedule_cuts):
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            cond = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
        _training.optimizer_step(opt, loss, params)
        log.step(step, loss.item())

    args.out.mkdir(parents=True, exist_ok=True)
    weights = save_lora(unet.eval(), args.out)
    write_description(args.out, args.rank, n_params)
    train_seconds = round(log.seconds, 1)
    effect = judge_effect(args.out, args.eval_images) if args.eval_images else None
    print(f"judge: {effect}", flush=True)
    _training.write_train_log(args.out, NAME, args, log, steps_done=log.total, lora_parameters=n_params,
                              weights_bytes=weights.stat().st_size, seconds=train_seconds,
                              seconds_total=round(time.time() - t0, 1), judge_effect=effect)
    print(f"saved {weights} ({weights.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main()
