"""The outlier stage of calibration: smoothing factors from activation statistics, Hadamard rotation
and the SVD low-rank branch, attached to every wrapped layer that can take them.

Runs after the denoiser is wrapped and before activation ranges are observed (the observers must see
the transformed inputs); it quantizes each wrapped layer's weight (the residual where a branch was
attached). Smoothing needs calibration inputs (the per-channel maxima of each layer's input);
rotation and the low-rank branch need none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from dmquant.config import QuantConfig
from dmquant.errors import DMQuantError
from dmquant.formats import IntFormat
from dmquant.nn.layers import QuantLayer
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import full_precision, input_quantizers, quant_layers
from dmquant.quantizers.affine import fake_quant, qparams_from_range
from dmquant.quantizers.outliers import smoothing_factors

MAX_SAMPLE_PIXELS = 16 * 16  # a conv layer's input sample is cropped to at most this many positions
SAMPLE_CALLS = 8  # the alpha search's sample is spread over this many calibration calls (several timesteps)


class _InputStats:
    """Per layer: the running max |x| of each input channel and, for the alpha search, an input sample
    taken from the first ``SAMPLE_CALLS`` calls (a spatial crop of one image for a conv, random tokens
    for a linear layer), so that it covers several timesteps."""

    def __init__(self, layer: QuantLayer, sample_tokens: int, keep_sample: bool, seed: int):
        self.layer, self.sample_tokens, self.keep_sample = layer, sample_tokens, keep_sample
        self.absmax: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples, dim=0)

    def __call__(self, module, args) -> None:
        x = args[0].detach()
        dims = [d for d in range(x.ndim) if d != module.channel_dim % x.ndim]
        amax = x.abs().amax(dim=dims).float().cpu()
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.keep_sample and len(self.samples) < SAMPLE_CALLS:
            self.samples.append(self._sample(x, module.channel_dim))

    def _sample(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if channel_dim == 1 and x.ndim == 4:  # conv: one image, spatially cropped
            h, w = x.shape[-2:]
            side = int(math.isqrt(MAX_SAMPLE_PIXELS))
            return x[:1, :, : min(h, side), : min(w, side)].clone()
        tokens = x.reshape(-1, x.shape[-1])
        per_call = max(1, self.sample_tokens // SAMPLE_CALLS)
        if tokens.shape[0] > per_call:
            idx = torch.randperm(tokens.shape[0], generator=self.generator)[:per_call]
            tokens = tokens[idx.to(tokens.device)]
        return tokens.clone()


@torch.no_grad()
def collect_input_stats(denoiser: nn.Module, calls: Iterable[tuple[tuple, dict]], sample_tokens: int,
                        keep_samples: bool, progress: bool = True) -> dict[str, _InputStats]:
    """Replay ``calls`` in full precision; per wrapped layer, channel maxima (and a sample) of its input."""
    stats = {name: _InputStats(layer, sample_tokens, keep_samples, seed=i)
             for i, (name, layer) in enumerate(quant_layers(denoiser))}
    handles = [stats[name].layer.register_forward_pre_hook(stats[name]) for name in stats]
    count = 0
    try:
        with full_precision(denoiser):
            for args, kwargs in tqdm(calls, desc="calibration: activation statistics for smoothing",
                                     disable=not progress):
                denoiser(*args, **kwargs)
                count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise DMQuantError("smoothing needs calibration inputs, and none were given: pass calibration prompts")
    return stats


def layer_rank(config: QuantConfig, weight: torch.Tensor) -> int:
    """The low-rank branch's rank for a layer: the recipe's rank, capped at ``max_fraction`` of
    ``min(out, in)`` of the weight's matrix view."""
    lr = config.low_rank
    if lr is None or lr.rank == 0:
        return 0
    limit = int(lr.max_fraction * min(weight.shape[0], weight[0].numel()))
    return max(0, min(lr.rank, limit))


def _make_branch(weight: torch.Tensor, config: QuantConfig, geometry, smooth: bool, rotate: bool) -> OutlierBranch:
    """An empty branch for a layer whose original weight is ``weight``."""
    return OutlierBranch(weight.shape[1], weight.shape[0], geometry, smooth=smooth,
                         rotation_seed=config.rotation.seed if rotate else None, rank=layer_rank(config, weight),
                         dtype=config.low_rank.dtype if config.low_rank is not None else "float16",
                         device=weight.device)


@torch.no_grad()
def _layer_error(layer: QuantLayer, branch: OutlierBranch, x: torch.Tensor, reference: torch.Tensor,
                 config: QuantConfig) -> float:
    """Output error of the layer quantized with ``branch`` on the sample ``x`` (activations quantized
    per the recipe: dynamic as configured, static with the sample's own min-max range)."""
    xt = branch.transform(x, layer.channel_dim)
    a = config.activations
    if a.static:
        fmt = IntFormat(a.bits, signed=a.symmetric)
        scale, zero = qparams_from_range(xt.amin().reshape(1), xt.amax().reshape(1), fmt, a.symmetric)
        xq = fake_quant(xt, scale[0], zero[0], fmt)
    else:
        quantizer = input_quantizers(a, None, None)(layer.channel_dim)
        quantizer.set_mode("quant")
        xq = quantizer(xt)
    out = layer.op(xq, layer.effective_weight(xq.dtype), layer.bias)
    extra = branch.low_rank(xt)
    out = out if extra is None else out + extra
    return float((out - reference).pow(2).mean())


def _search_alpha(layer: QuantLayer, config: QuantConfig, stats: _InputStats, geometry, rotate: bool,
                  original: nn.Parameter) -> tuple[float, torch.Tensor]:
    """The alpha of the grid whose smoothed, quantized layer has the smallest output error on the sample."""
    x = stats.sample.to(original.device, original.dtype)
    with full_precision(layer):
        reference = layer(x)
    best = (math.inf, None, None)
    for alpha in config.smoothing.search_grid:
        factors = smoothing_factors(stats.absmax.to(original.device), original, alpha)
        branch = _make_branch(original, config, geometry, smooth=True, rotate=rotate)
        branch.smooth.copy_(factors)
        _attach(layer, branch, original)
        error = _layer_error(layer, branch, x, reference, config)
        if error < best[0]:
            best = (error, alpha, factors)
    return best[1], best[2]


def _attach(layer: QuantLayer, branch: OutlierBranch, original: nn.Parameter) -> None:
    layer.attach_outlier_branch(branch, original)
    layer.calibrate_weight()


def prepare_outlier_branches(denoiser: nn.Module, config: QuantConfig,
                             calls: Iterable[tuple[tuple, dict]] | None = None, progress: bool = True) -> dict:
    """Attach smoothing / rotation / low-rank branches to the wrapped layers of ``denoiser`` and
    quantize every wrapped layer's weight (the residual where a branch was attached); returns a
    report (counts, per-layer alphas of a search, layers left out and why, bytes of the branches)."""
    if not config.has_outlier_branch:
        return {}
    sm = config.smoothing
    stats = None
    if sm is not None:
        if calls is None:
            raise DMQuantError("smoothing needs calibration inputs: pass calibration prompts (or calibration_data)")
        stats = collect_input_stats(denoiser, calls, sm.sample_tokens, sm.alpha is None, progress)
    report = {"layers": 0, "smoothed": 0, "rotated": 0, "low_rank": 0, "rank_capped": 0, "left_out": {},
              "alpha": {}, "branch_bytes": 0}
    layers = quant_layers(denoiser)
    for name, layer in tqdm(layers, desc="outliers: smoothing / rotation / low-rank", disable=not progress):
        if not layer.can_take_branch:
            report["left_out"][name] = "grouped or non-zero-padded convolution"
            layer.calibrate_weight()
            continue
        geometry = layer.branch_geometry()
        original = layer.weight
        rotate = config.rotation is not None
        if rotate and (original.shape[1] % 2 or layer.split is not None):
            rotate = False
            report["left_out"][name] = ("odd channel count: not rotated" if original.shape[1] % 2 else
                                        "skip concatenation with split quantizers: not rotated")
        weight_only = not len(layer.input_quantizers)
        smooth = stats is not None and not weight_only and stats[name].absmax is not None
        if sm is not None and weight_only:
            report["left_out"][name] = "weight-only layer (inputs not quantized): not smoothed"
        elif sm is not None and not smooth:
            report["left_out"][name] = "never ran on the calibration inputs: not smoothed"
        if smooth and sm.alpha is None:
            alpha, factors = _search_alpha(layer, config, stats[name], geometry, rotate, original)
            report["alpha"][name] = alpha
        elif smooth:
            factors = smoothing_factors(stats[name].absmax.to(original.device), original, sm.alpha)
        branch = _make_branch(original, config, geometry, smooth=smooth, rotate=rotate)
        if smooth:
            branch.smooth.copy_(factors)
        _attach(layer, branch, original)
        report["layers"] += 1
        report["smoothed"] += int(smooth)
        report["rotated"] += int(rotate)
        report["low_rank"] += int(branch.rank > 0)
        report["rank_capped"] += int(config.low_rank is not None and branch.rank < config.low_rank.rank)
        report["branch_bytes"] += branch.nbytes()
    if report["layers"] == 0:
        raise DMQuantError("no quantized layer can take the smoothing / rotation / low-rank branch of this recipe: "
                           "drop those sections or widen 'include'")
    return report
