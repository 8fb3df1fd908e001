"""Train tiny-shapes-flux: a text-conditioned MMDiT (SD3Transformer2DModel) with flow matching, on the
VAE and the text encoder of tiny-shapes-sd (both frozen: only the transformer is trained).

    python -m dmquant.zoo.train_flux --threads 2 --compile --steps 20000 --num-scenes 20000 --time-budget 1500
        # the shipped model: one stage, 8,865 steps fitted into the 1,500 s budget (the count is in
        # train_log.json: ``--steps 8865`` without a budget repeats it); 1,543 s in all on the 2 cores
        # (eval/README.md has the times and the trials)

Two threads need both cores to themselves: on cores shared with another job one torch thread ran 8x faster
than two (0.5 s against 4.2 s a step, measured side by side), threads that wait on each other stall. On idle
cores the shipped run took 0.17 s a step on two threads, compiled, with the text encoder's outputs cached
(:class:`TextCache`; the budget line it prints; train_log.json).

The modern family (FLUX, SD3): joint attention over text and image tokens, AdaLN modulation from the
timestep and the pooled text embedding, rectified flow (``x_t = (1 - s) x_0 + s eps``, the transformer
predicts ``eps - x_0``; ``s`` logit-normal as in SD3, the timestep is ``1000 s``), sampled by
FlowMatchEulerDiscreteScheduler. Saved as a StableDiffusion3Pipeline:

- why SD3's pipeline and not FLUX's: FluxPipeline always pads its second ("T5") prompt to
  ``max_sequence_length=512`` tokens, which the zoo's 32-position CLIP encoder cannot take and which
  would make the text stream 16x longer than the prompt; StableDiffusion3Pipeline takes two CLIP
  encoders (here the same tiny-shapes-sd encoder twice, as ``CLIPTextModelWithProjection`` with an
  identity projection) and no real T5 (256 zero tokens, what SD3 feeds when ``text_encoder_3`` is None;
  the folder holds a one-layer T5 whose final norm is zero, which outputs exactly them, so that a plain
  ``from_pretrained`` loads it), and it uses ordinary classifier-free guidance (``guidance_scale``, the
  empty negative prompt).
- the prompt sequence is ``hidden_states[-2]`` of the encoder (after its first layer, as SD3 does), the
  pooled embedding its final pooled output; 10% of the prompts are dropped to "" (CFG), and color/size
  words are left out of 25% of the prompts each (``train_sd.drop_attributes``).
- the 256 zero T5 tokens are identical all through the network, so training replaces them by one
  token whose attention logit gets ``+log(256)`` (exactly the same function, 6x cheaper); the saved
  model runs with diffusers' own attention on the 32 + 256 text tokens.
- the VAE's ``shift_factor`` is set to the mean of its latents (SD3 decodes ``z / scaling + shift``),
  its weights and ``scaling_factor`` are tiny-shapes-sd's; the weights saved are an EMA of the training.

Writes dmquant/zoo/weights/tiny-shapes-flux/ (save_pretrained layout, safetensors, train_log.json).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from dmquant.models.tiny import char_t5_tokenizer
from dmquant.zoo import _training, configs, data
from dmquant.zoo.tokenizer import build_tokenizer, write_tokenizer_files
from dmquant.zoo.train_sd import attribute_variants, drop_attributes, encode_latents

NAME = "tiny-shapes-flux"
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero tokens when text_encoder_3 is None


def text_encoder_with_projection(folder: Path, identity_layer: bool = False) -> CLIPTextModelWithProjection:
    """tiny-shapes-sd's CLIPTextModel as a CLIPTextModelWithProjection (identity projection): the class
    StableDiffusion3Pipeline takes; its ``text_embeds`` are the CLIP pooled output. ``identity_layer``: one more
    encoder layer whose output projections are zero (it returns its input exactly), so that SD3's prompt
    sequence, ``hidden_states[-2]``, is the encoder's last layer (before its final norm) instead of its first;
    the pooled output does not change."""
    src = CLIPTextModel.from_pretrained(str(folder))
    config = copy.deepcopy(src.config)
    config.num_hidden_layers += int(identity_layer)
    model = CLIPTextModelWithProjection(config)
    missing = model.text_model.load_state_dict(src.state_dict(), strict=not identity_layer).missing_keys
    assert all(k.startswith(f"encoder.layers.{config.num_hidden_layers - 1}.") for k in missing), missing
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(model.config.projection_dim, model.config.hidden_size))
        if identity_layer:
            last = model.text_model.encoder.layers[-1]
            for linear in (last.self_attn.out_proj, last.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence B x 32 x 128, pooled B x 128) exactly as StableDiffusion3Pipeline.encode_prompt builds
    them from two CLIP encoders that are the same model (without the T5 tokens)."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = text_encoder(ids, output_hidden_states=True)
    seq, pooled = out.hidden_states[-2], out[0]
    return torch.cat([seq, seq], dim=-1), torch.cat([pooled, pooled], dim=-1)


class TextCache:
    """:func:`encode_text` with every distinct prompt encoded once: the frozen encoder gives the same states for the
    same text, and the shapes captions (with their dropped-word variants) are a few tens of thousands of distinct
    strings, so once :meth:`warm` has encoded them a batch costs a lookup instead of tokenising and encoding 64 prompts
    (the budget line ``train_flux`` prints went from 0.18 to 0.17 s a step with it)."""

    def __init__(self, text_encoder, tokenizer, device) -> None:
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device
        self.seq: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.seq))
        if missing:
            seq, pooled = encode_text(self.text_encoder, self.tokenizer, missing, self.device)
            for text, s, q in zip(missing, seq, pooled):
                self.seq[text], self.pooled[text] = s, q
        return torch.stack([self.seq[t] for t in texts]), torch.stack([self.pooled[t] for t in texts])

    def warm(self, texts, chunk: int = 512) -> None:
        """Encode ``texts`` ahead (in chunks), so that training steps, and the time budget's speed estimate, are
        lookups from the first step on."""
        texts = list(dict.fromkeys(texts))
        for i in range(0, len(texts), chunk):
            self(texts[i:i + chunk])


class RepeatedLastTokenAttnProcessor:
    """SD3's joint attention where the last text token stands for ``repeats`` identical tokens (its
    attention logit gets ``+log(repeats)``): the same function as the pipeline's 256 zero T5 tokens."""

    def __init__(self, repeats: int) -> None:
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        eq = split(attn.add_q_proj(encoder_hidden_states))
        ek = split(attn.add_k_proj(encoder_hidden_states))
        ev = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, -1))
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        hidden_states, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def zero_t5(width: int, seed: int = 0):
    """(T5EncoderModel, tokenizer) standing in for SD3's T5: one tiny layer whose final RMS norm has weight
    0, so it outputs exactly the zero sequence StableDiffusion3Pipeline uses when ``text_encoder_3`` is
    None, while the folder keeps every component and loads with a plain ``from_pretrained``."""
    torch.manual_seed(seed)
    tokenizer = char_t5_tokenizer(model_max_length=T5_TOKENS)
    model = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=8, num_layers=1, num_heads=1,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model.eval().requires_grad_(False), tokenizer


def zero_modulation(model: SD3Transformer2DModel) -> None:
    """DiT's adaLN-Zero: the AdaLN linears of every block (image and text stream), the final norm's and the output
    projection get zero weights and biases (their gates are zero, so every block starts as the identity)."""
    layers = [m.linear for name, m in model.named_modules() if name.endswith(("norm1", "norm1_context", "norm_out"))]
    with torch.no_grad():
        for layer in [*layers, model.proj_out]:
            layer.weight.zero_()
            layer.bias.zero_()


def with_zero_token(seq: torch.Tensor) -> torch.Tensor:
    """The CLIP sequence followed by one zero token (the T5 tokens' stand-in)."""
    return torch.cat([seq, seq.new_zeros(seq.shape[0], 1, seq.shape[2])], dim=1)


def inference_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=configs.FLOW_SHIFT)


def main(argv=None) -> None:
    p = _training.text_parser(__doc__, steps=3000, batch_size=64, lr=1e-3, seed=6, num_scenes=30000)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: no EMA)")
    _training.add_budget_arguments(p)
    p.add_argument("--sd", type=Path, default=configs.WEIGHTS_DIR / "tiny-shapes-sd",
                   help="the tiny-shapes-sd folder whose vae/ and text_encoder/ are used (frozen)")
    p.add_argument("--out", type=Path, default=configs.WEIGHTS_DIR / NAME)
    p.add_argument("--resume", type=Path, default=None, help="continue training the transformer of this folder")
    p.add_argument("--arch", type=json.loads, default={},
                   help="JSON object of model arguments that replace configs.MMDIT's")
    p.add_argument("--name", default=NAME, help="model name written in train_log.json")
    p.add_argument("--pooled-text", choices=("on", "off"), default="on",
                   help="off: the pooled text embedding's projection into the AdaLN conditioning is held at zero "
                        "weight (its bias still trains), so the model reads the prompt only through joint attention "
                        "over the token sequence; the saved model is an ordinary SD3Transformer2DModel")
    p.add_argument("--prompt-states", choices=("first", "last"), default="first",
                   help="the encoder layer whose states are the prompt sequence: SD3's hidden_states[-2], here after "
                        "the first of the encoder's two layers, or (last) after its last layer, as tiny-shapes-sd "
                        "reads them (the saved text encoder gets a third layer that returns its input)")
    p.add_argument("--sigma", choices=("logit-normal", "uniform"), default="logit-normal",
                   help="the noise levels trained on: SD3's logit-normal(0, 1) (most of them near 0.5) or uniform "
                        "on (0, 1) (as many nearly clean ones, where the shapes' edges are decided, as noisy ones)")
    p.add_argument("--init", choices=("default", "adaln-zero"), default="default",
                   help="adaln-zero: every block's AdaLN modulation (shift, scale and gate), the final norm's "
                        "modulation and the output projection start at zero, so each block starts as the identity "
                        "(DiT's adaLN-Zero; diffusers' classes keep PyTorch's default init)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (inductor; about 15%% faster per step on 2 CPU threads): the "
                        "graph is compiled on one batch before the timed steps, so the budget's speed estimate "
                        "leaves the compilation out")
    args = p.parse_args(argv)
    _training.seed_everything(args.seed, args.threads)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(str(args.sd / "vae")).to(args.device).eval()
    tokenizer = build_tokenizer()
    text_encoder = text_encoder_with_projection(args.sd / "text_encoder", args.prompt_states == "last").to(args.device)
    images, captions = data.make_dataset(args.num_scenes, seed=args.seed, split="train")
    lat_mean, lat_std = encode_latents(vae, _training.to_tensor_images(images).to(args.device))
    scale = float(vae.config.scaling_factor)
    shift = float(lat_mean.mean()) / scale  # the mean of the unscaled latents
    vae.register_to_config(shift_factor=shift)
    lat_mean = lat_mean - shift * scale  # (z - shift) * scale, as SD3 encodes
    print(f"latents: shift_factor={shift:.4f}, std after shift {float(lat_mean.std()):.3f} "
          f"({time.time() - t0:.0f}s)", flush=True)
    aug_rng = np.random.default_rng(args.seed)

    if args.resume is not None:
        model = SD3Transformer2DModel.from_pretrained(str(args.resume / "transformer")).to(args.device).train()
    else:
        model = SD3Transformer2DModel(**{**configs.MMDIT, **args.arch}).to(args.device).train()
        if args.init == "adaln-zero":
            zero_modulation(model)
    model.set_attn_processor(RepeatedLastTokenAttnProcessor(T5_TOKENS))
    if args.pooled_text == "off":
        pooled_weight = model.time_text_embed.text_embedder.linear_1.weight
        with torch.no_grad():
            pooled_weight.zero_()
        pooled_weight.requires_grad_(False)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"transformer: {n_params / 1e6:.3f} M parameters", flush=True)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    text_cache = TextCache(text_encoder, tokenizer, args.device)
    text_cache.warm(["", *(v for c in dict.fromkeys(captions) for v in attribute_variants(c))])
    print(f"text cache: {len(text_cache.seq)} prompts encoded ({time.time() - t0:.0f}s)", flush=True)
    trained = [q for q in model.parameters() if q.requires_grad]

    def batch_loss(forward) -> torch.Tensor:
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch_size, generator=gen)) if args.sigma == "logit-normal" \
            else torch.rand(args.batch_size, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = ((1 - s) * x0 + s * noise).to(args.device)
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        texts = ["" if d else drop_attributes(captions[i], aug_rng, args.color_word_dropout, args.size_word_dropout)
                 for i, d in zip(idx.tolist(), drop.tolist())]
        seq, pooled = text_cache(texts)
        pred = forward(hidden_states=xt, encoder_hidden_states=with_zero_token(seq), pooled_projections=pooled,
                       timestep=(sigma * 1000).to(args.device)).sample
        return F.mse_loss(pred, (noise - x0).to(args.device))

    forward = model
    if args.compile:
        forward = torch.compile(model)
        batch_loss(forward).backward()  # compiles forward and backward; the gradients are dropped
        opt.zero_grad(set_to_none=True)
        print(f"compiled ({time.time() - t0:.0f}s)", flush=True)
    log = _training.Logger(args.name, args.steps, args.log_every)
    for step in _training.budgeted_steps(opt, args.steps, args.lr, log, args.time_budget, cuts=args.schedule_cuts):
        loss = batch_loss(forward)
        _training.optimizer_step(opt, loss, trained)
        if ema is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        log.step(step, loss.item())

    final = (ema if ema is not None else model).cpu().eval()
    final.set_attn_processor(JointAttnProcessor2_0())
    # the training shortcut is the pipeline's function: one batch through both, 1 + 256 zero tokens
    with torch.no_grad():
        seq, pooled = encode_text(text_encoder.cpu(), tokenizer, captions[:4], "cpu")
        xt, t = torch.randn(4, 4, 8, 8, generator=gen), torch.full((4,), 500.0)
        full = final(xt, torch.cat([seq, seq.new_zeros(4, T5_TOKENS, seq.shape[2])], 1), pooled, t).sample
        final.set_attn_processor(RepeatedLastTokenAttnProcessor(T5_TOKENS))
        short = final(xt, with_zero_token(seq), pooled, t).sample
        final.set_attn_processor(JointAttnProcessor2_0())
    max_diff = float((full - short).abs().max())
    print(f"training attention vs the pipeline's: max |diff| {max_diff:.2e}", flush=True)
    t5, t5_tokenizer = zero_t5(configs.MMDIT["joint_attention_dim"])
    pipe = StableDiffusion3Pipeline(
        transformer=final,
        scheduler=inference_scheduler(),
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    with torch.no_grad():  # the pipeline's prompt encoding is the one trained on (+ 256 zero tokens)
        embeds, pooled_pipe = pipe.encode_prompt(captions[:4], None, None, do_classifier_free_guidance=False)[::2]
    assert torch.equal(embeds[:, :32], seq) and not embeds[:, 32:].any() and torch.equal(pooled_pipe, pooled)
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(args.out / sub)
    _training.write_train_log(args.out, args.name, args, log, steps_done=log.total, transformer_parameters=n_params,
                              vae_shift_factor=shift, attention_shortcut_max_diff=max_diff,
                              seconds_total=round(time.time() - t0, 1))
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
