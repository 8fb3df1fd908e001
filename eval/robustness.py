"""Robustness protocol (issue 18): every quality figure over models x calibration prompt sets x guidance scales.

A cell is (model, calibration prompt set, guidance scale). In a cell a method is calibrated on the set's
prompts at the cell's guidance scale (a user calibrates with the settings they generate with), then
generates the protocol's evaluation images (eval/README.md: DDIM 25 steps or the model's flow scheduler,
image i from seed i, held-out captions; the class-conditioned DiTs take training-pair classes) at the same
guidance scale; PSNR / SSIM against the FP images of the same model, prompts, seeds and guidance, and the
judge's CLIP score against FP's. Methods without calibration (weight-only int8, torchao) do not depend on
the prompt set and are run once per (model, guidance).

    OMP_NUM_THREADS=1 python eval/robustness.py --models sd,sd-wide --sets zoo,terse --guidance 3,5,7.5 \
        --methods int8-wo,torchao-int8dyn,w8a8 --num-images 200
    python eval/robustness.py --table [--num-images 200]     # median / worst per method over the cached cells
    python eval/robustness.py --table --clip w8a8,int8-wo     # per cell: CLIP vs FP, paired 95% intervals

Results are cached per run in eval/robustness/<model>-<weights>-<set>-g<guidance>-<method>-<n>.json (<weights>:
a hash of the denoiser's weights, so retrained models start afresh); FP images in eval/robustness/*.npz
(not committed). Runs are single-threaded (``--threads``, default 1) so that figures do not move with
the thread count; start two processes with disjoint ``--models`` to use two cores.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dmquant
from dmquant.config import QuantConfig, load_recipe
from dmquant.metrics.fidelity import paired_difference

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
OUT = ROOT / "robustness"
sys.path.insert(0, str(ROOT))
import validation_models  # noqa: E402

# short name -> (zoo model or validation model, kind)
MODELS = {
    "sd": ("tiny-shapes-sd", "text"), "sd-wide": ("val-sd-wide", "text"), "sd-small": ("val-sd-small", "text"),
    "sd-deep": ("val-sd-deep", "text"), "flux": ("tiny-shapes-flux", "text"), "flux-small": ("val-flux-small", "text"),
    "dit": ("tiny-shapes-dit", "class"), "dit-deep": ("val-dit-deep", "class"),
}
GUIDANCE = (3.0, 5.0, 7.5)

# Calibration prompt sets. zoo: the protocol's calib/shapes_calib.txt. terse: the same scenes without
# position and background words ("a large red circle"), shorter. wordy: the same captions inside
# other words (prefixes and suffixes outside the grammar, which the tokenizer cuts into word pieces),
# longer (most reach the 32-token limit). For the class-conditioned DiTs a set is the classes of its
# captions: zoo = all 24 training classes, terse = the 8 classes of two colors only (a class shift).
PREFIXES = ("", "a photo of ", "an image showing ", "digital art, ", "a simple picture of ", "flat icon: ")
SUFFIXES = ("", ", high quality", ", minimal flat style, sharp edges", ", trending on artstation, 4k",
            ", centered composition", ", vector graphic with clean lines")


def _calib_captions() -> list[str]:
    from dmquant.prompts import read_prompts

    return read_prompts(REPO / "calib" / "shapes_calib.txt")


def terse(caption: str) -> str:
    from dmquant.zoo import data

    scene = data.parse_caption(caption)
    return " and ".join(f"a {o.size} {o.color} {o.shape}" for o in scene.objects)


def wordy(caption: str, i: int) -> str:
    return PREFIXES[i % len(PREFIXES)] + caption + SUFFIXES[(i * 7 + 3) % len(SUFFIXES)]


def calibration_prompts(set_name: str, kind: str) -> list[str]:
    caps = _calib_captions()
    if kind == "class":
        single = [c for c in caps if " and " not in c]
        if set_name == "zoo":
            return single
        if set_name == "terse":
            return [c for c in single if c.split()[2] in ("red", "cyan")]
        raise SystemExit(f"prompt set {set_name!r} has no class-conditioned version (zoo, terse)")
    if set_name == "zoo":
        return caps
    if set_name == "terse":
        return [terse(c) for c in caps]
    if set_name == "wordy":
        return [wordy(c, i) for i, c in enumerate(caps)]
    raise SystemExit(f"unknown prompt set {set_name!r}: zoo, terse, wordy")


def eval_prompts(kind: str, n: int) -> list[str]:
    from dmquant.prompts import read_prompts

    if kind == "text":
        return read_prompts(REPO / "calib" / "shapes_eval.txt", n)
    single = [c for c in _calib_captions() if " and " not in c]
    if len(single) < n:
        single = (single * (n // len(single) + 1))
    return single[:n]


def model_folder(short: str) -> Path:
    name = MODELS[short][0]
    return dmquant.zoo.path(name) if name.startswith("tiny-") else validation_models.path(name)


def load(short: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model_folder(short)), local_files_only=True, use_safetensors=True)


def fingerprint(short: str) -> str:
    digest = hashlib.sha256()
    for f in sorted(model_folder(short).glob("*/diffusion_pytorch_model.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:10]


def model_inputs(pipe, kind: str, prompts: list[str]) -> list:
    if kind == "text":
        return prompts
    from dmquant.diffusers_io import class_id

    return [class_id(pipe, p) for p in prompts]


def generate(pipe, prompts, guidance: float) -> np.ndarray:
    from dmquant.generation import GenerationConfig
    from dmquant.generation import generate as gen

    return gen(pipe, prompts, GenerationConfig(progress=False, guidance_scale=guidance), distributed=False)


# Methods: a shipped recipe by name, or one of these (QuantConfig dicts; None: not a dmquant recipe).
WEIGHT_ONLY_INT8 = {"name": "int8-wo", "weights": {"bits": 8, "symmetric": True, "granularity": "channel",
                                                    "method": "minmax"}, "activations": None, "attention": None}
CONV_PATTERNS = ("*conv*", "*.proj_in", "*.proj_out")
LINEAR_PATTERNS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.add_*_proj", "*.to_add_out", "*.ff.net.*",
                   "*.ff_context.net.*", "*time_emb*", "*.linear*", "*.proj", "*.proj_mlp", "*.proj_out")


def _w4a8_fixed_scales(name: str, **changes) -> dict:
    """A variant of ``w4a8`` as it was before it learned its weight scales (the rows measured then keep their
    meaning): ``reconstruction.learn_weight_scales`` held false."""
    recon = changes.pop("reconstruction", {})
    if recon is not None:
        recon = {"learn_weight_scales": False, **recon}
    return _variant("w4a8", name, reconstruction=recon, **changes)


def _variant(recipe: str, name: str, **changes) -> dict:
    """A shipped recipe's dict with sections replaced (``None`` removes one)."""
    import yaml

    data = yaml.safe_load((REPO / "pipelines" / f"{recipe}.yaml").read_text())
    data.pop("description", None)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return {**data, "name": name}


# torchao on the linear layers and, on the convolutions (which torchao cannot quantize), the int8 weight-only
# convolutions of dmquant's w8a8: torchao applied to the same layers as w8a8
CONV_WEIGHT_ONLY_INT8 = {**WEIGHT_ONLY_INT8, "name": "int8-wo-conv", "include": ["conv:*"]}
METHODS: dict[str, dict | None] = {
    "int8-wo": WEIGHT_ONLY_INT8, "torchao-int8dyn": None, "torchao-int8dyn+conv-wo": None,
    "w8a8-minmax": _variant("w8a8-static", "w8a8-minmax", activations={"method": "minmax"}, attention={"method": "minmax"}),
    "w8a8-noattn": _variant("w8a8-static", "w8a8-noattn", attention=None),
    "w8a8-token": _variant("w8a8-static", "w8a8-token", activations={"granularity": "token", "symmetric": True}),
    "w8a8-tokenasym": _variant("w8a8-static", "w8a8-tokenasym", activations={"granularity": "token", "symmetric": False}),
    "w8a8-lintok-convwo": _variant("w8a8-static", "w8a8-lintok-convwo", activations={"granularity": "token", "symmetric": True},
                                   layers={p: {"weight_only": True} for p in CONV_PATTERNS}),
    "w8a8-linasym-convwo": _variant("w8a8-static", "w8a8-linasym-convwo",
                                    activations={"granularity": "token", "symmetric": False},
                                    layers={p: {"weight_only": True} for p in CONV_PATTERNS}),
    "w8a8-linasym-convstatic": _variant("w8a8-static", "w8a8-linasym-convstatic", layers={
        p: {"activations": {"granularity": "token", "symmetric": False}} for p in LINEAR_PATTERNS}),
    "w8a8-lin-asym": _variant("w8a8-static", "w8a8-lin-asym", attention=None,
                              activations={"granularity": "token", "symmetric": False},
                              layers={"conv:*": {"weight_only": True}}),
    "w8a8-lin-sym": _variant("w8a8-static", "w8a8-lin-sym", attention=None,
                             activations={"granularity": "token", "symmetric": True},
                             layers={"conv:*": {"weight_only": True}}),
    "w4a8-lin-asym": _w4a8_fixed_scales("w4a8-lin-asym", attention=None,
                              activations={"granularity": "token", "symmetric": False},
                              reconstruction={"learn_act_scales": False}, split={"weights": True, "activations": False},
                              layers={"conv:*": {"weight_only": True}}),
    "w4a8-lin-asym-rtn": _w4a8_fixed_scales("w4a8-lin-asym-rtn", attention=None, reconstruction=None, split=None,
                                  activations={"granularity": "token", "symmetric": False},
                                  layers={"conv:*": {"weight_only": True}}),
    "w4a4-convwo": _variant("w4a4-svd", "w4a4-convwo", layers={"conv:*": {"weight_only": True}}),
    "w8a8-wmse": _variant("w8a8", "w8a8-wmse", weights={"method": "mse"}),
    "w8a8-wmse-temb": _variant("w8a8", "w8a8-wmse-temb", weights={"method": "mse"},
                               layers={"conv:*": {"weight_only": True}, "linear:*time_emb_proj": {"weight_only": True}}),
    "w8a8-temb": _variant("w8a8", "w8a8-temb",
                          layers={"conv:*": {"weight_only": True}, "linear:*time_emb_proj": {"weight_only": True}}),
    # int8 convolutions with one range per sample, computed on the fly (oneDNN can run them: issue 15)
    "w8a8-convsample": _variant("w8a8", "w8a8-convsample",
                                layers={"conv:*": {"activations": {"granularity": "sample"}}}),
    "w8a8-convsample-split": _variant("w8a8", "w8a8-convsample-split", split={"weights": False, "activations": True},
                                      layers={"conv:*": {"activations": {"granularity": "sample"}}}),
    "w8a8-convsample-sym": _variant("w8a8", "w8a8-convsample-sym",
                                    layers={"conv:*": {"activations": {"granularity": "sample", "symmetric": True}}}),
    "w8a8-convsample-rot": _variant("w8a8", "w8a8-convsample-rot", rotation={"seed": 0},
                                    layers={"conv:*": {"activations": {"granularity": "sample"}}}),
    "w8a8-convsample-smooth": _variant("w8a8", "w8a8-convsample-smooth", smoothing={"alpha": 0.5},
                                       layers={"conv:*": {"activations": {"granularity": "sample"}}}),
    "w4a8-guided": _w4a8_fixed_scales("w4a8-guided", reconstruction={"guided": True}),
    "w4a8-guided-adaln8": _w4a8_fixed_scales("w4a8-guided-adaln8", reconstruction={"guided": True},
                                   layers={"linear:*norm*.linear": {"weights": {"bits": 8}}}),
    # 4-bit weights on the DiTs (issue 18): what closes the gap to 32 dB, and what it costs in bytes
    "w4a8-g32": _w4a8_fixed_scales("w4a8-g32", weights={"granularity": "group", "group_size": 32}),
    "w4a8-g64": _w4a8_fixed_scales("w4a8-g64", weights={"granularity": "group", "group_size": 64}),
    "w4a8-adaln8": _w4a8_fixed_scales("w4a8-adaln8", layers={"linear:*norm*.linear": {"weights": {"bits": 8}}}),
    "w4a8-ff8": _w4a8_fixed_scales("w4a8-ff8", layers={"linear:*.ff.net.*": {"weights": {"bits": 8}}}),
    "w4a8-lr8": _w4a8_fixed_scales("w4a8-lr8", low_rank={"rank": 8}),
    "w4a8-lr16": _w4a8_fixed_scales("w4a8-lr16", low_rank={"rank": 16}),
    # the reconstruction learns the weight scales with the rounding
    "w4a8-lws": _variant("w4a8", "w4a8-lws", reconstruction={"learn_weight_scales": True}),
    "w4a8-fixedscales": _w4a8_fixed_scales("w4a8-fixedscales"),  # w4a8 before it learned its weight scales
    # the shipped w4a8 (learned weight scales) with: noise correction in the sampler, auto's longer reconstruction,
    # 8-bit AdaLN modulation, or a rank-16 low-rank branch with groups of 32 (the DiT cells, issue 18)
    # w8a8 with the cross-attention K/V projections (they read the text encoder's states) weight-only
    "w8a8-kvwo": _variant("w8a8", "w8a8-kvwo", layers={"conv:*": {"weight_only": True},
                                                       "linear:*attn2.to_k": {"weight_only": True},
                                                       "linear:*attn2.to_v": {"weight_only": True}}),
    "w4a8-lws-ptqd": _variant("w4a8", "w4a8-lws-ptqd", correction={"method": "ptqd"}),
    "w4a8-lws-bias": _variant("w4a8", "w4a8-lws-bias", correction={"method": "bias"}),
    "w4a8-lws-it1600": _variant("w4a8", "w4a8-lws-it1600", reconstruction={"iterations": 1600, "num_samples": 64}),
    "w4a8-lws-adaln8": _variant("w4a8", "w4a8-lws-adaln8", layers={"linear:*norm*.linear": {"weights": {"bits": 8}}}),
    # automatic mixed precision at w4a8's bytes with 1600 or 3200 reconstruction iterations per block (issue 17)
    "auto-it1600": _variant("auto", "auto-it1600", reconstruction={"iterations": 1600}),
    "auto-it3200": _variant("auto", "auto-it3200", reconstruction={"iterations": 3200}),
    "auto-guided": _variant("auto", "auto-guided", reconstruction={"iterations": 1600}, mixed_precision={"guided": True}),
    "w4a8-lws-lr16g32": _variant("w4a8", "w4a8-lws-lr16g32", low_rank={"rank": 16},
                                 weights={"granularity": "group", "group_size": 32}),
    # w4a4 with w4a8's block reconstruction (learned rounding and weight scales of the residual weights)
    "w4a4-brecq": _variant("w4a4-svd", "w4a4-brecq", reconstruction={"unit": "block", "iterations": 400, "num_samples": 32,
                                                                 "learn_act_scales": False, "learn_weight_scales": True}),
    "w4a4-lr64": _variant("w4a4-svd", "w4a4-lr64", low_rank={"rank": 64}),
    # w4a4-svd with 8-bit convolution inputs; with w4a8's block reconstruction too: the recipe w4a4 since 2026-12-01
    "w4a4-a8conv": _variant("w4a4-svd", "w4a4-a8conv", layers={"conv:*": {"activations": {"bits": 8}}}),
    "w4a4-a8conv-brecq": _variant("w4a4-svd", "w4a4-a8conv-brecq", layers={"conv:*": {"activations": {"bits": 8}}},
                                  reconstruction={"unit": "block", "iterations": 400, "num_samples": 32,
                                                  "learn_act_scales": False, "learn_weight_scales": True}),
    "w4a4-a8conv-lr64": _variant("w4a4-svd", "w4a4-a8conv-lr64", low_rank={"rank": 64},
                                 layers={"conv:*": {"activations": {"bits": 8}}}),
    # the recipe w8a8-smooth with alpha searched per layer (0 among the choices: a layer it does not help keeps none)
    "w8a8-smooth-search": _variant("w8a8", "w8a8-smooth-search",
                                   smoothing={"alpha": None, "search_grid": [0.0, 0.25, 0.5, 0.75]}),
    "w8a8-tokenlin": _variant("w8a8-static", "w8a8-tokenlin", layers={
        p: {"activations": {"granularity": "token", "symmetric": True}} for p in LINEAR_PATTERNS}),
    # The techniques' ablation under the protocol (issue 18, `--verdicts`): each row adds one technique to the static
    # recipe (the activation-side techniques act on calibrated ranges, which w8a8's per-token inputs do not have) or
    # changes one part of w4a8 (the weight-side ones). The recipe w8a8-time is the per-step tables' row.
    **{f"w8a8-static+{name}": _variant("w8a8-static", f"w8a8-static+{name}", **changes) for name, changes in {
        "split": {"split": {"weights": True, "activations": True}},
        "smooth": {"smoothing": {"alpha": 0.5}},
        "rotation": {"rotation": {"seed": 0}},
        "normal": {"calibration": {"sampler": {"kind": "normal", "mean": 0.4, "std": 0.4}}},
        "pcr": {"calibration": {"sampler": {"kind": "progressive", "rounds": 1}}},
        "interval4": {"time": {"mode": "interval", "num_intervals": 4},
                      "calibration": {"sampler": "all", "num_timesteps": 25}},
        "tdq": {"time": {"mode": "learned"}, "calibration": {"sampler": "all", "num_timesteps": 25}},
        "brecq": {"reconstruction": {"unit": "block", "iterations": 400, "num_samples": 32, "learn_act_scales": True}},
        "bias": {"correction": {"method": "bias"}},
    }.items()},
    "w4a8-norecon": _variant("w4a8", "w4a8-norecon", reconstruction=None),
    "w4a8-nosplit": _variant("w4a8", "w4a8-nosplit", split=None),
    "w4a8+lr16": _variant("w4a8", "w4a8+lr16", low_rank={"rank": 16}),
    # a Hadamard rotation of the linear inputs in front of 4-bit weights (QuaRot): it spreads the weights' outlier
    # input channels over all channels before the per-output-channel 4-bit grid is fitted
    "w4a8+rotation": _variant("w4a8", "w4a8+rotation", rotation={"seed": 0}),
    "w4a4+rotation": _variant("w4a4-svd", "w4a4+rotation", rotation={"seed": 0}),
    # how many weight bits the 32 dB line of issue 18 asks for on a model: weight-only round-to-nearest (MSE range
    # per output channel, no calibration) at 4-6 bits, and the shipped w4a8 recipe with 5- or 6-bit weights
    **{f"int{b}-wo": {"name": f"int{b}-wo", "weights": {"bits": b, "symmetric": True, "granularity": "channel",
                                                       "method": "mse"}, "activations": None, "attention": None}
       for b in (4, 5, 6)},
    **{f"w{b}a8": _variant("w4a8", f"w{b}a8", weights={"bits": b}, reconstruction={"weight_scale_max_bits": b})
       for b in (5, 6)},
}
# base -> the variants --verdicts compares with it, cell by cell (the `w4a8-lws-*` rows are w4a8 + one technique)
# `w8a8-time@sampled`: per-step tables as measured before their observers kept exact tails (2026-12-01, 13:25 UTC);
# `w8a8-static@stratified`: the pooled range judged on exact tails too (not shipped: the pooled sample holds them)
VERDICTS = {
    "w8a8-static": ["w8a8-time", "w8a8-time@sampled", "w8a8-static+interval4", "w8a8-static+tdq", "w8a8-static@stratified",
                    *(f"w8a8-static+{n}" for n in ("split", "smooth", "rotation", "normal", "pcr", "brecq", "bias"))],
    "w4a8": ["w4a8-norecon", "w4a8-nosplit", "w4a8-lws-ptqd", "w4a8-lws-bias", "w4a8+rotation"],
    # w4a4 (2026-12-01, twelfth session) = w4a4-svd + 8-bit convolution inputs (w4a4-a8conv) + learned rounding
    "w4a4-svd": ["w4a4-a8conv", "w4a4", "w4a4+rotation"],
    "w4a4-a8conv": ["w4a4"],
}
UNCALIBRATED = ("int8-wo", "torchao-int8dyn", "torchao-int8dyn+conv-wo")


@functools.lru_cache(maxsize=None)
def method_config(method: str) -> QuantConfig:
    if method.startswith("torchao-int8dyn"):
        return QuantConfig.from_dict(WEIGHT_ONLY_INT8)  # (not used to quantize: a config without calibration)
    if method in METHODS:
        return QuantConfig.from_dict(METHODS[method])
    if method.endswith((".yaml", ".yml")) or method in _recipes():
        return load_recipe(method)
    raise SystemExit(f"unknown method {method!r}: {', '.join([*METHODS, *_recipes()])} or a recipe file")


def _recipes() -> list[str]:
    return sorted(p.stem for p in (REPO / "pipelines").glob("*.yaml"))


def apply_torchao(pipe, same_layers: bool = False) -> None:
    """torchao's int8 dynamic quantization on the denoiser's linear layers (``same_layers``: only those that
    dmquant's w8a8 quantizes)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from dmquant.models.adapters import find_denoiser
    from dmquant.nn.wrap import selected

    _, denoiser, adapter = find_denoiser(pipe)
    w8a8 = load_recipe("w8a8")  # the layers dmquant's w8a8 quantizes (its default excludes: time MLP, ...)
    quantize_(denoiser, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and (
                  not same_layers or selected(fqn, w8a8, adapter, "linear")))


def _has_selected_conv(pipe) -> bool:
    """Whether w8a8 quantizes any convolution of the denoiser (DiTs and MMDiTs: their patch embedding only,
    which the defaults leave in full precision)."""
    from dmquant.models.adapters import find_denoiser
    from dmquant.nn.wrap import selected

    _, denoiser, adapter = find_denoiser(pipe)
    config = load_recipe("w8a8")
    return any(isinstance(m, torch.nn.Conv2d) and selected(n, config, adapter, "conv") for n, m in denoiser.named_modules())


def reference(short: str, guidance: float, n: int, weights: str) -> np.ndarray:
    path = OUT / f"{short}-{weights}-fp-g{guidance:g}-{n}.npz"
    if path.is_file():
        return np.load(path)["images"]
    pipe = load(short)
    images = generate(pipe, model_inputs(pipe, MODELS[short][1], eval_prompts(MODELS[short][1], n)), guidance)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images)
    return images


def uncalibrated(method: str) -> bool:
    """Methods whose result does not depend on the calibration prompts (no activation ranges, no fitting)."""
    return method in UNCALIBRATED or not method_config(method).needs_calibration_data


def result_path(short: str, weights: str, set_name: str, guidance: float, method: str, n: int) -> Path:
    set_part = "any" if uncalibrated(method) else set_name
    threads = torch.get_num_threads()
    suffix = "" if threads == 1 else f"-t{threads}"
    return OUT / f"{short}-{weights}-{set_part}-g{guidance:g}-{Path(method).stem}-{n}{suffix}.json"


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """A hash of the package's code as Python sees it (the AST of every dmquant/ module, docstrings left out; the zoo
    weights are not code): a cached row is reused by recipe digest, so two rows of one recipe can come from code that
    computes differently (a w4a4 cell of tiny-shapes-dit moved 28.46 -> 28.21 dB between 2026-11-30 and 2026-12-01
    with its recipe unchanged). Rows store it; :func:`paired_table` marks pairs measured with different code."""
    import ast

    digest = hashlib.sha256()
    for path in sorted((REPO / "dmquant").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        digest.update(path.relative_to(REPO).as_posix().encode() + ast.dump(tree).encode())
    return digest.hexdigest()[:10]


RANGE_ESTIMATOR = "stratified"  # per-step MSE ranges on exact tails + sampled bulk (RangeObserver.strata), 2026-12-01


def _tables_by_mse(config: QuantConfig) -> bool:
    """Whether the recipe fits per-timestep activation ranges by MSE (what the stratified per-step observers changed)."""
    acts, attn = config.activations, config.attention
    return config.time is not None and ((acts is not None and acts.static and acts.method == "mse")
                                        or (attn is not None and attn.method == "mse"))


def run_cell(short: str, set_name: str, guidance: float, method: str, n: int, calib_prompts: int,
             force: bool = False) -> dict:
    from dmquant.metrics.clip_score import clip_scores_per_image, compute_clip_score
    from dmquant.metrics.fidelity import fidelity_metrics, psnr_per_image
    from dmquant.zoo.judge import JUDGE

    kind = MODELS[short][1]
    weights = fingerprint(short)
    path = result_path(short, weights, set_name, guidance, method, n)
    digest = None if method.startswith("torchao-int8dyn") else method_config(method).digest()
    if path.is_file() and not force:
        cached = json.loads(path.read_text())
        if cached.get("config_digest", digest) != digest:  # rows from before the digest existed are taken
            raise SystemExit(f"{path.name} was measured with another recipe for {method!r} (the recipe changed "
                             "since): rerun the cell with --force")
        if digest is not None and _tables_by_mse(method_config(method)) and "range_estimator" not in cached:
            raise SystemExit(f"{path.name} was measured before per-step MSE ranges were judged on a stratified sample "
                             "(2026-12-01): rerun the cell with --force")
        return cached
    ref = reference(short, guidance, n, weights)
    prompts = eval_prompts(kind, n)
    pipe = load(short)
    start = time.perf_counter()
    if method.startswith("torchao-int8dyn"):
        if method.endswith("+conv-wo") and _has_selected_conv(pipe):
            dmquant.quantize(pipe, QuantConfig.from_dict(CONV_WEIGHT_ONLY_INT8), progress=False)
        apply_torchao(pipe, same_layers=method.endswith("+conv-wo"))
        calib = None
    else:
        config = method_config(method)
        calib = None if uncalibrated(method) else \
            calibration_prompts(set_name, kind)[: min(calib_prompts, config.calibration.max_prompts)]
        dmquant.quantize(pipe, config, prompts=None if uncalibrated(method) else model_inputs(pipe, kind, calib),
                         progress=False, guidance_scale=guidance)
    seconds = time.perf_counter() - start
    images = generate(pipe, model_inputs(pipe, kind, prompts), guidance)
    result = {"model": short, "weights": weights, "set": "any" if uncalibrated(method) else set_name,
              "guidance": guidance, "method": method, "config_digest": digest, "num_images": n,
              "threads": torch.get_num_threads(), "range_estimator": RANGE_ESTIMATOR, "code": code_fingerprint(),
              "calibration_prompts": None if calib is None else len(calib),
              "calibration_seconds": round(seconds, 1),
              "clip_score": compute_clip_score(images, prompts, JUDGE, "cpu"),
              "clip_score_fp": compute_clip_score(ref, prompts, JUDGE, "cpu"),
              "clip_per_image": [round(v, 3) for v in clip_scores_per_image(images, prompts, JUDGE, "cpu")],
              "clip_per_image_fp": [round(v, 3) for v in clip_scores_per_image(ref, prompts, JUDGE, "cpu")],
              **fidelity_metrics(images, ref), "psnr_per_image": [None if not np.isfinite(v) else round(float(v), 4)  # None: identical to FP's
                                   for v in psnr_per_image(images, ref)]}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def current_rows(n: int | None = None) -> list[dict]:
    prints: dict[str, str] = {}
    rows = []
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        if r["model"] not in prints:
            try:
                prints[r["model"]] = fingerprint(r["model"])
            except (FileNotFoundError, KeyError):
                prints[r["model"]] = ""
        if r["weights"] == prints[r["model"]] and (n is None or r["num_images"] == n) and r.get("threads", 1) == 1:
            rows.append(r)
    return rows


def expand(rows: list[dict]) -> list[dict]:
    """Rows per cell: a method that does not depend on the prompt set counts in every cell (model, set,
    guidance) measured with a calibrated method, or as one cell ``any`` where none was."""
    cells = {(r["model"], r["set"], r["guidance"], r["num_images"]) for r in rows if r["set"] != "any"}
    out = [r for r in rows if r["set"] != "any"]
    for r in rows:
        if r["set"] != "any":
            continue
        sets = [c[1] for c in cells if (c[0], c[2], c[3]) == (r["model"], r["guidance"], r["num_images"])]
        out += [{**r, "set": s} for s in (sets or ["any"])]
    return out


def merge_aliases(rows: list[dict]) -> list[dict]:
    """Methods measured with one and the same recipe (every row of each that has a ``config_digest`` has the same, e.g.
    ``w4a8`` and ``w4a8-lws`` since w4a8 learns its weight scales) become one method named ``a = b``, one row per
    cell (the first name's where both ran it)."""
    digests: dict[str, set] = {}
    for r in rows:  # rows from before digests were stored count as the current recipe's, as the cache takes them
        digests.setdefault(r["method"], set()).update({r["config_digest"]} if r.get("config_digest") else set())
    same: dict[str, list[str]] = {}
    for method, ds in sorted(digests.items()):
        if len(ds) == 1:
            same.setdefault(next(iter(ds)), []).append(method)
    name = {m: " = ".join(ms) for ms in same.values() if len(ms) > 1 for m in ms}
    out, seen = [], set()
    for r in sorted(rows, key=lambda r: r["method"]):
        key = (name.get(r["method"], r["method"]), r["model"], r["set"], r["guidance"], r["num_images"])
        if key not in seen:
            seen.add(key)
            out.append({**r, "method": key[0]})
    return out


def clip_delta(r: dict) -> float:
    return 100 * (r["clip_score"] - r["clip_score_fp"]) / r["clip_score_fp"]


def table(rows: list[dict]) -> str:
    rows = expand(merge_aliases(rows))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    lines = ["| method | cells | PSNR median | PSNR worst (cell) | CLIP Δ% median | CLIP Δ% worst |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, rs in sorted(by_method.items()):
        ps = [r["psnr_vs_reference"] for r in rs]
        worst = min(rs, key=lambda r: r["psnr_vs_reference"])
        cd = [clip_delta(r) for r in rs]
        lines.append(f"| {method} | {len(rs)} | {statistics.median(ps):.2f} | {min(ps):.2f} "
                     f"({worst['model']}, {worst['set']}, {worst['guidance']:g}) | {statistics.median(cd):+.2f} "
                     f"| {min(cd):+.2f} |")
    return "\n".join(lines)


def cell_table(rows: list[dict]) -> str:
    rows = expand(merge_aliases(rows))
    methods = sorted({r["method"] for r in rows})
    cells = sorted({(r["model"], r["set"], r["guidance"], r["num_images"]) for r in rows})
    lines = ["| model | set | CFG | n | " + " | ".join(methods) + " |", "| --- " * (4 + len(methods)) + "|"]
    for c in cells:
        vals = {r["method"]: r["psnr_vs_reference"] for r in rows if (r["model"], r["set"], r["guidance"], r["num_images"]) == c}
        lines.append(f"| {c[0]} | {c[1]} | {c[2]:g} | {c[3]} | "
                     + " | ".join(f"{vals[m]:.2f}" if m in vals else "" for m in methods) + " |")
    return "\n".join(lines)


def paired_cells(rows: list[dict], base: str, other: str, resamples: int = 2000):
    """``(cell, rows of the two methods, paired difference)`` per cell where both methods stored per-image PSNRs:
    the mean of (``base`` - ``other``) over the images both leave finite, with a paired bootstrap 95% interval (seed
    0). ``cell`` is ``(model, set, guidance, num_images)``; the rows are keyed by method (all methods of the cell)."""
    found = {}
    for r in expand(rows):
        found.setdefault((r["model"], r["set"], r["guidance"], r["num_images"]), {})[r["method"]] = r
    for cell, methods in sorted(found.items()):
        if all(methods.get(m, {}).get("psnr_per_image") for m in (base, other)):
            a, b = (np.array([np.nan if v is None else v for v in methods[m]["psnr_per_image"]]) for m in (base, other))
            yield cell, methods, paired_difference(a, b, resamples)


def paired_table(rows: list[dict], base: str, other: str, resamples: int = 2000) -> str:
    """Per cell: :func:`paired_cells`' difference ``base`` - ``other`` and its interval: whether a gap between two rows
    is larger than the images' spread."""
    lines = [f"| model | set | CFG | n | {base} - {other} (mean of per-image PSNR) | 95% interval | same code |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for cell, methods, d in paired_cells(rows, base, other, resamples):
        lo, hi = d["ci95"]
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]:g} | {cell[3]} | {d['mean']:+.2f} | {lo:+.2f} .. {hi:+.2f} | "
                     f"{same_code(methods[base], methods[other])} |")
    return "\n".join(lines)


def same_code(a: dict, b: dict) -> str:
    """Whether two rows were measured with the same package code (:func:`code_fingerprint`): yes, no, or ? (a row from
    before rows recorded it)."""
    if "code" not in a or "code" not in b:
        return "?"
    return "yes" if a["code"] == b["code"] else "no"


def _paired_counts(cells: list) -> tuple[list[float], int, int, int]:
    """Of :func:`paired_cells`' output: the per-cell mean differences, and in how many cells the difference is above 0,
    significantly above 0 and significantly below 0 (its 95% interval entirely above / below)."""
    diffs = [d["mean"] for _, _, d in cells]
    return (diffs, sum(x > 0 for x in diffs), sum(d["ci95"][0] > 0 for _, _, d in cells),
            sum(d["ci95"][1] < 0 for _, _, d in cells))


def paired_summary(rows: list[dict], base: str, other: str, resamples: int = 2000) -> str:
    """Over the cells :func:`paired_cells` pairs: the difference's median and range, how many cells go up and how many
    significantly (interval above / below 0); each method's median and worst PSNR there; ``base``'s largest gap to
    ``int8-wo`` and in how many cells it is at least as close to FP as torchao on the same layers (issue 18's lines)."""
    cells = list(paired_cells(rows, base, other, resamples))
    if not cells:
        return f"no cell holds per-image PSNRs of both {base} and {other}"
    diffs, up, sig_up, _ = _paired_counts(cells)
    down = [f"{c[0]} {c[1]} {c[2]:g} ({d['mean']:+.2f})" for c, _, d in cells if d["ci95"][1] < 0]
    lines = [f"{len(cells)} cells, {base} - {other}: median {statistics.median(diffs):+.2f} dB, range "
             f"{min(diffs):+.2f} .. {max(diffs):+.2f}, up in {up}, significantly up in "
             f"{sig_up}, significantly down in {len(down)}: {', '.join(down)}",
             "rows from the same package code in " + str(sum(same_code(t[1][base], t[1][other]) == "yes" for t in cells))
             + f" of {len(cells)} cells (the others: different or unrecorded code, see code_fingerprint)"]
    for m in (base, other):
        worst = min(cells, key=lambda t: t[1][m]["psnr_vs_reference"])
        lines.append(f"{m}: median {statistics.median(t[1][m]['psnr_vs_reference'] for t in cells):.2f} dB, worst "
                     f"{worst[1][m]['psnr_vs_reference']:.2f} ({worst[0][0]}, {worst[0][1]}, {worst[0][2]:g})")
    gaps = [(t[1]["int8-wo"]["psnr_vs_reference"] - t[1][base]["psnr_vs_reference"], t[0]) for t in cells
            if "int8-wo" in t[1]]
    same = "torchao-int8dyn+conv-wo"
    ahead = [t[1][base]["psnr_vs_reference"] - t[1][same]["psnr_vs_reference"] for t in cells if same in t[1]]
    if gaps:
        gap, cell = max(gaps)
        lines.append(f"{base}: largest gap to int8-wo {gap:.2f} dB ({cell[0]}, {cell[1]}, {cell[2]:g})")
    if ahead:
        lines.append(f"{base} at least as close to FP as {same} in {sum(x >= 0 for x in ahead)} of {len(ahead)} cells "
                     f"(least margin {min(ahead):+.2f} dB)")
    return "\n".join(lines)


def verdict_table(rows: list[dict], verdicts: dict[str, list[str]] = VERDICTS, resamples: int = 2000) -> str:
    """One row per technique of :data:`VERDICTS`: over the cells where it and its base stored per-image PSNRs, the paired
    difference technique - base (median, worst and best cell; in how many cells it is up, significantly up and
    significantly down: the bootstrap 95% interval above or below 0) and the worst cell of each."""
    rows = merge_aliases(rows)
    alias = {m: r["method"] for r in rows for m in r["method"].split(" = ")}
    lines = ["| base | technique | cells | median Δ dB | worst Δ (cell) | best Δ | up / signif. up / signif. down | "
             "worst PSNR: technique / base |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for base, techniques in verdicts.items():
        for tech in techniques:
            cells = list(paired_cells(rows, alias.get(tech, tech), alias.get(base, base), resamples))
            if not cells:
                lines.append(f"| {base} | {tech} | 0 | | | | | |")
                continue
            diffs, up, sig_up, sig_down = _paired_counts(cells)
            worst = min(cells, key=lambda t: t[2]["mean"])
            psnr = [(min(t[1][alias.get(m, m)]["psnr_vs_reference"] for t in cells)) for m in (tech, base)]
            lines.append(f"| {base} | {tech} | {len(cells)} | {statistics.median(diffs):+.2f} | {min(diffs):+.2f} "
                         f"({worst[0][0]} {worst[0][1]} {worst[0][2]:g}) | {max(diffs):+.2f} | {up} / {sig_up} / {sig_down} "
                         f"| {psnr[0]:.2f} / {psnr[1]:.2f} |")
    return "\n".join(lines)


def clip_relative(row: dict, resamples: int = 2000) -> tuple[float, float, float, float]:
    """A row's judge CLIP relative to FP's from its per-image scores: ``(FP's mean, difference in % of it, the paired
    bootstrap 95% interval's two ends in %)``."""
    q, f = np.array(row["clip_per_image"]), np.array(row["clip_per_image_fp"])
    d = paired_difference(q, f, resamples)
    base = float(f.mean())
    return base, 100 * d["mean"] / base, 100 * d["ci95"][0] / base, 100 * d["ci95"][1] / base


def clip_table(rows: list[dict], methods: list[str], resamples: int = 2000) -> str:
    """Per cell and method where per-image CLIP scores are stored: the method's CLIP score relative to FP's
    (:func:`clip_relative`): whether a CLIP line like "within 0.5% of FP" is met, missed, or beyond what 200 images
    can tell (the interval straddles the line). The models that barely draw their prompts (a low FP CLIP) have wide
    intervals."""
    lines = ["| model | set | CFG | n | method | FP CLIP | CLIP Δ% | 95% interval |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(expand(rows), key=lambda r: (r["model"], r["set"], r["guidance"], r["method"])):
        if r["method"] not in methods or not r.get("clip_per_image"):
            continue
        base, mean, lo, hi = clip_relative(r, resamples)
        lines.append(f"| {r['model']} | {r['set']} | {r['guidance']:g} | {r['num_images']} | {r['method']} | "
                     f"{base:.2f} | {mean:+.2f} | {lo:+.2f} .. {hi:+.2f} |")
    return "\n".join(lines)


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd")
    p.add_argument("--sets", default="zoo,terse,wordy")
    p.add_argument("--guidance", default="3,5,7.5")
    p.add_argument("--methods", default="int8-wo,torchao-int8dyn,w8a8")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--calib-prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true")
    p.add_argument("--cells", action="store_true", help="with --table: every cell's PSNR")
    p.add_argument("--paired", metavar="A,B", help="with --table: per cell, the paired per-image PSNR difference "
                   "A - B with a bootstrap 95%% interval (cells run since per-image PSNRs are stored)")
    p.add_argument("--summary", metavar="A,B", help="with --table: over the cells where both stored per-image PSNRs, "
                   "the paired difference A - B summarised, each one's median and worst, and A against issue 18's "
                   "lines (gap to int8-wo, cells at least as close as torchao on the same layers)")
    p.add_argument("--clip", metavar="METHODS", help="with --table: per cell, each method's CLIP score relative to "
                   "FP's with a paired bootstrap 95%% interval (cells run since per-image CLIP scores are stored)")
    p.add_argument("--verdicts", action="store_true", help="with --table: each technique of VERDICTS against its base "
                   "recipe, paired over the cells where both ran (the ablation under the protocol)")
    p.add_argument("--force", action="store_true", help="run the cells again even if cached (overwrites them)")
    p.add_argument("--write-sets", metavar="DIR", help="write the text prompt sets (calibration and the "
                   "held-out evaluation prompts) as DIR/<set>.txt, e.g. for `dmquant inspect`, and stop")
    a = p.parse_args(argv)
    if a.write_sets:
        out = Path(a.write_sets)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("zoo", "terse", "wordy"):
            (out / f"{name}.txt").write_text("\n".join(calibration_prompts(name, "text")) + "\n")
        (out / "eval.txt").write_text("\n".join(eval_prompts("text", 200)) + "\n")
        return
    if a.table:
        rows = current_rows(a.num_images)
        print(table(rows))
        if a.cells:
            print()
            print(cell_table(rows))
        if a.paired:
            print()
            print(paired_table(rows, *a.paired.split(",")))
        if a.summary:
            print()
            print(paired_summary(rows, *a.summary.split(",")))
        if a.verdicts:
            print()
            print(verdict_table(rows))
        if a.clip:
            print()
            print(clip_table(rows, a.clip.split(",")))
        return
    torch.set_num_threads(a.threads)
    _quiet()
    for short in a.models.split(","):
        kind = MODELS[short][1]
        sets = [s for s in a.sets.split(",") if kind == "text" or s in ("zoo", "terse")]
        for g in (float(x) for x in a.guidance.split(",")):
            for method in a.methods.split(","):
                for s in (sets[:1] if uncalibrated(method) else sets):
                    t0 = time.perf_counter()
                    r = run_cell(short, s, g, method, a.num_images, a.calib_prompts, a.force)
                    print(f"{short} {r['set']} g{g:g} {method}: PSNR {r['psnr_vs_reference']:.2f} dB, "
                          f"CLIP {clip_delta(r):+.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
