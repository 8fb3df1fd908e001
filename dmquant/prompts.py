"""Prompt files: one prompt per line (``#`` starts a comment); for class-conditioned pipelines the lines
are class ids or labels (see :func:`dmquant.diffusers_io.class_id`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dmquant.errors import DMQuantError


def read_prompts(path: str | Path, num_images: int | None = None) -> list[str]:
    """The prompts of a text file; with ``num_images``, the first ``num_images`` of them (DMQuantError if
    the file has fewer)."""
    path = Path(path)
    if not path.is_file():
        raise DMQuantError(f"prompt file not found: {path}: pass a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DMQuantError(f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as "
                           "UTF-8, one prompt per line") from None
    if "\x00" in text:
        raise DMQuantError(f"prompt file {path} holds NUL bytes (a binary file?): pass a text file, one prompt per line")
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise DMQuantError(f"prompt file {path} has no prompts: write one prompt per line")
    if num_images is not None:
        check_enough_prompts(prompts, num_images, str(path))
        prompts = prompts[:num_images]
    return prompts


def check_enough_prompts(prompts: Sequence[str], num_images: int, where: str = "the prompt list") -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise DMQuantError(f"num_images must be >= 1, got {num_images}")
    if len(prompts) < num_images:
        raise DMQuantError(
            f"{where} has {len(prompts)} prompts but {num_images} images were asked for (one prompt per image): "
            f"add prompts or lower --num-images"
        )
