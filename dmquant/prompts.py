"""Prompt files: one prompt per line (``#`` starts a comment), or class ids / labels for DiT pipelines."""

from __future__ import annotations

from pathlib import Path

from dmquant.calibration.collect import conditioning_argument
from dmquant.errors import DMQuantError


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DMQuantError(f"prompt file not found: {path}: pass a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise DMQuantError(f"prompt file {path} has no prompts: write one prompt per line")
    return prompts


def prompts_for_pipeline(pipe, prompts: list[str]) -> list:
    """Strings for text pipelines; class ids for class-conditioned ones (integers or label names)."""
    if conditioning_argument(pipe) != "class_labels":
        return list(prompts)
    return [class_id(pipe, p) for p in prompts]


def class_id(pipe, prompt) -> int:
    """Class id for a class-conditioned pipeline (DiT): an integer, or a label of ``pipe.labels``
    (exact, else the longest label the prompt contains: "a large red circle at the top" -> "red circle")."""
    if isinstance(prompt, int):
        return prompt
    text = str(prompt).strip()
    if text.lstrip("-").isdigit():
        return int(text)
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
