"""``evaluate``: generate from a prompt list (and from a reference with identical seeds), measure, report.

Writes ``out_dir/metrics.json``, ``grid.png`` (reference | evaluated), ``report.md`` and the images
(``images/evaluated``, ``images/reference``, ``images/real``). Everything is written into a temporary
folder beside ``out_dir`` and renamed into place at the end, so a failure leaves nothing half written.

Video pipelines (frames N x F x H x W x 3): PSNR / SSIM / LPIPS against the reference over all frames
(the mean over every frame of every video), CLIP score (and the judge's accuracy) on the middle frame
(index F // 2), no FID (``fid`` and ``fid_vs_reference`` are None, ``fid_note`` says why), grid.png with
one row of evenly spaced frames per video (reference | evaluated), and each video saved as one strip
PNG of all its frames, left to right.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dmquant.diffusers_io import process_state
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.loading import load_pipeline
from dmquant.metrics.clip_score import DEFAULT_REAL_CLIP, compute_clip_score, load_clip
from dmquant.metrics.fid import compute_fid
from dmquant.metrics.fidelity import fidelity_metrics
from dmquant.metrics.images import (
    as_frames,
    as_uint8_batch,
    frame_strip,
    frame_strip_grid,
    load_pngs,
    save_pngs,
    side_by_side_grid,
)
from dmquant.prompts import check_enough_prompts, read_prompts
from dmquant.runs import atomic_folder, check_output_folder
from dmquant.zoo.data import parse_caption, render
from dmquant.zoo.judge import JUDGE, attribute_accuracy

# ``out_dir`` may be missing, empty, or an earlier evaluation folder (replaced); any other folder is refused
EVALUATION_KINDS = ("evaluation",)


def _grammar_prompts(prompts: Sequence[str]) -> bool:
    try:
        for p in prompts:
            parse_caption(p)
    except DMQuantError:
        return False
    return True


def render_prompts(prompts: Sequence[str], seed: int = 0) -> np.ndarray:
    """Procedural ground truth for grammar prompts: scene i rendered with jitter seed ``seed + i``."""
    return np.stack([render(parse_caption(p), seed + i) for i, p in enumerate(prompts)])


def _name(spec: Any) -> str:
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    return getattr(getattr(spec, "config", None), "_name_or_path", None) or type(spec).__name__


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def evaluate(
    model: Any,
    prompts: str | Path | Sequence[str],
    num_images: int,
    out_dir: str | Path,
    reference: Any = None,
    *,
    config: GenerationConfig | None = None,
    clip_model: str = "auto",
    fid_features: Any = "auto",
    real_images: str | Path | np.ndarray | None = None,
    device: str = "cpu",
    distributed: bool | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Generate ``num_images`` images from the first prompts, measure them, write the report; returns metrics.

    - ``model`` / ``reference``: pipeline objects or specs for :func:`dmquant.loading.load_pipeline` (dir, zoo name, hub id).
    - ``clip_model`` / ``fid_features``: "auto" picks the zoo judge for prompts of the shapes grammar,
      else ``ViT-L-14:openai`` for CLIP score and Inception for FID.
    - ``out_dir``: missing, empty, or a folder an earlier ``evaluate`` wrote (replaced once the new one is
      complete); any other folder is refused before any work (DMQuantError).
    - FID is against ``real_images`` (a folder of images or an array) when given, else against the
      procedural ground truth for grammar prompts, else against the reference's images.
    - ``height`` / ``width``: the generated size (None: the pipeline's default); the number of frames of
      a video pipeline is ``config.num_frames``. Videos: see the module's docstring.
    """
    start = time.time()
    cfg = config or GenerationConfig()
    prompt_file = str(prompts) if isinstance(prompts, (str, Path)) else None
    prompt_list = read_prompts(prompts, num_images) if prompt_file else list(prompts)
    check_enough_prompts(prompt_list, num_images)
    prompt_list = prompt_list[:num_images]
    if num_images < 2:
        raise DMQuantError(f"FID needs at least 2 images; asked for {num_images}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, True, replaceable=EVALUATION_KINDS)  # before any work
    grammar = _grammar_prompts(prompt_list)
    clip_spec = (JUDGE if grammar else DEFAULT_REAL_CLIP) if clip_model == "auto" else clip_model
    feat_spec = (JUDGE if grammar else "inception") if isinstance(fid_features, str) and fid_features == "auto" else fid_features
    real = None
    if real_images is not None:
        real = load_pngs(real_images) if isinstance(real_images, (str, Path)) else as_uint8_batch(real_images)
        if len(real) < 2:
            raise DMQuantError(f"FID needs at least 2 real images; {real_images} has {len(real)}")

    # load everything first: a missing reference fails before any generation
    ref_pipe = load_pipeline(reference, device) if reference is not None else None
    pipe = load_pipeline(model, device)

    t_gen = time.time()
    size = {k: v for k, v in dict(height=height, width=width).items() if v is not None}
    images = generate(pipe, prompt_list, cfg, distributed=distributed, **size)
    ref_images = generate(ref_pipe, prompt_list, cfg, distributed=distributed, **size) if ref_pipe is not None else None
    gen_seconds = time.time() - t_gen
    video = images.ndim == 5
    if video:  # FID is for image sets: skipped; CLIP (and the judge) on the middle frame
        return _evaluate_video(images, ref_images, prompt_list, out_dir, clip_spec, grammar, device, distributed,
                               dict(num_images=num_images, seconds_generation=round(gen_seconds, 2), model=_name(model),
                                    reference=_name(reference) if reference is not None else None,
                                    prompts=prompt_file or f"{len(prompt_list)} prompts given in code",
                                    generation=cfg.to_dict(), clip_model=clip_spec), start)

    fid_set = None
    if real is not None:
        fid_set = "real images" + (f" ({real_images})" if isinstance(real_images, (str, Path)) else "")
    elif grammar:
        real, fid_set = render_prompts(prompt_list, cfg.seed), "procedural ground truth of the prompts"
    elif ref_images is not None:
        real, fid_set = ref_images, "reference images"
    metrics: dict[str, Any] = {
        "clip_score": compute_clip_score(images, prompt_list, clip_spec, device),
        "fid": compute_fid(images, real, feat_spec, device=device) if real is not None else None,
        "fid_vs_reference": compute_fid(images, ref_images, feat_spec, device=device) if ref_images is not None else None,
        "psnr_vs_reference": None,
        "ssim_vs_reference": None,
        "lpips_vs_reference": None,
    }
    if ref_images is not None:
        metrics.update(fidelity_metrics(images, ref_images))
        metrics["clip_score_reference"] = compute_clip_score(ref_images, prompt_list, clip_spec, device)
    if grammar and clip_spec == JUDGE:
        acc = attribute_accuracy(load_clip(JUDGE, device), images, prompt_list)
        metrics.update({f"judge_{k}_accuracy": v for k, v in acc.items()})
    metrics.update(
        num_images=num_images,
        seconds=round(time.time() - start, 2),
        seconds_generation=round(gen_seconds, 2),
        model=_name(model),
        reference=_name(reference) if reference is not None else None,
        prompts=prompt_file or f"{len(prompt_list)} prompts given in code",
        generation=cfg.to_dict(),
        clip_model=clip_spec,
        fid_features=feat_spec if isinstance(feat_spec, str) else getattr(feat_spec, "name", "custom"),
        fid_against=fid_set,
    )
    metrics = {k: _finite(v) for k, v in metrics.items()}

    if distributed is False or process_state(device).is_main_process:
        _write_outputs(out_dir, metrics, images, ref_images, real, prompt_list)
    return metrics


def _evaluate_video(videos, ref_videos, prompts, out_dir: Path, clip_spec, grammar: bool, device: str,
                    distributed, info: dict, start: float) -> dict:
    """The video branch of :func:`evaluate` (videos N x F x H x W x 3)."""
    middle = videos.shape[1] // 2
    metrics: dict[str, Any] = {
        "clip_score": compute_clip_score(videos[:, middle], prompts, clip_spec, device),
        "fid": None,
        "fid_vs_reference": None,
        "psnr_vs_reference": None,
        "ssim_vs_reference": None,
        "lpips_vs_reference": None,
    }
    if ref_videos is not None:
        metrics.update(fidelity_metrics(as_frames(videos), as_frames(ref_videos)))
        metrics["clip_score_reference"] = compute_clip_score(ref_videos[:, middle], prompts, clip_spec, device)
    if grammar and clip_spec == JUDGE:
        acc = attribute_accuracy(load_clip(JUDGE, device), videos[:, middle], prompts)
        metrics.update({f"judge_{k}_accuracy": v for k, v in acc.items()})
    metrics.update(num_frames=int(videos.shape[1]), frame_size=list(videos.shape[2:4]),
                   clip_frame=f"middle frame (index {middle} of {videos.shape[1]})",
                   fid_note="FID skipped for video (an image-set metric)", seconds=round(time.time() - start, 2),
                   **info, fid_features=None, fid_against=None)
    metrics = {k: _finite(v) for k, v in metrics.items()}
    if distributed is False or process_state(device).is_main_process:
        _write_outputs(out_dir, metrics, videos, ref_videos, None, prompts)
    return metrics


def _write_outputs(out_dir: Path, metrics: dict, images, ref_images, real, prompts: Sequence[str]) -> None:
    video = images.ndim == 5
    grid, to_files = (frame_strip_grid, lambda v: [frame_strip(x) for x in v]) if video else (side_by_side_grid, as_uint8_batch)
    with atomic_folder(out_dir, overwrite=True, kind="evaluation", replaceable=EVALUATION_KINDS) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        Image.fromarray(grid(images, ref_images)).save(tmp / "grid.png")
        save_pngs(to_files(images), tmp / "images" / "evaluated")
        if ref_images is not None:
            save_pngs(to_files(ref_images), tmp / "images" / "reference")
        if real is not None and (metrics.get("fid_against") or "").startswith("procedural"):
            save_pngs(real, tmp / "images" / "real")
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(_report(metrics), encoding="utf-8")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _report(m: dict) -> str:
    video = "num_frames" in m
    item = "video" if video else "image"
    rows = [
        ("CLIP score (0-100, higher is better)" + (f", {m['clip_frame']}" if video else ""), m["clip_score"]),
        ("CLIP score of the reference", m.get("clip_score_reference")),
        *([] if video else [(f"FID vs {m['fid_against'] or 'n/a'} (lower is better)", m["fid"]),
                            ("FID vs reference images", m["fid_vs_reference"])]),
        ("PSNR vs reference, dB (inf = identical)", m["psnr_vs_reference"]),
        ("SSIM vs reference (1 = identical)", m["ssim_vs_reference"]),
        ("LPIPS vs reference (0 = identical)", m["lpips_vs_reference"]),
    ]
    rows += [(f"judge zero-shot {k.split('_')[1]} accuracy" + (", middle frame" if video else ""), v)
             for k, v in m.items() if k.startswith("judge_")]
    g = m["generation"]
    lines = [
        "# dmquant evaluation",
        "",
        f"- model: `{m['model']}`",
        f"- reference: `{m['reference']}`" if m["reference"] else "- reference: none",
        f"- prompts: {m['prompts']} (first {m['num_images']}, one {item} each)",
        f"- generation: {g['num_inference_steps']} steps, guidance {g['guidance_scale']}, seeds {g['seed']}.."
        f"{g['seed'] + m['num_images'] - 1} ({item} i: seed {g['seed']} + i), batch {g['batch_size']}",
        f"- CLIP model: `{m['clip_model']}`" + ("" if video else f"; FID features: `{m['fid_features']}`"),
        f"- time: {m['seconds']} s ({m['seconds_generation']} s generating)",
        *([f"- video: {m['num_frames']} frames of {m['frame_size'][0]}x{m['frame_size'][1]} per prompt; PSNR / SSIM "
           f"/ LPIPS over all frames (mean over frames and videos); CLIP score on the {m['clip_frame']}; "
           f"{m['fid_note']}; grid.png: evenly spaced frames, one row per video"] if video else []),
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {name} | {_fmt(v)} |" for name, v in rows],
        "",
        "![reference (left) | evaluated (right)](grid.png)" if m["reference"] else "![evaluated](grid.png)",
        "",
        "Protocol: eval/README.md.",
        "",
    ]
    return "\n".join(lines)
