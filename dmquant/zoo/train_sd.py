"""Train tiny-shapes-sd: a UNet2DConditionModel jointly with a small CLIPTextModel, on the shared VAE.

    python -m dmquant.zoo.train_vae             # first, once (~6 min)
    python -m dmquant.zoo.train_sd              # 2,500 steps, 11 min on 2 idle CPU threads
    python -m dmquant.zoo.train_vae --finetune-decoder --steps 3000 --lr 1e-3   # 18 min, 2 threads
    python -m dmquant.zoo.train_sd --resume dmquant/zoo/weights/tiny-shapes-sd --steps 3000 --lr 3e-4 \
        --seed 5                                # ~13 min; the shipped tiny-shapes-sd (eval/README.md)

Epsilon-prediction on the SD "scaled_linear" schedule (1000 steps, betas 0.00085..0.012), 10% caption
dropout (the empty prompt, which is what the pipeline uses as the unconditional input) so that
classifier-free guidance works, and color/size words left out of 25% of the captions each (see
``drop_attributes``). Writes a StableDiffusionPipeline folder (save_pretrained layout,
safetensors) to dmquant/zoo/weights/tiny-shapes-sd/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from dmquant.zoo import _training, configs, data
from dmquant.zoo.tokenizer import build_tokenizer, write_tokenizer_files

NAME = "tiny-shapes-sd"


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE latents (scaled by ``scaling_factor``)."""
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


def drop_attributes(caption: str, rng: np.random.Generator, p_color: float, p_size: float) -> str:
    """The caption without its color words (probability ``p_color``) and/or size words (``p_size``).

    The text encoder is causal, so the state of the shape word depends on the words before it; seeing
    shapes with and without a color (and size) in front teaches the UNet to read the shape from the shape
    word itself, which is what lets it compose held-out (shape, color) pairs.
    """
    drop = set()
    if rng.random() < p_color:
        drop.update(data.COLORS)
    if rng.random() < p_size:
        drop.update(data.SIZES)
    return without_words(caption, drop)


def without_words(caption: str, words) -> str:
    """``caption`` without the words in ``words`` (unchanged when none of them occurs)."""
    if not words:
        return caption
    return " ".join(w for w in caption.split() if w not in words)


def attribute_variants(caption: str) -> list[str]:
    """Every caption :func:`drop_attributes` can make of ``caption``: as is, without its color words, without its
    size words, without both."""
    drops = ((), data.COLORS, data.SIZES, (*data.COLORS, *data.SIZES))
    return list(dict.fromkeys(without_words(caption, set(d)) for d in drops))


def build_text_encoder(tokenizer, overrides: dict | None = None):
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**configs.TEXT_ENCODER, **(overrides or {})},
    )
    return CLIPTextModel(cfg)


def inference_scheduler(prediction_type: str = "epsilon"):
    return DDIMScheduler(**configs.NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def main(argv=None) -> None:
    p = _training.text_parser(__doc__, steps=2500, batch_size=64, lr=1e-3, seed=3, num_scenes=40000)
    p.add_argument("--vae", type=Path, default=configs.WEIGHTS_DIR / NAME / "vae")
    p.add_argument("--out", type=Path, default=configs.WEIGHTS_DIR / NAME)
    p.add_argument("--resume", type=Path, default=None,
                   help="continue training the UNet and text encoder of this tiny-shapes-sd folder")
    p.add_argument("--unet-arch", type=json.loads, default={},
                   help="JSON object of UNet2DConditionModel arguments that replace configs.UNET's")
    p.add_argument("--text-arch", type=json.loads, default={},
                   help="JSON object of CLIPTextConfig arguments that replace configs.TEXT_ENCODER's")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    _training.add_budget_arguments(p)
    p.add_argument("--name", default=NAME, help="model name written in train_log.json")
    args = p.parse_args(argv)
    _training.seed_everything(args.seed, args.threads)
    vae = AutoencoderKL.from_pretrained(str(args.vae)).to(args.device).eval()
    tokenizer = build_tokenizer()
    images, captions = data.make_dataset(args.num_scenes, seed=args.seed, split="train")
    lat_mean, lat_std = encode_latents(vae, _training.to_tensor_images(images).to(args.device))
    aug_rng = np.random.default_rng(args.seed)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(args.device)

    if args.resume is not None:
        text_encoder = CLIPTextModel.from_pretrained(str(args.resume / "text_encoder")).to(args.device).train()
        unet = UNet2DConditionModel.from_pretrained(str(args.resume / "unet")).to(args.device).train()
    else:
        text_encoder = build_text_encoder(tokenizer, args.text_arch).to(args.device).train()
        unet = UNet2DConditionModel(**{**configs.UNET, **args.unet_arch}).to(args.device).train()
    noise_sched = DDPMScheduler(**configs.NOISE_SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(args.device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    log = _training.Logger(args.name, args.steps, args.log_every)
    for step in _training.budgeted_steps(opt, args.steps, args.lr, log, args.time_budget, cuts=args.schedule_cuts):
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen).to(args.device)
        eps_lat = torch.randn(lat_mean[idx].shape, generator=gen).to(args.device)
        x0 = lat_mean[idx] + lat_std[idx] * eps_lat
        noise = torch.randn(x0.shape, generator=gen).to(args.device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen).to(args.device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = (torch.rand(args.batch_size, generator=gen) < args.caption_dropout).to(args.device)
        texts = [drop_attributes(captions[i], aug_rng, args.color_word_dropout, args.size_word_dropout) for i in idx.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(args.device)
        ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
        cond = text_encoder(ids).last_hidden_state
        target = noise if args.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, target)
        _training.optimizer_step(opt, loss, params)
        log.step(step, loss.item())

    pipe = StableDiffusionPipeline(
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu().eval(),
        tokenizer=tokenizer,
        unet=unet.cpu().eval(),
        scheduler=inference_scheduler(args.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    write_tokenizer_files(args.out / "tokenizer")
    _training.write_train_log(args.out, args.name, args, log, steps_done=log.total)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
