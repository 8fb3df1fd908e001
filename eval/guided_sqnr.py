"""Where a per-token W8A8 loses on a zoo model: SQNR of the guided noise prediction ``uncond + g (cond - uncond)``
with one group of layers quantized at a time (eval/RESULTS.md, "Robustness").

The FP pipeline runs 8 held-out prompts for 25 DDIM steps at guidance ``g``; every third denoiser call is
recorded and replayed through each quantized copy (one torch thread).

    OMP_NUM_THREADS=1 python eval/guided_sqnr.py [--model sd] [--guidance 7.5] [--only w8a8,torchao]

``--model`` is any model of eval/robustness.py with text prompts (the UNets and the MMDiTs); ``only-<group>`` quantizes
one group of layers, ``smooth-only-<group>`` the same with smoothing (the groups: GROUPS for UNets, MMDIT_GROUPS).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import dmquant
from dmquant.config import QuantConfig
from dmquant.models.adapters import find_denoiser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness as R  # noqa: E402

W = {"bits": 8, "symmetric": True, "granularity": "channel", "method": "minmax"}
A = {"bits": 8, "granularity": "token", "symmetric": False}
CONV_WO = {"conv:*": {"weight_only": True}}
GROUPS = {"ff2": ["*.ff.net.2"], "ff0": ["*.ff.net.0.proj"], "out": ["*.to_out.0"],
          "attn1qkv": ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v"], "attn2q": ["*attn2.to_q"],
          "attn2kv": ["*attn2.to_k", "*attn2.to_v"], "temb": ["*time_emb_proj"]}
MMDIT_GROUPS = {"qkv": ["*attn.to_q", "*attn.to_k", "*attn.to_v"], "ctxqkv": ["*add_q_proj", "*add_k_proj", "*add_v_proj"],
                "mmout": ["*attn.to_out.0"], "ctxout": ["*to_add_out"], "mmff0": ["*.ff.net.0.proj"],
                "mmff2": ["*.ff.net.2"], "ctxff0": ["*ff_context.net.0.proj"], "ctxff2": ["*ff_context.net.2"],
                "adaln": ["*norm1.linear", "*norm1_context.linear"]}
CONFIGS = {
    "w8a8": {"weights": W, "activations": A, "attention": None, "layers": CONV_WO},
    "w8a8+rot": {"weights": W, "activations": A, "attention": None, "layers": CONV_WO, "rotation": {}},
    "w8a8+smooth": {"weights": W, "activations": A, "attention": None, "layers": CONV_WO,
                    "smoothing": {"alpha": 0.5}, "calibration": {"max_prompts": 16, "num_timesteps": 4}},
    "linear-weights-only": {"weights": W, "activations": None, "attention": None, "include": ["linear:*"]},
    "conv-weights-only": {"weights": W, "activations": None, "attention": None, "include": ["conv:*"]},
    "linear-sym": {"weights": W, "activations": {**A, "symmetric": True}, "attention": None, "layers": CONV_WO},
    "conv-weights-g32": {"weights": {**W, "granularity": "group", "group_size": 32}, "activations": None,
                         "attention": None, "include": ["conv:*"]},
    "conv-weights-mse": {"weights": {**W, "method": "mse"}, "activations": None, "attention": None, "include": ["conv:*"]},
    "w8a8-convg32": {"weights": W, "activations": A, "attention": None,
                     "layers": {"conv:*": {"weight_only": True, "weights": {"granularity": "group", "group_size": 32}}}},
    "w8a8-kvwo": {"weights": W, "activations": A, "attention": None,
                  "layers": {**CONV_WO, "linear:*attn2.to_k": {"weight_only": True}, "linear:*attn2.to_v": {"weight_only": True}}},
    "w8a8-kvwo+smooth": {"weights": W, "activations": A, "attention": None, "smoothing": {"alpha": 0.5},
                         "calibration": {"max_prompts": 16, "num_timesteps": 4},
                         "layers": {**CONV_WO, "linear:*attn2.to_k": {"weight_only": True}, "linear:*attn2.to_v": {"weight_only": True}}},
    **{f"w8a8+smooth{a}": {"weights": W, "activations": A, "attention": None, "layers": CONV_WO,
                           "smoothing": {"alpha": a}, "calibration": {"max_prompts": 16, "num_timesteps": 4}}
       for a in (0.3, 0.4, 0.6, 0.7, None)},
    **{f"only-{k}": {"weights": W, "activations": A, "attention": None, "include": v}
       for k, v in {**GROUPS, **MMDIT_GROUPS}.items()},
    **{f"smooth-only-{k}": {"weights": W, "activations": A, "attention": None, "include": v, "smoothing": {"alpha": 0.5},
                            "calibration": {"max_prompts": 16, "num_timesteps": 4}}
       for k, v in {**GROUPS, **MMDIT_GROUPS}.items()},
}


@torch.no_grad()
def record_run(pipe, prompts, guidance: float, steps: int = 25, record: bool = True) -> tuple[torch.Tensor, list]:
    """The final latents of one sampling run (seed 0) and, with ``record``, every denoiser call's inputs."""
    calls = []
    hook = find_denoiser(pipe)[1].register_forward_pre_hook(
        lambda m, a, k: calls.append((tuple(x.clone() for x in a), dict(k))), with_kwargs=True) if record else None
    latents = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(0), output_type="latent")[0]
    if hook is not None:
        hook.remove()
    return latents, calls


def record_calls(pipe, guidance: float) -> list:
    return record_run(pipe, R.eval_prompts("text", 8), guidance)[1][::3]


@torch.no_grad()
def guided_steps(unet, calls, guidance: float) -> list[torch.Tensor]:
    """The guided prediction ``uncond + g (cond - uncond)`` of each recorded call."""
    outs = []
    for args, kwargs in calls:
        uncond, cond = unet(*args, **{**kwargs, "return_dict": False})[0].chunk(2)
        outs.append(uncond + guidance * (cond - uncond))
    return outs


def guided(unet, calls, guidance: float) -> torch.Tensor:
    return torch.cat(guided_steps(unet, calls, guidance))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--only", default=",".join([*CONFIGS, "torchao"]))
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe = R.load(a.model)
    calls = record_calls(pipe, a.guidance)
    ref = guided(find_denoiser(pipe)[1], calls, a.guidance)
    for name in a.only.split(","):
        model = copy.deepcopy(pipe)
        if name == "torchao":
            R.apply_torchao(model)
        elif name == "torchao-same":  # torchao on w8a8's linear layers, w8a8's int8 weight-only convolutions
            dmquant.quantize(model, QuantConfig.from_dict(R.CONV_WEIGHT_ONLY_INT8), progress=False)
            R.apply_torchao(model, same_layers=True)
        else:
            config = QuantConfig.from_dict(CONFIGS[name])
            prompts = R.calibration_prompts("terse", "text")[:16] if config.needs_calibration_data else None
            dmquant.quantize(model, config, prompts=prompts, progress=False, guidance_scale=a.guidance)
        out = guided(find_denoiser(model)[1], calls, a.guidance)
        sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
        print(f"{name:22s} guided SQNR {float(sqnr):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
