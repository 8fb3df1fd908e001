"""Prompt files: one prompt per line (``#`` starts a comment), or class ids / labels for DiT pipelines."""

from __future__ import annotations

from pathlib import Path

from dmquant.calibration.collect import conditioning_argument
from dmquant.errors import DMQuantError


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DMQuantError(f"prompt file {path} does not exist: pass a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise DMQuantError(f"prompt file {path} has no prompts: write one prompt per line")
    return prompts


def prompts_for_pipeline(pipe, prompts: list[str]) -> list:
    """Strings for text pipelines; class ids for class-conditioned ones (integers or label names)."""
    if conditioning_argument(pipe) != "class_labels":
        return list(prompts)
    return [_class_id(pipe, p) for p in prompts]


def _class_id(pipe, prompt) -> int:
    if isinstance(prompt, int):
        return prompt
    text = str(prompt).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return int(pipe.get_label_ids(text)[0])
    except (ValueError, KeyError, AttributeError) as exc:
        raise DMQuantError(
            f"{text!r} is not a class of this class-conditioned pipeline: use an integer class id or a label name"
        ) from exc
