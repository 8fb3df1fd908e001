"""Load a diffusion pipeline from a zoo name, a local diffusers folder, or a hub id.

Hub ids go through diffusers' real ``from_pretrained``; when the hub cannot be reached (offline)
and the model is not cached, the error names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dmquant.errors import DMQuantError
from dmquant.models.tiny import TINY_NAMES, build_tiny_pipeline


def zoo_names() -> list[str]:
    from dmquant import zoo

    return zoo.list()


def known_names() -> list[str]:
    return [*zoo_names(), *TINY_NAMES]


def load_pipeline(spec: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A ready diffusers pipeline for ``spec``: zoo name, tiny random model, local folder (a saved
    quantized pipeline loads as its quantized twin class), or hub id."""
    text = str(spec)
    if text in TINY_NAMES:
        pipe = build_tiny_pipeline(text)
    elif text in zoo_names():
        from dmquant import zoo

        pipe = zoo.load(text)
    elif Path(text).exists():
        pipe = _from_folder(Path(text))
    elif _looks_like_hub_id(text):
        pipe = _from_hub(text)
    else:
        raise DMQuantError(
            f"model {text!r} is neither a folder, a hub id (owner/name) nor a built-in model: "
            f"use one of {', '.join(known_names())}, a diffusers pipeline folder, or a hub id"
        )
    pipe = pipe.to(device)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe


def _from_folder(folder: Path):
    from diffusers import DiffusionPipeline

    from dmquant.pipeline import load_quantized_pipeline, quantized_denoiser_attribute

    if (folder / "model_index.json").is_file() and quantized_denoiser_attribute(folder) is not None:
        return load_quantized_pipeline(folder)
    if not (folder / "model_index.json").is_file():
        raise DMQuantError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json): "
            "pass a folder written by save_pretrained, or a dmquant run folder"
        )
    try:
        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise DMQuantError(f"could not load the pipeline in {folder} ({type(exc).__name__}: {exc}): "
                           "check that the folder is complete, or save it again") from exc


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))


def _from_hub(repo_id: str):
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=offline)
    except Exception as exc:
        raise DMQuantError(
            f"could not load hub id {repo_id!r} ({type(exc).__name__}): it is not in the local cache and the hub "
            "cannot be reached" + (" (HF_HUB_OFFLINE=1)" if offline else "") + "; download it where there is a "
            f"network (`huggingface-cli download {repo_id}`) or pass a local pipeline folder"
        ) from exc


def silence_progress_bars() -> None:
    """Turn off the loading progress bars of diffusers and transformers (for ``--quiet``)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
