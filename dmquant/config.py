"""Typed configs (one dataclass per technique, validated when built) and recipe loading.

A recipe is a YAML file under ``pipelines/`` (or any path) whose keys mirror :class:`QuantConfig`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmquant.errors import DMQuantError
from dmquant.formats import FORMAT_NAMES, check_bits
from dmquant.quantizers.affine import SCALE_DTYPES
from dmquant.quantizers.ranges import RANGE_METHODS

RECIPE_DIRS = (
    Path(__file__).resolve().parent / "recipes",  # wheels ship a copy here
    Path(__file__).resolve().parent.parent / "pipelines",  # a source checkout
)
SAMPLERS = ("uniform", "normal", "beta", "all", "progressive")
TIME_MODES = ("step", "interval", "learned")
RECONSTRUCTION_UNITS = ("layer", "block")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise DMQuantError(f"{what}={value!r} is not known: use one of {', '.join(choices)}")


def _check_positive_ints(config, names: tuple[str, ...], section: str) -> None:
    """Each of ``names`` on ``config`` must be a positive integer (the error names ``section.name``)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise DMQuantError(f"{section}.{name}={value!r} must be a positive integer")


def _check_percentile(percentile: float) -> None:
    if not 50.0 < float(percentile) <= 100.0:
        raise DMQuantError(f"percentile={percentile} must lie in (50, 100], e.g. 99.9 or 99.99")


def _check_format(config, section: str) -> None:
    """``format``: ``int`` (a grid of ``bits``) or ``fp8_e4m3`` (8 bits, symmetric: no zero point)."""
    _check_choice(config.format, FORMAT_NAMES, f"{section}.format")
    if config.format == "fp8_e4m3":
        if config.bits != 8:
            raise DMQuantError(f"{section}.format='fp8_e4m3' has 8 bits: set {section}.bits=8 (or leave it out)")
        if config.symmetric is False:
            raise DMQuantError(f"{section}.format='fp8_e4m3' is symmetric (no zero point): set "
                               f"{section}.symmetric=true (or leave it out)")


@dataclass(frozen=True)
class WeightQuantConfig:
    """How weights are quantized: bits, grid and granularity (per tensor/channel/group).

    ``format``: ``int`` (an integer grid of ``bits``) or ``fp8_e4m3`` (float8 e4m3 codes, 8 bits,
    symmetric, ``scale = amax / 448`` per row; rounding to nearest only).
    ``scale_dtype``: how the scales (and zero points) are stored, ``float32`` or ``float16`` (rounded to
    float16 before the codes are computed; 2 bytes a scale).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    method: str = "minmax"
    percentile: float = 99.99
    format: str = "int"
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_bits(self.bits, "weights.bits")
        _check_format(self, "weights")
        _check_choice(self.granularity, ("tensor", "channel", "group"), "weights.granularity")
        _check_choice(self.method, RANGE_METHODS, "weights.method")
        _check_choice(self.scale_dtype, tuple(SCALE_DTYPES), "weights.scale_dtype")
        _check_percentile(self.percentile)
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise DMQuantError("weights.granularity='group' needs weights.group_size, a positive integer (e.g. 64)")


@dataclass(frozen=True)
class ActQuantConfig:
    """How layer inputs are quantized: static per tensor (calibrated), or dynamic per token, per
    group of ``group_size`` channels of each token (computed on the fly, as the W4A4 kernel does) or per
    sample (``sample``: one range per batch element, computed on the fly; the dynamic choice that integer
    convolutions can use).

    ``format``: ``int`` or ``fp8_e4m3`` (float8 e4m3, ``scale = amax / 448`` of the tensor or token).
    ``symmetric`` left out means asymmetric for ``int`` and symmetric for ``fp8_e4m3`` (its only kind).
    """

    bits: int = 8
    symmetric: bool | None = None
    granularity: str = "tensor"
    method: str = "minmax"
    percentile: float = 99.99
    group_size: int | None = None
    format: str = "int"

    def __post_init__(self) -> None:
        check_bits(self.bits, "activations.bits")
        _check_format(self, "activations")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.format == "fp8_e4m3")
        _check_choice(self.granularity, ("tensor", "token", "group", "sample"), "activations.granularity")
        _check_choice(self.method, RANGE_METHODS, "activations.method")
        _check_percentile(self.percentile)
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise DMQuantError("activations.granularity='group' needs activations.group_size, a positive integer "
                               "(e.g. 32 or 64)")

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"


@dataclass(frozen=True)
class AttentionQuantConfig:
    """Quantization of the two attention matmuls: Q·Kᵀ (q, k) and softmax·V (probs, v).

    ``probs_bits=None`` keeps the softmax output in full precision (Q-Diffusion does so for SD).
    ``kernel``: ``fake-quant`` simulates static per-tensor Q/K/V (and probability) quantizers
    calibrated on data; ``int8`` runs the SageAttention-style kernel (smoothed K, per-block int8 Q·Kᵀ,
    16-bit P·V; Triton on CUDA, its torch reference elsewhere), which needs no calibration.
    """

    bits: int = 8
    probs_bits: int | None = 8
    method: str = "minmax"
    kernel: str = "fake-quant"

    def __post_init__(self) -> None:
        _check_choice(self.kernel, ("fake-quant", "int8"), "attention.kernel")
        if self.kernel == "int8" and (self.bits != 8 or self.probs_bits is not None):
            raise DMQuantError("attention.kernel='int8' computes Q·Kᵀ in 8 bits and P·V in 16 bits: "
                               "set attention.bits=8 and attention.probs_bits=null")
        check_bits(self.bits, "attention.bits")
        if self.probs_bits is not None:
            check_bits(self.probs_bits, "attention.probs_bits")
        _check_choice(self.method, RANGE_METHODS, "attention.method")


@dataclass(frozen=True)
class TimestepSamplerConfig:
    """Which denoising steps feed calibration (diffusion time ``u = t / T``: 1 = pure noise, 0 = clean).

    ``uniform``: evenly spaced steps (Q-Diffusion). ``normal``: ``u ~ Normal(mean, std)`` clipped to
    [0, 1], drawn afresh for every prompt batch (PTQ4DM: mean 0.4, std 0.4); ``skew`` != 0 makes it a
    skew-normal (shape ``skew``; > 0 leans towards noise). ``beta``: ``u ~ Beta(alpha, beta)``
    (BitsFusion). ``all``: every step (TFMQ-DM's finite set). ``progressive``: uniform steps, then the
    inputs are recorded again along the trajectory of the quantized model itself and the ranges
    re-estimated on them (PCR), ``rounds`` times.
    """

    kind: str = "uniform"
    mean: float = 0.4
    std: float = 0.4
    skew: float = 0.0
    alpha: float = 2.0
    beta: float = 2.0
    rounds: int = 1

    def __post_init__(self) -> None:
        _check_choice(self.kind, SAMPLERS, "calibration.sampler.kind")
        if not 0.0 <= float(self.mean) <= 1.0 or not float(self.std) > 0.0:
            raise DMQuantError(f"calibration.sampler: mean={self.mean} must lie in [0, 1] and std={self.std} "
                               "be positive (fractions of the training timesteps T, e.g. 0.4 and 0.4)")
        if not (float(self.alpha) > 0 and float(self.beta) > 0):
            raise DMQuantError(f"calibration.sampler: Beta(alpha={self.alpha}, beta={self.beta}) needs positive parameters")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise DMQuantError(f"calibration.sampler.rounds={self.rounds!r} must be a positive integer")


@dataclass(frozen=True)
class TimeConditioningConfig:
    """Activation ranges indexed by the timestep: a scale / zero-point table over the sampling steps.

    ``step``: one entry per sampling step (TFMQ-DM); a step that calibration did not record takes the
    nearest recorded one. ``interval``: ``num_intervals`` contiguous groups of steps share an entry
    (TuneQDM). ``learned``: a small MLP over a Fourier embedding of ``t`` gives the range (TDQ), fitted
    to the per-step ranges and evaluated for the scheduler's steps before generation. At inference a
    timestep outside the table falls back to the nearest entry (warned once).
    """

    mode: str = "step"
    num_intervals: int = 4
    embedding_dim: int = 8
    hidden_dim: int = 32
    iterations: int = 300

    def __post_init__(self) -> None:
        _check_choice(self.mode, TIME_MODES, "time.mode")
        _check_positive_ints(self, ("num_intervals", "embedding_dim", "hidden_dim", "iterations"), "time")


@dataclass(frozen=True)
class SkipSplitConfig:
    """Q-Diffusion shortcut splitting: the two parts of a UNet skip concatenation get their own quantizers."""

    weights: bool = True
    activations: bool = True

    def __post_init__(self) -> None:
        if not (self.weights or self.activations):
            raise DMQuantError("split: set weights or activations to true (or drop the 'split' section)")


@dataclass(frozen=True)
class ReconstructionConfig:
    """AdaRound learned rounding of weights, layer by layer or block by block (BRECQ).

    Minimises the output error of each unit against the full-precision unit on calibration inputs,
    plus a regulariser that drives the rounding variables to 0 or 1 (its exponent annealed from
    ``beta_start`` to ``beta_end``). ``learn_act_scales`` learns the static activation scales in the
    same loop (LSQ-style; ``act_learning_rate`` is relative to each scale); ``learn_weight_scales`` the weight
    scales too (one per output channel or group; the integer part ``floor(W / s)`` stays that of the starting
    scale, so the scale and the rounding are learned together; the same relative learning rate) of the weights of at
    most ``weight_scale_max_bits`` bits: on finer grids the rounding error sits below the 8-bit activations' noise,
    the scale's gradient is that noise, and Adam's normalised steps let the scale wander (on tiny-shapes-sd's mixed
    plan, 8-bit scales drifted up to 9x and cost 13 dB: eval/RESULTS.md). ``num_samples`` recorded
    denoiser calls feed it.

    ``guided``: on calls that carry both halves of classifier-free guidance (the pipeline doubled the
    latents: both halves equal), the loss adds ``g² · |e_cond - e_uncond|²`` to ``|e|²`` (``e``: the unit's
    output error; normalised to ``|e|²`` on the first step): the guided prediction ``uncond + g (cond -
    uncond)`` multiplies the error *difference* of the halves by ``g``, which the plain loss does not see.
    ``g`` is ``guidance_scale``, else the calibration run's (the pipeline's default when not given);
    calls without the doubled latents keep the plain loss.
    """

    unit: str = "block"
    iterations: int = 200
    learning_rate: float = 1e-2
    act_learning_rate: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learn_act_scales: bool = True
    learn_weight_scales: bool = False
    weight_scale_max_bits: int = 4
    num_samples: int = 32
    batch_size: int = 4
    guided: bool = False
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        _check_choice(self.unit, RECONSTRUCTION_UNITS, "reconstruction.unit")
        if not isinstance(self.guided, bool):
            raise DMQuantError(f"reconstruction.guided={self.guided!r} must be true or false")
        if self.guidance_scale is not None and not float(self.guidance_scale) > 0:
            raise DMQuantError(f"reconstruction.guidance_scale={self.guidance_scale!r} must be positive (e.g. 7.5), or "
                               "left out to take the calibration run's")
        _check_positive_ints(self, ("iterations", "num_samples", "batch_size", "weight_scale_max_bits"),
                             "reconstruction")
        if not (self.learning_rate > 0 and self.act_learning_rate > 0 and self.reg_weight >= 0):
            raise DMQuantError("reconstruction: learning rates must be positive and reg_weight >= 0")
        if not (self.beta_start >= self.beta_end > 0 and 0 <= self.warmup < 1):
            raise DMQuantError("reconstruction: need beta_start >= beta_end > 0 and 0 <= warmup < 1")


@dataclass(frozen=True)
class SmoothingConfig:
    """SmoothQuant-style migration of activation outliers into the weights, per input channel.

    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` from calibration statistics; the layer computes
    ``Q(x / s) · Q(W · s)``. ``alpha: null`` searches ``alpha`` per layer over ``search_grid``,
    minimising the quantized layer's output error on a sample of its calibration inputs.
    Linear layers and convolutions with ``groups=1`` (any kernel size) can take it; other layers
    are left unsmoothed (reported).
    """

    alpha: float | None = 0.5
    search_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    sample_tokens: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "search_grid", tuple(float(a) for a in self.search_grid))
        for a in ((self.alpha,) if self.alpha is not None else ()) + self.search_grid:
            if not 0.0 <= float(a) <= 1.0:
                raise DMQuantError(f"smoothing alpha {a} must lie in [0, 1] (0.5 is SmoothQuant's default)")
        if not self.search_grid:
            raise DMQuantError("smoothing.search_grid is empty: give at least one alpha, e.g. [0.3, 0.5, 0.7]")
        if not isinstance(self.sample_tokens, int) or self.sample_tokens < 1:
            raise DMQuantError(f"smoothing.sample_tokens={self.sample_tokens!r} must be a positive integer")


@dataclass(frozen=True)
class RotationConfig:
    """A randomized Hadamard rotation of each layer's input channels (QuaRot-style), folded into the
    weights offline: ``Q(x·H) · Q(W·H)ᵀ``. Needs an even channel count; ``seed`` picks the signs."""

    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DMQuantError(f"rotation.seed={self.seed!r} must be a non-negative integer")


@dataclass(frozen=True)
class LowRankConfig:
    """SVDQuant's low-rank branch: ``W ≈ L1·L2 + R`` from the SVD of the (smoothed) weight; ``L1``,
    ``L2`` stay in 16-bit (``dtype``), only the residual ``R`` is quantized.

    A layer gets ``min(rank, floor(max_fraction · min(out, in)))``: small layers, where the requested
    rank would keep most of the weight in 16-bit, get a smaller branch (reported, never an error).
    """

    rank: int = 32
    max_fraction: float = 0.5
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise DMQuantError(f"low_rank.rank={self.rank!r} must be a non-negative integer (e.g. 32)")
        if not 0.0 < float(self.max_fraction) <= 1.0:
            raise DMQuantError(f"low_rank.max_fraction={self.max_fraction} must lie in (0, 1]")
        _check_choice(self.dtype, ("float16", "bfloat16", "float32"), "low_rank.dtype")


CORRECTION_METHODS = ("ptqd", "bias")


@dataclass(frozen=True)
class CorrectionConfig:
    """Noise correction in the sampler, fitted on paired full-precision / quantized denoiser outputs.

    ``ptqd``: per step, the error's part correlated with the prediction (slope ``k_t``), its
    per-channel mean ``mu_t`` and residual variance (absorbed by DDIM with eta > 0 and DDPM when
    ``absorb_variance``). ``bias``: per step, only the per-channel mean error ``mu_t`` is removed
    (step-wise bias correction, StepbaQ / TAC-Diffusion style). ``num_prompts`` calibration prompts
    are sampled with the pipeline's scheduler for ``calibration.num_inference_steps`` steps;
    generation must use the same scheduler and number of steps.
    """

    method: str = "ptqd"
    absorb_variance: bool = True
    num_prompts: int = 16
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check_choice(self.method, CORRECTION_METHODS, "correction.method")
        _check_positive_ints(self, ("num_prompts", "batch_size"), "correction")

    @property
    def absorbs_variance(self) -> bool:
        """Whether the sampler's injected noise is lowered (PTQD only: bias correction has no variance)."""
        return self.absorb_variance and self.method == "ptqd"


@dataclass(frozen=True)
class CalibrationConfig:
    """Which denoiser inputs the calibration records."""

    sampler: TimestepSamplerConfig | str = "uniform"
    num_timesteps: int = 8
    num_inference_steps: int = 25
    batch_size: int = 4
    max_prompts: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", _sampler_config(self.sampler))
        _check_positive_ints(self, ("num_timesteps", "num_inference_steps", "batch_size", "max_prompts"), "calibration")


LAYER_KINDS = ("linear", "conv")


def split_layer_pattern(pattern: str, where: str) -> tuple[str | None, str]:
    """``(kind or None, glob)`` of a layer pattern (``glob`` or ``kind:glob``, in ``layers``, ``include`` and
    ``exclude``); a kind other than :data:`LAYER_KINDS` is a DMQuantError naming ``where``."""
    if ":" not in pattern:
        return None, pattern
    kind, glob = pattern.split(":", 1)
    if kind not in LAYER_KINDS:
        raise DMQuantError(f"{where}: a pattern's kind before ':' must be one of {', '.join(LAYER_KINDS)} "
                           f"(e.g. 'conv:*'), got {kind!r}")
    return kind, glob


def layer_pattern_matches(pattern: str, name: str, kind: str | None) -> bool:
    """Whether a layer pattern (``glob`` or ``kind:glob``) selects the layer ``name`` of ``kind``."""
    want, glob = split_layer_pattern(pattern, repr(pattern))
    return (want is None or want == kind) and (name == glob or fnmatch.fnmatchcase(name, glob))


@dataclass(frozen=True)
class LayerOverrideConfig:
    """Per-layer settings (mixed precision): keys of the recipe's ``weights`` / ``activations`` sections
    that the layers matching a pattern of ``layers`` take instead of the recipe's, e.g.
    ``layers: {"transformer_blocks.0.ff.net.2": {weights: {bits: 8}}}``; keys left out keep the recipe's.
    ``weight_only: true`` leaves the layers' inputs unquantized (their weights still follow ``weights``)."""

    weights: dict[str, Any] | None = None
    activations: dict[str, Any] | None = None
    weight_only: bool = False

    def resolve(self, weights: WeightQuantConfig, activations: ActQuantConfig | None, where: str
                ) -> tuple[WeightQuantConfig, ActQuantConfig | None]:
        """The recipe's sections with this override applied (a DMQuantError names ``where``)."""
        if self.activations and activations is None:
            raise DMQuantError(f"{where}.activations: the recipe quantizes no activations, so a layer cannot "
                               "override them; drop the layer's 'activations' key")
        if not isinstance(self.weight_only, bool):
            raise DMQuantError(f"{where}.weight_only={self.weight_only!r} must be true or false")
        if self.weight_only and self.activations:
            raise DMQuantError(f"{where}: weight_only leaves the inputs unquantized, so 'activations' has no "
                               "effect; drop one of the two")
        w = _override(WeightQuantConfig, weights, self.weights, f"{where}.weights")
        if self.weight_only:
            return w, None
        a = activations if not self.activations else _override(ActQuantConfig, activations, self.activations,
                                                                 f"{where}.activations")
        return w, a


def _override(cls: type, base, changes: dict | None, where: str):
    if not changes:
        return base
    if not isinstance(changes, dict):
        raise DMQuantError(f"recipe key {where} must be a mapping of {cls.__name__} keys, got {changes!r}")
    merged = {**dataclasses.asdict(base), **changes}
    try:
        return _build_section(cls, merged, where)
    except DMQuantError as exc:
        raise DMQuantError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Automatic mixed precision: each quantized layer's weight format chosen from ``candidate_bits`` (at
    the recipe's granularity) and, for each of ``group_sizes``, ``group_bits`` (default ``candidate_bits``)
    with one scale per group of that many input weights (only where the groups divide the layer's rows) to
    minimise the summed sensitivity (the denoiser's output error when only that layer is quantized,
    measured on ``num_samples`` recorded calibration calls, each call weighted as ``weighting`` says)
    within a budget: ``target_bits`` (average bits per quantized weight, scales included),
    ``max_weight_bytes`` (the whole denoiser's weight memory: quantized codes and scales, full-precision
    layers, biases and norms) or, with neither, the bytes of the recipe's uniform ``weights`` format.
    ``weighting``: ``uniform`` (every call's mean squared output error counts the same), ``relative``
    (each call's error divided by the power of its full-precision output), ``early`` / ``late`` (uniform
    times ``t / t_max`` / ``1 - t / t_max``: the noisy / the last steps count more). ``scale_dtype``: how the
    candidate formats store their scales (default: the recipe's ``weights.scale_dtype``; the default
    budget is the recipe's own ``weights`` format as written). ``asymmetric_bits``: bit-widths whose
    candidate formats are also tried with a zero point per scale (where the recipe's weights are symmetric).
    ``measure``: ``all`` (every candidate format measured on the calls), ``sampled`` (one format per layer
    measured on all of them, the others on ``sampled_calls`` of them and scaled by their ratio to it there)
    or ``anchored`` (one format per layer measured, the others scaled from it by a weight-space proxy).
    ``guided``: on calls that carry both halves of classifier-free guidance, the error counted is the guided
    prediction's (plus ``g²`` times the mean squared difference of the two halves' errors, at the run's guidance
    scale ``g``), as the sampler amplifies it, instead of the raw output's."""

    target_bits: float | None = None
    max_weight_bytes: int | None = None
    candidate_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_sizes: tuple[int, ...] = ()
    group_bits: tuple[int, ...] | None = None
    num_samples: int = 16
    weighting: str = "uniform"
    scale_dtype: str | None = None
    asymmetric_bits: tuple[int, ...] = ()
    measure: str = "all"
    sampled_calls: int = 4
    guided: bool = False

    def __post_init__(self) -> None:
        _check_choice(self.measure, ("all", "sampled", "anchored"), "mixed_precision.measure")
        object.__setattr__(self, "asymmetric_bits", tuple(sorted(set(self.asymmetric_bits or ()))))
        for b in self.asymmetric_bits:
            check_bits(b, "mixed_precision.asymmetric_bits")
        if self.scale_dtype is not None:
            _check_choice(self.scale_dtype, tuple(SCALE_DTYPES), "mixed_precision.scale_dtype")
        object.__setattr__(self, "candidate_bits", tuple(sorted(set(self.candidate_bits))))
        if not self.candidate_bits:
            raise DMQuantError("mixed_precision.candidate_bits is empty: give bit-widths such as [2, 3, 4, 6, 8]")
        for b in self.candidate_bits:
            check_bits(b, "mixed_precision.candidate_bits")
        object.__setattr__(self, "group_sizes", tuple(sorted(set(self.group_sizes or ()))))
        for g in self.group_sizes:
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise DMQuantError(f"mixed_precision.group_sizes holds {g!r}: give positive integers such as [64, 128]")
        if self.group_bits is not None:
            object.__setattr__(self, "group_bits", tuple(sorted(set(self.group_bits))))
            if not self.group_bits:
                raise DMQuantError("mixed_precision.group_bits is empty: give bit-widths such as [2, 3, 4], or leave "
                                   "it out (the candidate_bits)")
            for b in self.group_bits:
                check_bits(b, "mixed_precision.group_bits")
        if self.target_bits is not None and self.max_weight_bytes is not None:
            raise DMQuantError("mixed_precision: give target_bits or max_weight_bytes, not both")
        if self.target_bits is not None and not 2.0 <= float(self.target_bits) <= 16.0:
            raise DMQuantError(f"mixed_precision.target_bits={self.target_bits} must lie in [2, 16] (average bits "
                               "per weight, scales included; e.g. 4.5)")
        if self.max_weight_bytes is not None and (isinstance(self.max_weight_bytes, bool)
                                                  or not isinstance(self.max_weight_bytes, int)
                                                  or self.max_weight_bytes < 1):
            raise DMQuantError(f"mixed_precision.max_weight_bytes={self.max_weight_bytes!r} must be a positive "
                               "integer (bytes)")
        _check_positive_ints(self, ("num_samples", "sampled_calls"), "mixed_precision")
        _check_choice(self.weighting, ("uniform", "relative", "early", "late"), "mixed_precision.weighting")


def _sampler_config(value: Any) -> TimestepSamplerConfig:
    if isinstance(value, TimestepSamplerConfig):
        return value
    if isinstance(value, str):
        return TimestepSamplerConfig(kind=value)
    if isinstance(value, dict):
        return _build_section(TimestepSamplerConfig, value, "calibration.sampler")
    raise DMQuantError(f"calibration.sampler must be a name ({', '.join(SAMPLERS)}) or a mapping, got {value!r}")


# Settings added to a section after recipe digests were first stored (eval/ caches): at their default they are left
# out of :meth:`QuantConfig.digest`, so a recipe that does not use them keeps its digest.
DIGEST_LATER_FIELDS: dict[tuple[str, str], Any] = {("mixed_precision", "guided"): False}


@dataclass(frozen=True)
class QuantConfig:
    """A whole recipe: what to quantize, how, and how to calibrate."""

    name: str = "custom"
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activations: ActQuantConfig | None = field(default_factory=ActQuantConfig)
    attention: AttentionQuantConfig | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    use_default_excludes: bool = True
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    time: TimeConditioningConfig | None = None
    split: SkipSplitConfig | None = None
    reconstruction: ReconstructionConfig | None = None
    smoothing: SmoothingConfig | None = None
    rotation: RotationConfig | None = None
    low_rank: LowRankConfig | None = None
    correction: CorrectionConfig | None = None
    layers: dict[str, LayerOverrideConfig] = field(default_factory=dict)
    mixed_precision: MixedPrecisionConfig | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for attr in ("include", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise DMQuantError(f"{attr} must be a list of glob patterns on module names, got {value!r}")
            for pattern in value:
                split_layer_pattern(pattern, f"{attr} pattern {pattern!r}")
            object.__setattr__(self, attr, tuple(value))
        self._check_compatible()
        self._check_layers()

    def _check_layers(self) -> None:
        """Every per-layer override gives a valid recipe for its layers (one line naming the pattern)."""
        if not isinstance(self.layers, dict):
            raise DMQuantError(f"layers must be a mapping of module-name patterns to overrides, got {self.layers!r}")
        if self.mixed_precision is not None and any(o.weights for o in self.layers.values()):
            raise DMQuantError("mixed_precision chooses each layer's weight format itself: drop the 'weights' of the "
                               "'layers' overrides (or drop 'mixed_precision' to rerun a saved plan)")
        if self.mixed_precision is not None and self.has_outlier_branch:
            raise DMQuantError("mixed_precision measures sensitivity on the plain weights: it does not combine with "
                               "smoothing, rotation or low_rank yet; drop those sections")
        for pattern, override in self.layers.items():
            if not isinstance(pattern, str) or not isinstance(override, LayerOverrideConfig):
                raise DMQuantError(f"layers[{pattern!r}] must map a module-name pattern to "
                                   "{weights: {...}, activations: {...}}")
            where = f"layers[{pattern!r}]"
            split_layer_pattern(pattern, where)
            w, a = override.resolve(self.weights, self.activations, where)
            try:
                # a weight-only layer is left unsmoothed (smoothing needs quantized inputs to help)
                dataclasses.replace(self, weights=w, activations=a, layers={},
                                    smoothing=self.smoothing if a is not None else None)
            except DMQuantError as exc:
                raise DMQuantError(f"{where}: {exc}") from None

    def layer_sections(self, name: str, kind: str | None = None) -> tuple[WeightQuantConfig, ActQuantConfig | None]:
        """The ``weights`` and ``activations`` sections of the layer ``name`` (of ``kind`` ``linear`` or
        ``conv``): the first pattern of ``layers`` that matches it, else the recipe's own. A pattern is the
        exact name or a glob, optionally after a kind (``conv:*`` every convolution, ``linear:*.ff.*``)."""
        found = self.layer_override(name, kind)
        if found is None:
            return self.weights, self.activations
        pattern, override = found
        return override.resolve(self.weights, self.activations, f"layers[{pattern!r}]")

    def layer_override(self, name: str, kind: str | None = None) -> tuple[str, LayerOverrideConfig] | None:
        """``(pattern, override)`` of the first pattern of ``layers`` that matches the layer, or None."""
        return next(((p, o) for p, o in self.layers.items() if layer_pattern_matches(p, name, kind)), None)

    def _check_compatible(self) -> None:
        """Techniques that cannot be combined fail here, with the reason."""
        static = self.activations is not None and self.activations.static
        if self.time is not None and not static:
            raise DMQuantError("time-conditioned ranges ('time') need static per-tensor activations: set "
                               "activations.granularity='tensor', or drop the 'time' section")
        if self.split is not None and self.split.activations and self.activations is None:
            raise DMQuantError("split.activations=true but the recipe quantizes no activations: "
                               "set split.activations=false or add an 'activations' section")
        if self.split is not None and not self.split.weights and self.weights.granularity == "group":
            raise DMQuantError("split.weights=false with weights.granularity='group': the groups of a split "
                               "layer's two parts would straddle the cut; split the weights too (split.weights=true)")
        r = self.reconstruction
        if r is not None and r.learn_act_scales and self.activations is not None and not static:
            raise DMQuantError("reconstruction.learn_act_scales needs static activations (dynamic per-token "
                               "ranges have no scale to learn): set it to false")
        if self.smoothing is not None and self.activations is None:
            raise DMQuantError("smoothing moves activation outliers into the weights, but the recipe quantizes no "
                               "activations: drop 'smoothing' (or use low_rank alone for weight-only recipes)")
        if (self.time is not None and self.time.mode == "learned" and r is not None and r.learn_act_scales):
            raise DMQuantError("time.mode='learned' (TDQ) and reconstruction.learn_act_scales both set the "
                               "activation ranges: keep one of them")
        if r is not None and self.weights.format == "fp8_e4m3":
            raise DMQuantError("reconstruction learns the rounding of integer weights (AdaRound), but "
                               "weights.format='fp8_e4m3' rounds to nearest: drop 'reconstruction'")
        if self.activations is not None and self.activations.format != self.weights.format:
            raise DMQuantError(f"activations.format={self.activations.format!r} with weights.format="
                               f"{self.weights.format!r}: no kernel mixes integer and float8 operands; give both "
                               "the same format")

    @property
    def needs_activation_ranges(self) -> bool:
        """True when some activation range (layer inputs, attention operands) is observed on data."""
        static_acts = self.activations is not None and self.activations.static
        return static_acts or (self.attention is not None and self.attention.kernel == "fake-quant")

    @property
    def needs_calibration_data(self) -> bool:
        """True when calibration needs prompts (or recorded denoiser calls)."""
        return (self.needs_activation_ranges or self.smoothing is not None or self.correction is not None
                or self.reconstruction is not None or self.mixed_precision is not None)

    @property
    def has_outlier_branch(self) -> bool:
        """True when layers get an input transform (smoothing, rotation) or a low-rank branch."""
        return self.smoothing is not None or self.rotation is not None or (
            self.low_rank is not None and self.low_rank.rank > 0)

    @property
    def tag(self) -> str:
        a = "16" if self.activations is None else str(self.activations.bits)
        fp8 = "-FP8" if self.weights.format == "fp8_e4m3" else ""
        layer_bits = {o.weights["bits"] for o in self.layers.values() if o.weights and "bits" in o.weights}
        mixed = "mixed" if (layer_bits - {self.weights.bits}) or self.mixed_precision is not None else ""
        return f"W{mixed or self.weights.bits}A{a}{fp8}"

    def to_dict(self) -> dict[str, Any]:
        return _lists(dataclasses.asdict(self))

    def digest(self) -> str:
        """A short hash of what the recipe computes (its ``name`` and ``description`` left out): two recipes with
        the same digest quantize alike, so a cached result can say which recipe made it."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("name", "description")}
        for (section, key), default in DIGEST_LATER_FIELDS.items():  # settings added after digests were stored
            if isinstance(data.get(section), dict) and data[section].get(key, default) == default:
                data[section].pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise DMQuantError(f"a recipe must be a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise DMQuantError(f"unknown recipe keys {unknown}: the known keys are {sorted(known)}")
        kwargs = dict(data)
        sections = {
            "weights": WeightQuantConfig,
            "activations": ActQuantConfig,
            "attention": AttentionQuantConfig,
            "calibration": CalibrationConfig,
            "time": TimeConditioningConfig,
            "split": SkipSplitConfig,
            "reconstruction": ReconstructionConfig,
            "smoothing": SmoothingConfig,
            "rotation": RotationConfig,
            "low_rank": LowRankConfig,
            "correction": CorrectionConfig,
            "mixed_precision": MixedPrecisionConfig,
        }
        for key, sub_cls in sections.items():
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = _build_section(sub_cls, kwargs[key], key)
        if kwargs.get("layers") is not None:
            if not isinstance(kwargs["layers"], dict):
                raise DMQuantError(f"recipe key layers={kwargs['layers']!r} must be a mapping of module-name patterns "
                                   "to {weights: {...}, activations: {...}}")
            kwargs["layers"] = {p: _build_section(LayerOverrideConfig, v, f"layers[{p!r}]")
                                for p, v in kwargs["layers"].items()}
        else:
            kwargs.pop("layers", None)
        sections["layers"] = dict
        _check_types(cls, {k: v for k, v in kwargs.items() if k not in sections}, "")
        return _construct(cls, kwargs, "top level")


def _lists(value: Any) -> Any:
    """Tuples as lists, recursively (YAML's safe dumper and JSON agree on lists)."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _build_section(cls: type, data: Any, key: str):
    if not isinstance(data, dict):
        raise DMQuantError(f"recipe section {key!r} must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise DMQuantError(f"unknown keys {unknown} in recipe section {key!r}: the known keys are {sorted(known)}")
    _check_types(cls, data, f"{key}.")
    return _construct(cls, data, key)


def _construct(cls: type, data: dict, where: str):
    try:
        return cls(**data)
    except DMQuantError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:  # values the checks above let through
        raise DMQuantError(f"recipe {where!r} has a value of the wrong kind ({' '.join(str(exc).split())}): see "
                           "pipelines/README.md for each key's type") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML fits a field's annotation (lists stand for tuples; configs for mappings)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) == 1 and (origin is list or len(args) == 2):
            return all(_type_ok(v, items[0]) for v in value)
        return not items or (len(items) == len(value) and all(_type_ok(v, a) for v, a in zip(value, items)))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, str, hint))
    return True


def _check_types(cls: type, data: dict, prefix: str) -> None:
    """DMQuantError naming the first key whose value does not have the type the config declares."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints.get(key, Any)
        if not _type_ok(value, hint):
            raise DMQuantError(f"recipe key {prefix}{key}={value!r} has the wrong type: expected "
                               f"{_type_name(hint)}")


def list_recipes() -> list[str]:
    """Names of the recipes shipped with dmquant."""
    names: set[str] = set()
    for folder in RECIPE_DIRS:
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def recipe_path(name: str) -> Path:
    for folder in RECIPE_DIRS:
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise DMQuantError(f"unknown recipe {name!r}: use one of {', '.join(list_recipes())}, or a path to a YAML file")


def load_recipe(recipe: str | Path | dict | QuantConfig) -> QuantConfig:
    """A :class:`QuantConfig` from a recipe name, a YAML path, a dict, or a config (returned as is)."""
    if isinstance(recipe, QuantConfig):
        return recipe
    if isinstance(recipe, dict):
        return QuantConfig.from_dict(recipe)
    text = str(recipe)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file()
    path = Path(text) if looks_like_path else recipe_path(text)
    if not path.is_file():
        raise DMQuantError(f"recipe file {path} does not exist: pass a recipe name ({', '.join(list_recipes())}) or an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DMQuantError(f"recipe file {path} is not valid YAML ({exc}): fix the file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DMQuantError(f"recipe file {path} cannot be read ({exc}): pass a UTF-8 YAML file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DMQuantError(f"recipe file {path} holds a YAML {type(data).__name__}, not a mapping of settings: write "
                           "keys such as 'weights: {bits: 4}' (see pipelines/README.md)")
    data = dict(data)
    data.setdefault("name", path.stem)
    return QuantConfig.from_dict(data)


def save_recipe(config: QuantConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
