"""The trained tiny model zoo: small models shipped inside the package, loadable offline.

    >>> import dmquant
    >>> dmquant.zoo.list()
    ['tiny-shapes-clip', 'tiny-shapes-dit', 'tiny-shapes-flux', 'tiny-shapes-sd']
    >>> pipe = dmquant.zoo.load("tiny-shapes-sd")        # a diffusers StableDiffusionPipeline
    >>> image = pipe("a large red circle at the top left on a black background").images[0]

- ``tiny-shapes-sd``: StableDiffusionPipeline (AutoencoderKL 32x32 <-> 8x8x4, 2-layer CLIPTextModel,
  UNet2DConditionModel with cross-attention, DDIM scheduler on the SD noise schedule).
- ``tiny-shapes-dit``: DiTPipeline, class-conditioned on "<color> <shape>" labels (``pipe.labels``).
- ``tiny-shapes-flux``: StableDiffusion3Pipeline, the modern family: an SD3-style MMDiT (joint text/image
  attention) trained with flow matching (FlowMatchEulerDiscreteScheduler) on tiny-shapes-sd's VAE and text
  encoder (see ``dmquant.zoo.train_flux`` for why SD3's pipeline rather than FLUX's).
- ``tiny-shapes-sd-lora``: a LoRA for tiny-shapes-sd (diffusers format) that rotates the colors
  (:mod:`dmquant.zoo.lora_effect`): ``pipe.load_lora_weights(dmquant.zoo.lora_path("tiny-shapes-sd-lora"))``.
- ``tiny-shapes-clip``: an open_clip model, the judge (a :class:`dmquant.zoo.judge.ClipModel`): CLIP score and FID
  features for the zoo, zero-shot attribute classification.

Weights live in ``dmquant/zoo/weights/<name>/`` (diffusers ``save_pretrained`` layout for the
pipelines, open_clip ``local-dir`` layout for the judge); the scripts ``python -m dmquant.zoo.train_*``
rebuild them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from dmquant.errors import DMQuantError
from dmquant.zoo.configs import WEIGHTS_DIR
from dmquant.zoo.judge import JUDGE, ClipModel
from dmquant.zoo.lora_effect import LORA_NAME

_MODELS: dict[str, str] = {
    JUDGE: "open_clip model (ViT 32px/4, 64-d embeddings): the zoo's judge",
    "tiny-shapes-dit": "DiTPipeline, class-conditioned (24 '<color> <shape>' labels)",
    "tiny-shapes-sd": "StableDiffusionPipeline, text-conditioned on the shapes grammar",
    "tiny-shapes-flux": "StableDiffusion3Pipeline: an MMDiT trained with flow matching, text-conditioned",
}

_LORAS: dict[str, str] = {
    LORA_NAME: "LoRA for tiny-shapes-sd: every object in the next color of the cycle (dmquant.zoo.lora_effect)",
}


def list_models() -> list[str]:
    """Names of the zoo's models, sorted."""
    return sorted(_MODELS)


def describe(name: str) -> str:
    return _MODELS[_check(name)]


def _check(name: str) -> str:
    if name not in _MODELS:
        raise DMQuantError(f"no zoo model named {name!r}; the zoo has: {', '.join(list_models())}")
    return name


def path(name: str) -> Path:
    """The folder holding ``name``'s weights (DMQuantError if the name or the weights are missing)."""
    folder = WEIGHTS_DIR / _check(name)
    if not folder.is_dir():
        raise DMQuantError(
            f"the weights of {name!r} are missing ({folder}); rebuild them with "
            f"`python -m dmquant.zoo.train_{name.split('-')[-1]}`"
        )
    return folder


def lora_path(name: str) -> Path:
    """The folder of the zoo LoRA ``name`` (diffusers format: ``pipe.load_lora_weights(folder)`` reads it)."""
    if name not in _LORAS:
        raise DMQuantError(f"no zoo LoRA named {name!r}; the zoo has: {', '.join(sorted(_LORAS))}")
    folder = WEIGHTS_DIR / name
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise DMQuantError(f"the weights of {name!r} are missing ({folder}); rebuild them with "
                           "`python -m dmquant.zoo.train_lora`")
    return folder


def load(name: str, device: str = "cpu", dtype: Any = None) -> Any:
    """The ready pipeline (or, for ``tiny-shapes-clip``, the judge as a ``ClipModel``), offline.

    ``dtype`` defaults to float32 (the weights are stored in float32).
    """
    folder = path(name)
    dtype = torch.float32 if dtype is None else dtype
    if name == JUDGE:
        return ClipModel.from_open_clip(f"local-dir:{folder}", device=device, dtype=dtype, name=name)
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


list = list_models  # noqa: A001 - the issue's name for it: dmquant.zoo.list()

__all__ = ["list", "list_models", "load", "path", "lora_path", "describe"]
