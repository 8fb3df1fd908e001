"""What dmquant needs to know about a diffusers pipeline and its surroundings before driving it: how it is
conditioned (prompts or class ids), which prompts it accepts, the accelerate process state, the hub's
offline switch.

This module imports no other part of dmquant but its errors, so every layer may use it (calibration,
correction, the API). Loading a pipeline is :mod:`dmquant.loading`, generating images
:mod:`dmquant.generation`.
"""

from __future__ import annotations

import inspect
import os
from typing import Sequence

import diffusers
import torch
import transformers

from dmquant.errors import DMQuantError


# ---------------------------------------------------------------------------------------- environment
def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to 1 / true / yes / on (any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def scheduler_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """The timesteps ``scheduler``'s class visits in a run of ``num_inference_steps`` (known before sampling;
    computed on a copy, so the pipeline's own scheduler keeps its state)."""
    copy = type(scheduler).from_config(scheduler.config)
    try:
        copy.set_timesteps(num_inference_steps)
    except Exception as exc:  # schedulers raise various types for unsupported step counts
        raise DMQuantError(f"{type(scheduler).__name__} cannot run {num_inference_steps} steps ({exc})") from exc
    return torch.as_tensor(copy.timesteps).double().reshape(-1)


def process_state(device: str | torch.device | None = None):
    """accelerate's process state (one per process: the first call decides its device).

    On the CPU it must be created with ``cpu=True`` for the processes of ``accelerate launch --multi_gpu`` /
    ``torchrun`` to form a (gloo) group: that is asked for when ``device`` is a CPU device, or, with no
    ``device``, when there is no GPU.
    """
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def silence_progress_bars() -> None:
    """Turn off the loading progress bars of diffusers and transformers (for ``--quiet``)."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------- conditioning
def conditioning_argument(pipe) -> str:
    """The name of the pipeline's conditioning argument: ``prompt`` or ``class_labels``."""
    params = inspect.signature(pipe.__call__).parameters
    for name in ("prompt", "class_labels"):
        if name in params:
            return name
    raise DMQuantError(
        f"{type(pipe).__name__} takes neither 'prompt' nor 'class_labels': dmquant cannot drive it"
    )


def uses_true_cfg(pipe) -> bool:
    """Whether the pipeline's classifier-free guidance is ``true_cfg_scale`` with a negative prompt (Qwen-Image,
    FLUX without guidance embedding): there ``guidance_scale`` feeds a guidance embedding the denoiser lacks."""
    params = inspect.signature(type(pipe).__call__).parameters
    denoiser = getattr(pipe, "transformer", None)
    embeds = bool(getattr(getattr(denoiser, "config", None), "guidance_embeds", False))
    return "true_cfg_scale" in params and "negative_prompt" in params and not embeds


def guidance_scale_of(pipe, call_kwargs: dict) -> float | None:
    """The CFG scale a pipeline call runs at: ``guidance_scale`` in ``call_kwargs``, else the pipeline's default
    (``true_cfg_scale``'s for a true-CFG pipeline); None when the pipeline takes neither."""
    if call_kwargs.get("guidance_scale") is not None:
        return float(call_kwargs["guidance_scale"])
    params = inspect.signature(type(pipe).__call__).parameters
    name = "true_cfg_scale" if uses_true_cfg(pipe) else "guidance_scale"
    default = params[name].default if name in params else None
    return float(default) if isinstance(default, (int, float)) else None


def guidance_arguments(pipe, call_kwargs: dict, batch_size: int) -> dict:
    """``call_kwargs`` with ``guidance_scale`` as the pipeline understands a CFG scale: unchanged, or for a
    true-CFG pipeline ``true_cfg_scale`` with an empty negative prompt per image (unless one is given)."""
    if "guidance_scale" not in call_kwargs or not uses_true_cfg(pipe):
        return dict(call_kwargs)
    out = dict(call_kwargs)
    out["true_cfg_scale"] = out.pop("guidance_scale")
    if out.get("negative_prompt") is None and out.get("negative_prompt_embeds") is None:
        out["negative_prompt"] = [""] * batch_size
    return out


# a ControlNet pipeline's conditioning image (FLUX and ControlNet img2img: control_image, SD / SDXL: image), an
# img2img pipeline's initial image
CONDITIONING_IMAGE_ARGUMENTS = ("control_image", "image")


def conditioning_image_argument(pipe) -> str | None:
    """The name of the pipeline's conditioning-image argument (``image`` / ``control_image``), or None."""
    params = inspect.signature(type(pipe).__call__).parameters
    return next((name for name in CONDITIONING_IMAGE_ARGUMENTS if name in params), None)


def batch_call_arguments(pipe, call_kwargs: dict, start: int, size: int, num_prompts: int) -> dict:
    """``call_kwargs`` for the prompts ``start : start + size`` of ``num_prompts``: a conditioning image
    argument holding one image per prompt (a list, or a batched tensor; the i-th image goes with the i-th
    prompt, images past the last prompt are unused, as prompts past ``max_prompts`` are) is cut to the batch's
    images; one image, or a MultiControlNet's list of per-ControlNet images, goes to every batch as it is."""
    multi = type(getattr(pipe, "controlnet", None)).__name__.endswith("MultiControlNetModel")
    out = dict(call_kwargs)
    for name in CONDITIONING_IMAGE_ARGUMENTS:
        value = out.get(name)
        batched = isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim == 4)
        if not batched or multi or len(value) == 1:
            continue
        if len(value) < num_prompts:
            raise DMQuantError(f"{name}= holds {len(value)} images for {num_prompts} prompts: pass one image for "
                               "every prompt, or a single image for all of them")
        out[name] = value[start : start + size]
    return out


def is_class_conditional(pipe) -> bool:
    return conditioning_argument(pipe) == "class_labels"


def class_id(pipe, prompt) -> int:
    """Class id for a class-conditioned pipeline (DiT): an integer, or a label of ``pipe.labels``
    (exact, else the longest label the prompt contains: "a large red circle at the top" -> "red circle")."""
    if isinstance(prompt, int):
        return _checked_class_id(pipe, prompt)
    text = str(prompt).strip()
    if text.lstrip("-").isdigit():
        return _checked_class_id(pipe, int(text))
    labels: dict[str, int] = getattr(pipe, "labels", None) or {}
    if text in labels:
        return int(labels[text])
    padded = f" {text.lower()} "
    hits = [label for label in labels if f" {label.lower()} " in padded]
    if not hits:
        raise DMQuantError(
            f"prompt {text!r} names none of the class-conditioned pipeline's labels "
            f"(e.g. {', '.join(list(labels)[:5])}): use an integer class id or a label name"
        )
    return int(labels[max(hits, key=len)])


def _checked_class_id(pipe, value: int) -> int:
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    count = getattr(getattr(denoiser, "config", None), "num_embeds_ada_norm", None)
    if value < 0 or (isinstance(count, int) and value >= count):
        bound = f"0..{count - 1}" if isinstance(count, int) else "a non-negative integer"
        raise DMQuantError(f"class id {value} does not exist in this class-conditioned pipeline: use {bound}")
    return value


def check_call_inputs(pipe, num_inference_steps: int | None = None, height: int | None = None,
                      width: int | None = None) -> None:
    """DMQuantError, before any work, for a step count the scheduler cannot run or an image size the
    pipeline does not take."""
    scheduler = getattr(pipe, "scheduler", None)
    train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if num_inference_steps is not None:
        if num_inference_steps < 1:
            raise DMQuantError(f"the number of steps must be >= 1, got {num_inference_steps}")
        if isinstance(train_steps, int) and num_inference_steps > train_steps:
            raise DMQuantError(f"{num_inference_steps} steps are more than the scheduler's {train_steps} training "
                               f"timesteps: use at most {train_steps} steps")
    sizes = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if not sizes:
        return
    if "height" not in inspect.signature(type(pipe).__call__).parameters:
        raise DMQuantError(f"{type(pipe).__name__} takes no --height/--width: its image size is fixed by the model")
    multiple = next((m for c in type(pipe).__mro__ for n, m in SIZE_MULTIPLES.items() if c.__name__ == n), 8)
    for name, value in sizes.items():
        if value < multiple or value % multiple:
            raise DMQuantError(f"--{name} {value} must be a positive multiple of {multiple} for {type(pipe).__name__} "
                               f"(e.g. {multiple}, {4 * multiple}, 512)")


# pipelines whose check_inputs wants sides divisible by more than 8 (diffusers 0.42)
SIZE_MULTIPLES = {"LTXPipeline": 32, "HunyuanVideoPipeline": 16, "WanPipeline": 16}


def prompts_for_pipeline(pipe, prompts: Sequence) -> list:
    """Strings for text pipelines; class ids for class-conditioned ones (integers or label names)."""
    if not is_class_conditional(pipe):
        return list(prompts)
    return [class_id(pipe, p) for p in prompts]


def check_prompts(pipe, prompts: Sequence) -> list:
    """Validate calibration prompts (strings for text pipelines, class ids for class-conditioned ones)."""
    prompts = list(prompts or [])
    if not prompts:
        raise DMQuantError("no calibration prompts: pass prompts=[...] or a non-empty prompt file")
    if is_class_conditional(pipe):
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            raise DMQuantError("this pipeline is class-conditioned: pass integer class ids as prompts")
        for p in prompts:
            _checked_class_id(pipe, p)
    elif not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DMQuantError("calibration prompts must be non-empty strings")
    return prompts
