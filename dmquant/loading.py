"""The one ``load_pipeline``: a diffusers pipeline from a zoo name, a tiny random model, a local folder
(plain or saved quantized) or a hub id.

Hub ids go through diffusers' real ``from_pretrained``; when the hub cannot be reached (offline) and the
model is not cached, the error names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from dmquant import zoo
from dmquant.diffusers_io import hub_offline
from dmquant.errors import DMQuantError
from dmquant.models.tiny import TINY_NAMES, build_tiny_pipeline
from dmquant.quantized_pipeline import load_quantized_pipeline, quantized_denoiser_attribute


def known_names() -> list[str]:
    """The built-in model names: the zoo's, then the tiny random models."""
    return [*zoo.list_models(), *TINY_NAMES]


def load_pipeline(spec: Any, device: str = "cpu", dtype: torch.dtype | None = None):
    """A ready diffusers pipeline for ``spec``: a zoo name, a tiny random model, a local folder (a saved
    quantized pipeline loads as its quantized twin class), or a hub id. A pipeline object is returned as it is."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = str(spec)
    if text in TINY_NAMES:
        pipe = build_tiny_pipeline(text)
    elif text in zoo.list_models():
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
    if not isinstance(pipe, DiffusionPipeline):
        raise DMQuantError(f"{text!r} is not a diffusion pipeline ({type(pipe).__name__}): use one of "
                           f"{', '.join(n for n in known_names() if n != zoo.JUDGE)}, a pipeline folder, or a hub id")
    pipe = pipe.to(device)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe


def _from_folder(folder: Path):
    if not (folder / "model_index.json").is_file():
        raise DMQuantError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json): "
            "pass a folder written by save_pretrained, or a dmquant run folder"
        )
    try:
        if quantized_denoiser_attribute(folder) is not None:
            return load_quantized_pipeline(folder)
        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except DMQuantError:
        raise
    except Exception as exc:  # diffusers and transformers raise many types for damaged folders
        if _pickles(folder):
            raise DMQuantError(f"{folder} holds pickled weights ({', '.join(_pickles(folder)[:3])}) where safetensors "
                               "are expected: dmquant reads safetensors only (pickles can run code); convert them "
                               "with save_pretrained(..., safe_serialization=True)") from None
        raise DMQuantError(f"could not load the pipeline in {folder} ({type(exc).__name__}: {exc}): "
                           "check that the folder is complete, or save it again") from exc


def _pickles(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
                  for p in folder.glob(f"*/{ext}"))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))


def _from_hub(repo_id: str):
    offline = hub_offline()
    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=offline, use_safetensors=True)
    except Exception as exc:
        raise DMQuantError(
            f"could not load hub id {repo_id!r} ({type(exc).__name__}): it is not in the local cache and the hub "
            "cannot be reached" + (" (HF_HUB_OFFLINE=1)" if offline else "") + "; download it where there is a "
            f"network (`huggingface-cli download {repo_id}`) or pass a local pipeline folder"
        ) from exc
