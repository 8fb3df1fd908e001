"""PTQD-style noise correction.

The quantized denoiser's output is ``ε̂ = ε + Δ`` with ``Δ = k_t·ε + μ_t + Δ'``: a part correlated
with the full-precision prediction (slope ``k_t``), a per-channel bias ``μ_t`` and an uncorrelated
residual ``Δ'`` of variance ``σ_t²``. Per sampling step, these are fitted from paired outputs of
the quantized and full-precision denoiser on the quantized model's own trajectory. At sampling time:

* the prediction is corrected: ``ε̃ = (ε̂ − μ_t) / (1 + k_t)`` (any scheduler: a forward hook on the
  denoiser output, epsilon channels only);
* for stochastic samplers (DDIM with eta > 0, DDPM) the residual, which enters the next latent as
  ``λ_t·Δ'/(1 + k_t)``, replaces part of the injected noise: the noise std becomes
  ``sqrt(max(0, s_t² − λ_t²·σ_t²/(1 + k_t)²))`` instead of ``s_t``. Other schedulers keep their
  noise (the correction of ``ε`` still applies).

Flow matching (``FlowMatchEulerDiscreteScheduler``; the denoiser predicts a velocity ``v``, and
``x_σ = (1 − σ)·x0 + σ·n``): the regression is on whatever the denoiser outputs, so the slope and bias
correction ``ṽ = (v̂ − μ_t) / (1 + k_t)`` applies unchanged. The residual enters the next latent as
``(σ' − σ)·Δ'/(1 + k_t)`` in a deterministic Euler step, which injects no noise: as with DDIM at
eta = 0 there is nothing to absorb it into, and only the slope and bias act. The stochastic Euler step
(``stochastic_sampling=True``: ``x' = (1 − σ')·(x − σ·v̂) + σ'·z``) injects noise of std ``s = σ'``
and carries the residual with ``λ = −(1 − σ')·σ``: its noise std is lowered by the same formula.
The prediction's channels are found on axis 1 (``[B, C, H, W]``, video ``[B, C, F, H, W]``) or, for
packed token sequences ``[B, S, C]`` (FLUX, Qwen-Image), on the last axis.
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dmquant.diffusers_io import batch_call_arguments, conditioning_argument, scheduler_timesteps
from dmquant.errors import DMQuantError
from dmquant.models.adapters import find_denoiser
from dmquant.nn.wrap import full_precision
from dmquant.quantizers.timetable import TimeTable, single_timestep, take


@dataclass
class NoiseCorrectionStats:
    """Per-step statistics: ``timesteps [T]`` (float64), slope ``k [T]``, bias ``mu [T, C]``, residual
    variance ``var [T]``; looked up through a :class:`TimeTable` of the timesteps (exact policy)."""

    timesteps: torch.Tensor
    k: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor
    mean_error: torch.Tensor | None = None  # [T, C] plain mean of the error (fitted stats only)
    table: TimeTable = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.float64)
        self.table = TimeTable(self.timesteps, policy="exact", what="noise-correction statistics")

    def index(self, timestep) -> int:
        return self.table.lookup(timestep)

    def save(self, path) -> None:
        save_file({"timesteps": self.timesteps, "k": self.k, "mu": self.mu, "var": self.var}, str(path))

    @classmethod
    def load(cls, path) -> NoiseCorrectionStats:
        try:
            data = load_file(str(path))
            return cls(data["timesteps"], data["k"], data["mu"], data["var"])
        except Exception as exc:
            raise DMQuantError(f"noise-correction statistics {path} are missing or damaged ({exc})") from exc

    def bias_only(self) -> NoiseCorrectionStats:
        """Step-wise bias correction (StepbaQ / TAC-Diffusion style): the mean error of each step and
        channel, without the slope and the variance. Its ``mu`` is refitted as the plain mean error."""
        if self.mean_error is None:
            raise DMQuantError("these noise-correction statistics carry no mean error (loaded from a file?): "
                               "fit them again with fit_noise_correction")
        return NoiseCorrectionStats(self.timesteps, torch.zeros_like(self.k), self.mean_error.clone(),
                                    torch.zeros_like(self.var), self.mean_error)

    @classmethod
    def identity(cls, timesteps, channels: int) -> NoiseCorrectionStats:
        n = len(timesteps)
        return cls(torch.as_tensor(timesteps), torch.zeros(n), torch.zeros(n, channels), torch.zeros(n))


class _Accumulator:
    """Sums for the per-step, per-channel regression ``Δ = k·ε + μ_c``."""

    def __init__(self, channels: int):
        z = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        self.n, self.se, self.sd, self.see, self.sed, self.sdd = z(), z(), z(), z(), z(), z()

    def add(self, eps: torch.Tensor, delta: torch.Tensor) -> None:
        e = eps.double().transpose(0, 1).reshape(eps.shape[1], -1)
        d = delta.double().transpose(0, 1).reshape(delta.shape[1], -1)
        self.n += e.shape[1]
        self.se += e.sum(1)
        self.sd += d.sum(1)
        self.see += (e * e).sum(1)
        self.sed += (e * d).sum(1)
        self.sdd += (d * d).sum(1)

    def mean_error(self) -> torch.Tensor:
        return (self.sd / self.n).float()

    def fit(self) -> tuple[float, torch.Tensor, float]:
        cee = self.see - self.se**2 / self.n
        ced = self.sed - self.se * self.sd / self.n
        cdd = self.sdd - self.sd**2 / self.n
        k = float(ced.sum() / cee.sum()) if float(cee.sum()) > 0 else 0.0
        mu = (self.sd - k * self.se) / self.n
        var = float(((cdd - 2 * k * ced + k * k * cee).sum() / self.n.sum()).clamp_min(0))
        return k, mu.float(), var


def _output_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """A view of a prediction with its channels on axis 1: packed token sequences ``[B, S, C]`` (FLUX,
    Qwen-Image) have them last; images ``[B, C, H, W]`` and videos ``[B, C, F, H, W]`` already on axis 1."""
    return x.movedim(-1, 1) if x.ndim == 3 else x


def prediction_channels(denoiser) -> int:
    """Channels of the prediction that the correction acts on: ``in_channels`` (learned-sigma DiTs output
    twice as many; the variance half is left alone), or ``out_channels`` where it is smaller (FLUX Fill,
    Wan image-to-video take the condition as extra input channels)."""
    config = denoiser.config
    return min(int(config.in_channels), int(getattr(config, "out_channels", None) or config.in_channels))


class _PairedRecorder:
    """Forward hook: at every denoiser call, also run the full-precision model on the same input."""

    def __init__(self, channels: int, read_timestep):
        self.channels, self.read_timestep = channels, read_timestep
        self.acc: dict[float, _Accumulator] = {}
        self.busy = False

    def __call__(self, module, args, kwargs, output):
        if self.busy:
            return None
        self.busy = True
        try:
            with full_precision(module):
                reference = _output_tensor(module(*args, **kwargs))
        finally:
            self.busy = False
        quantized, reference = _channels_first(_output_tensor(output)), _channels_first(reference)
        c = self.channels
        t = single_timestep(self.read_timestep(args, kwargs))
        self.acc.setdefault(t, _Accumulator(c)).add(reference[:, :c].float(), (quantized - reference)[:, :c].float())
        return None


def fit_noise_correction(pipe, prompts, num_inference_steps: int, batch_size: int = 8, seed: int = 0,
                         progress: bool = True, **call_kwargs) -> NoiseCorrectionStats:
    """Fit per-step ``k``, ``μ`` and residual variance on the quantized pipeline's own trajectories."""
    _, denoiser, adapter = find_denoiser(pipe)
    recorder = _PairedRecorder(prediction_channels(denoiser), adapter.read_timestep)
    handle = denoiser.register_forward_hook(recorder, with_kwargs=True)
    cond = conditioning_argument(pipe)
    try:
        batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        for i, batch in enumerate(tqdm(batches, desc="noise correction: paired FP/quantized runs",
                                       disable=not progress)):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(**{cond: batch}, num_inference_steps=num_inference_steps, generator=generator,
                     output_type="latent", **batch_call_arguments(pipe, call_kwargs, i * batch_size, len(batch),
                                                                  len(prompts)))
    finally:
        handle.remove()
    timesteps = sorted(recorder.acc, reverse=True)
    fits = [recorder.acc[t].fit() for t in timesteps]
    return NoiseCorrectionStats(torch.tensor(timesteps, dtype=torch.float64), torch.tensor([f[0] for f in fits]),
                                torch.stack([f[1] for f in fits]), torch.tensor([f[2] for f in fits]),
                                torch.stack([recorder.acc[t].mean_error() for t in timesteps]))


class NoiseCorrection:
    """The correction hooked onto one pipeline: output hook on the denoiser, patched ``scheduler.step``."""

    def __init__(self, pipe, stats: NoiseCorrectionStats, absorb_variance: bool = True):
        self.pipe, self.stats, self.absorb_variance = pipe, stats, absorb_variance
        _, self.denoiser, adapter = find_denoiser(pipe)
        self.read_timestep, self.timestep_scale = adapter.read_timestep, adapter.timestep_scale
        self.channels = stats.mu.shape[1]
        self.handle = self.denoiser.register_forward_hook(self._correct_output, with_kwargs=True)
        self.scheduler = pipe.scheduler
        self._patch_scheduler()

    def _correct_output(self, module, args, kwargs, output):
        compiling = torch.compiler.is_compiling()  # traced with a compiled denoiser: graph ops only (no check)
        timestep = self.read_timestep(args, kwargs)
        i = self.stats.table.traced_lookup(timestep) if compiling else self.stats.index(timestep)
        eps = _channels_first(_output_tensor(output))[:, : self.channels]
        mu = take(self.stats.mu, i).to(eps)
        mu = mu.reshape(1, -1, *([1] * (eps.ndim - 2)))
        eps.sub_(mu).div_(1.0 + (take(self.stats.k, i).to(eps) if compiling else float(self.stats.k[i])))
        return output

    def residual_std(self, timestep) -> float:
        """Std of the residual left in the corrected prediction at ``timestep`` (the denoiser's own timestep)."""
        i = self.stats.index(timestep)
        return math.sqrt(float(self.stats.var[i])) / (1.0 + float(self.stats.k[i]))

    def _patch_scheduler(self) -> None:
        kind = type(self.scheduler).__name__
        if not self.absorb_variance or kind not in STEP_WRAPPERS:
            if self.absorb_variance:
                warnings.warn(f"noise correction: dmquant lowers the injected noise of {', '.join(STEP_WRAPPERS)} "
                              f"only, not of {kind}: any noise it injects stays as it is, the prediction is still "
                              "corrected (slope and bias)", stacklevel=3)
            return
        original = self.scheduler.step
        wrapper = STEP_WRAPPERS[kind]
        correction = self

        def step(scheduler, model_output, timestep, sample, *args, **kwargs):
            return wrapper(correction, original, model_output, timestep, sample, *args, **kwargs)

        step.__signature__ = inspect.signature(original)
        self.scheduler.step = types.MethodType(step, self.scheduler)

    def remove(self) -> None:
        self.handle.remove()
        self.scheduler.__dict__.pop("step", None)


def _ddim_coefficients(scheduler, timestep: int, eta: float) -> tuple[float, float]:
    """``(s_t, λ_t)``: injected noise std and the coefficient of ε in the next latent (DDIM)."""
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = float(scheduler.alphas_cumprod[timestep])
    a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    s_t = eta * math.sqrt(float(scheduler._get_variance(timestep, prev)))
    lam = math.sqrt(max(0.0, 1 - a_prev - s_t**2)) - math.sqrt(a_prev * (1 - a_t) / a_t)
    return s_t, lam


def _reduced_std(s_t: float, lam: float, residual_std: float) -> float:
    return math.sqrt(max(0.0, s_t**2 - (lam * residual_std) ** 2))


def _ddim_step(correction, original, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output=False,
               generator=None, variance_noise=None, return_dict: bool = True):
    t = int(timestep)
    if eta > 0:
        s_t, lam = _ddim_coefficients(correction.scheduler, t, eta)
        if variance_noise is None:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
        if s_t > 0:
            variance_noise = variance_noise * (_reduced_std(s_t, lam, correction.residual_std(t)) / s_t)
        generator = None
    return original(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                    generator=generator, variance_noise=variance_noise, return_dict=return_dict)


def _ddpm_step(correction, original, model_output, timestep, sample, generator=None, return_dict: bool = True):
    scheduler, t = correction.scheduler, int(timestep)
    state = generator.get_state() if generator is not None else torch.random.get_rng_state()
    out = original(model_output, timestep, sample, generator=generator, return_dict=True)
    prev_t = scheduler.previous_timestep(t)
    if t == 0 or scheduler.variance_type not in ("fixed_small", "fixed_small_log"):
        return out if return_dict else (out.prev_sample, out.pred_original_sample)
    replay = torch.Generator(model_output.device).set_state(state) if generator is not None else None
    if replay is None:
        torch.random.set_rng_state(state)
    z = randn_tensor(model_output.shape, generator=replay, device=model_output.device, dtype=model_output.dtype)
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0 else float(scheduler.one)
    beta_t = 1 - a_t / a_prev
    s_t = math.sqrt(float(scheduler._get_variance(t)))
    lam = -(math.sqrt(a_prev) * beta_t / (1 - a_t)) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    prev = out.prev_sample - (s_t - _reduced_std(s_t, lam, correction.residual_std(t))) * z
    if not return_dict:
        return prev, out.pred_original_sample
    out.prev_sample = prev
    return out


def _flow_euler_step(correction, original, model_output, timestep, sample, *args, generator=None,
                     per_token_timesteps=None, return_dict: bool = True, **kwargs):
    """FlowMatchEulerDiscreteScheduler's step; with ``stochastic_sampling`` its fresh noise ``σ'·z`` is lowered
    to ``s'·z`` (the noise is replayed from the same generator state). Deterministic Euler, and per-token
    timesteps (one σ per token), run unchanged."""
    scheduler = correction.scheduler
    if not scheduler.config.stochastic_sampling or per_token_timesteps is not None:
        return original(model_output, timestep, sample, *args, generator=generator,
                        per_token_timesteps=per_token_timesteps, return_dict=return_dict, **kwargs)
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)
    sigma = float(scheduler.sigmas[scheduler.step_index])
    sigma_next = float(scheduler.sigmas[scheduler.step_index + 1])
    state = generator.get_state() if generator is not None else torch.random.get_rng_state()
    out = original(model_output, timestep, sample, *args, generator=generator, return_dict=True, **kwargs)
    replay = torch.Generator(sample.device).set_state(state) if generator is not None else None
    if replay is None:
        torch.random.set_rng_state(state)
    z = randn_tensor(sample.shape, generator=replay, device=sample.device, dtype=torch.float32)
    residual = correction.residual_std(single_timestep(timestep) * correction.timestep_scale)
    lam = -(1.0 - sigma_next) * sigma
    prev = out.prev_sample - ((sigma_next - _reduced_std(sigma_next, lam, residual)) * z).to(out.prev_sample.dtype)
    if not return_dict:
        return (prev,)
    out.prev_sample = prev
    return out


STEP_WRAPPERS = {"DDIMScheduler": _ddim_step, "DDPMScheduler": _ddpm_step,
                 "FlowMatchEulerDiscreteScheduler": _flow_euler_step}


def apply_noise_correction(pipe, stats: NoiseCorrectionStats, absorb_variance: bool = True) -> NoiseCorrection:
    """Hook the correction onto ``pipe`` (remove it with ``.remove()``); returns the handle."""
    remove_noise_correction(pipe)
    correction = NoiseCorrection(pipe, stats, absorb_variance)
    object.__setattr__(pipe, "_dmquant_noise_correction", correction)
    return correction


def check_correction_schedule(pipe, num_inference_steps: int) -> None:
    """Fail before sampling (not midway) when ``pipe`` carries a noise correction fitted for other steps."""
    correction = getattr(pipe, "_dmquant_noise_correction", None)
    if correction is None:
        return
    fitted = len(correction.stats.table)
    if getattr(pipe.scheduler.config, "use_dynamic_shifting", False):  # FLUX: the timesteps depend on the image size
        if num_inference_steps != fitted:
            raise DMQuantError(f"this pipeline's noise correction was fitted for {fitted} steps and cannot correct a "
                               f"{num_inference_steps}-step run: generate with {fitted} steps, or fit the correction "
                               "again for this step count")
        return  # each step's timestep is checked when the denoiser is called
    timesteps = scheduler_timesteps(pipe.scheduler, num_inference_steps) * correction.timestep_scale
    try:
        for t in timesteps:
            correction.stats.index(t)
    except DMQuantError:
        raise DMQuantError(
            f"this pipeline's noise correction was fitted for {fitted} steps of {type(pipe.scheduler).__name__} "
            f"and cannot correct a {num_inference_steps}-step run: generate with the same scheduler and number of "
            f"steps ({fitted}), or fit the correction again for this schedule") from None


def remove_noise_correction(pipe) -> None:
    correction = getattr(pipe, "_dmquant_noise_correction", None)
    if correction is not None:
        correction.remove()
        object.__setattr__(pipe, "_dmquant_noise_correction", None)
