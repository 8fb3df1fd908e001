"""Train the zoo's AutoencoderKL (32x32x3 images <-> 8x8x4 latents), shared by tiny-shapes-sd and -dit.

    python -m dmquant.zoo.train_vae             # ~6 min on 2 CPU cores
    python -m dmquant.zoo.train_vae --finetune-decoder --steps 3000 --lr 1e-3   # decoder only, ~18 min

Loss: L1 + MSE reconstruction plus a small KL term. After training, ``scaling_factor`` is set to
1 / std of the latents of 2,048 training images, so scaled latents have unit variance as in SD.
Writes dmquant/zoo/weights/tiny-shapes-sd/vae/ (train_sd and train_dit read it from there).

``--finetune-decoder`` starts from the VAE in ``--out``, freezes the encoder (so the latent space,
the scaling factor and the denoisers trained on it stay valid) and trains only the decoder on
latents sampled from the frozen posterior.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from dmquant.zoo import _training, configs, data

NAME = "vae"
DEFAULT_OUT = configs.WEIGHTS_DIR / "tiny-shapes-sd" / "vae"


def main(argv=None) -> None:
    p = _training.base_parser(__doc__, steps=600, batch_size=64, lr=1e-3, seed=2)
    p.add_argument("--num-scenes", type=int, default=20000)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--finetune-decoder", action="store_true",
                   help="train only the decoder of the VAE in --out (the encoder and latent space stay)")
    args = p.parse_args(argv)
    _training.seed_everything(args.seed, args.threads)
    images, _ = data.make_dataset(args.num_scenes, seed=args.seed, split="train")
    x_all = _training.to_tensor_images(images)
    if args.finetune_decoder:
        return finetune_decoder(args, x_all)
    vae = AutoencoderKL(**configs.VAE).to(args.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    log = _training.Logger("tiny-shapes vae", args.steps, args.log_every)
    for step in _training.scheduled_steps(opt, args.steps, args.lr, warmup=50):
        x = x_all[torch.randint(len(x_all), (args.batch_size,), generator=gen)].to(args.device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(args.device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss.item(), kl=kl.item())

    lat, psnr = _reconstruction(vae, x_all, args.device)
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.cpu().save_pretrained(str(args.out), safe_serialization=True)
    _training.write_train_log(args.out, NAME, args, log, scaling_factor=scaling, latent_mean=float(lat.mean()),
                    reconstruction_psnr_db=round(psnr, 2))
    print(f"saved {args.out} scaling_factor={scaling:.4f} reconstruction PSNR={psnr:.2f} dB", flush=True)


def _reconstruction(vae, x_all: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """(posterior means of 2,048 training images, their reconstruction PSNR in dB)."""
    vae.eval()
    with torch.no_grad():
        x = x_all[:2048].to(device)
        lat = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        rec = torch.cat([vae.decode(lat[i : i + 256]).sample for i in range(0, len(lat), 256)])
        mse = F.mse_loss(rec.clamp(-1, 1), x).item()
    return lat, 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # images span [-1, 1]: peak-to-peak 2


def finetune_decoder(args, x_all: torch.Tensor) -> None:
    """Train the decoder (and post-quant conv) of the VAE in ``args.out``; the encoder stays frozen."""
    vae = AutoencoderKL.from_pretrained(str(args.out)).to(args.device)
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in trained:
        param.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # the frozen encoder's posterior of every training image, computed once
        moments = [vae.encode(x_all[i : i + 500].to(args.device)).latent_dist for i in range(0, len(x_all), 500)]
        mean, std = torch.cat([m.mean for m in moments]), torch.cat([m.std for m in moments])
    log = _training.Logger("tiny-shapes vae decoder", args.steps, args.log_every)
    for step in _training.scheduled_steps(opt, args.steps, args.lr, warmup=20):
        idx = torch.randint(len(x_all), (args.batch_size,), generator=gen)
        x = x_all[idx].to(args.device)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(args.device)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss.item())
    _, psnr = _reconstruction(vae, x_all, args.device)
    vae.cpu().save_pretrained(str(args.out), safe_serialization=True)
    _training.write_train_log(args.out, NAME, args, log, scaling_factor=float(vae.config.scaling_factor),
                    reconstruction_psnr_db=round(psnr, 2), finetuned_decoder=True)
    print(f"saved {args.out} (decoder fine-tuned) reconstruction PSNR={psnr:.2f} dB", flush=True)


if __name__ == "__main__":
    main()
