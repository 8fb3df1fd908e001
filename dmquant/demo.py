"""``dmquant demo``: quantize the zoo's tiny-shapes-sd at W8A8, W4A8 and W4A4, evaluate against FP, one table.

It follows the protocol of eval/README.md at a small size (defaults: 32 held-out prompts, 25 steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dmquant import zoo
from dmquant.api import quantize
from dmquant.config import load_recipe
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig
from dmquant.metrics.evaluation import evaluate
from dmquant.prompts import check_enough_prompts, read_prompts
from dmquant.runs import atomic_folder, check_output_folder

DEMO_KINDS = ("demo",)  # the demo replaces only a folder an earlier demo wrote
CALIB_DIR = Path(__file__).resolve().parent.parent / "calib"


@dataclass(frozen=True)
class DemoConfig:
    model: str = "tiny-shapes-sd"
    recipes: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")
    num_images: int = 32
    num_calib_prompts: int = 32
    num_inference_steps: int = 25
    out: str = "runs/demo"
    progress: bool = True


def _prompt_file(name: str) -> Path:
    path = CALIB_DIR / name
    if not path.is_file():
        raise DMQuantError(f"{path} is missing: the demo runs from a source checkout of dmquant (calib/ prompt sets)")
    return path


def run_demo(config: DemoConfig = DemoConfig()) -> list[dict]:
    """Evaluate FP and each recipe on held-out prompts; returns one row of metrics per model.

    ``config.out`` is written as one folder (complete or not at all); an earlier demo folder there is
    replaced, any other non-empty folder refused before any work."""
    # every input is checked before any work: recipes, prompt files, counts, the output folder
    recipes = {name: load_recipe(name) for name in config.recipes}
    if not recipes or len(recipes) != len(config.recipes) or "fp32" in recipes:
        raise DMQuantError(f"--recipes {','.join(config.recipes)!r}: give distinct recipe names (see `dmquant "
                           "recipes`), e.g. w8a8,w4a8")
    calib = read_prompts(_prompt_file("shapes_calib.txt"))[: config.num_calib_prompts]
    eval_prompts = _prompt_file("shapes_eval.txt")
    check_enough_prompts(read_prompts(eval_prompts), config.num_images, str(eval_prompts))
    if config.num_images < 2:
        raise DMQuantError(f"FID needs at least 2 images; asked for {config.num_images}")
    generation = GenerationConfig(num_inference_steps=config.num_inference_steps, progress=config.progress)
    check_output_folder(config.out, True, replaceable=DEMO_KINDS)
    rows = []
    with atomic_folder(config.out, overwrite=True, kind="demo", replaceable=DEMO_KINDS) as out:
        reference = zoo.load(config.model)
        rows.append(_row("fp32", evaluate(reference, eval_prompts, config.num_images, out / "fp32",
                                          config=generation), 0.0))
        for name, recipe in recipes.items():
            pipe = zoo.load(config.model)
            start = time.perf_counter()
            quantize(pipe, recipe, prompts=calib, num_inference_steps=config.num_inference_steps,
                     progress=config.progress)
            seconds = time.perf_counter() - start
            pipe.save_pretrained(out / name / "model")
            metrics = evaluate(pipe, eval_prompts, config.num_images, out / name / "eval", reference=reference,
                               config=generation)
            rows.append(_row(name, metrics, seconds))
    return rows


def _row(name: str, metrics: dict, calib_seconds: float) -> dict:
    keys = ("clip_score", "fid", "psnr_vs_reference", "ssim_vs_reference", "judge_shape_accuracy",
            "judge_color_accuracy")
    return {"model": name, **{k: metrics.get(k) for k in keys}, "calibration_seconds": round(calib_seconds, 1)}


def format_table(rows: list[dict]) -> str:
    def cell(v, fmt):
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))

    lines = ["| model | CLIP score | FID (judge) | PSNR vs FP (dB) | SSIM vs FP | shape acc | color acc | calib (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(" | ".join(["", r["model"], cell(r["clip_score"], "{:.2f}"), cell(r["fid"], "{:.2f}"),
                                 cell(r["psnr_vs_reference"], "{:.2f}"), cell(r["ssim_vs_reference"], "{:.3f}"),
                                 cell(r["judge_shape_accuracy"], "{:.2f}"), cell(r["judge_color_accuracy"], "{:.2f}"),
                                 cell(r["calibration_seconds"], "{:.0f}"), ""]).strip())
    return "\n".join(lines)
