"""The ``dmquant`` command line: argument parsing and calls into the library, nothing else."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

from dmquant import workflows
from dmquant.bench import bench_model, format_report
from dmquant.config import list_recipes, load_recipe
from dmquant.demo import DemoConfig, format_table, run_demo
from dmquant.diagnostics.job import InspectJob, run_inspect
from dmquant.diagnostics.report import format_summary
from dmquant.diffusers_io import silence_progress_bars
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig
from dmquant.metrics.evaluation import evaluate

MAX_SEED = 2**63 - 2**32  # seed + image index stays a valid torch seed


def _integer(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {bound}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


_finite_float.__name__ = "number"
POSITIVE, SEED = _integer(1), _integer(0, MAX_SEED)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="quantize a pipeline's denoiser and calibrate it; write a run folder")
    p.add_argument("--model", required=True, help="zoo name, local diffusers folder, or hub id")
    p.add_argument("--recipe", required=True, help="recipe name (see `dmquant recipes`) or YAML path")
    p.add_argument("--prompts", help="calibration prompt file, one prompt (or class id) per line")
    p.add_argument("--out", required=True, help="run folder to write (must not exist unless --overwrite)")
    p.add_argument("--steps", type=POSITIVE, dest="num_inference_steps", help="denoising steps of calibration runs")
    p.add_argument("--num-timesteps", type=POSITIVE, help="how many of those steps are recorded")
    p.add_argument("--batch-size", type=POSITIVE)
    p.add_argument("--max-prompts", type=POSITIVE)
    p.add_argument("--seed", type=SEED)
    p.add_argument("--guidance-scale", type=_finite_float)
    p.add_argument("--height", type=POSITIVE)
    p.add_argument("--width", type=POSITIVE)
    p.add_argument("--num-frames", type=POSITIVE, help="video pipelines: frames per video (default: the pipeline's)")
    p.add_argument("--target-bits", type=_finite_float,
                   help="--recipe auto: average bits per quantized weight, scales included (e.g. 4.5)")
    p.add_argument("--max-weight-memory",
                   help="--recipe auto: the denoiser's weight memory, e.g. 2GB, 700MiB or 123456 (bytes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder dmquant wrote (never any other folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate an image from a model or a run folder")
    p.add_argument("--model", required=True, help="run folder, zoo name, local diffusers folder, or hub id")
    p.add_argument("--prompt", required=True, help="text prompt (or class id / label for class-conditioned models)")
    p.add_argument("--out", required=True, help="image file to write (PNG); a video pipeline's frames go into "
                   "one strip, left to right, or an animated GIF if the name ends with .gif")
    p.add_argument("--steps", type=POSITIVE, default=25, dest="num_inference_steps")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--guidance-scale", type=_finite_float)
    p.add_argument("--height", type=POSITIVE)
    p.add_argument("--width", type=POSITIVE)
    p.add_argument("--num-frames", type=POSITIVE, help="video pipelines: frames per video (default: the pipeline's)")
    p.add_argument("--device", default="cpu")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency per denoising step and memory of a model or quantized folder")
    p.add_argument("--model", required=True, help="quantized folder, zoo name, local diffusers folder, or hub id")
    p.add_argument("--batch", type=POSITIVE, default=2, help="batch of one step (2 = classifier-free guidance)")
    p.add_argument("--latent-size", type=POSITIVE, help="latent height/width (default: the model's sample size)")
    p.add_argument("--repeats", type=POSITIVE, default=3)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="generate with fixed seeds and measure CLIP score, FID, PSNR/SSIM vs a reference")
    p.add_argument("--model", required=True, help="quantized folder, zoo name, local diffusers folder, or hub id")
    p.add_argument("--reference", help="the model to compare with (same seeds): e.g. the full-precision one")
    p.add_argument("--prompts", required=True, help="prompt file, one prompt per line (image i uses prompt i)")
    p.add_argument("--num-images", type=_integer(2), required=True)
    p.add_argument("--out", required=True, help="folder for metrics.json, grid.png, report.md, images/ (an "
                   "earlier evaluation folder there is replaced; any other non-empty folder is refused)")
    p.add_argument("--steps", type=POSITIVE, default=25, dest="num_inference_steps")
    p.add_argument("--guidance-scale", type=_finite_float, default=5.0)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--clip-model", default="auto", help="open_clip 'name:pretrained' or local-dir:PATH; auto: "
                   "the zoo judge for zoo prompts, else ViT-L-14:openai")
    p.add_argument("--fid-features", default="auto", help="inception, or a CLIP spec; auto as for --clip-model")
    p.add_argument("--real-images", help="folder of real images for FID")
    p.add_argument("--height", type=POSITIVE)
    p.add_argument("--width", type=POSITIVE)
    p.add_argument("--num-frames", type=POSITIVE, help="video pipelines: frames per video (default: the pipeline's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="quantize the zoo's tiny-shapes-sd at W8A8 and W4A8, evaluate against FP")
    p.add_argument("--num-images", type=_integer(2), default=32)
    p.add_argument("--steps", type=POSITIVE, default=25, dest="num_inference_steps")
    p.add_argument("--recipes", default="w8a8,w4a8,w4a4", help="comma-separated recipe names")
    p.add_argument("--out", default="runs/demo", help="folder to write (an earlier demo folder there is replaced)")
    p.add_argument("--quiet", action="store_true")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="quantize with a recipe and measure, layer by layer on held-out calls, where "
                       "it loses and why; write inspect.json, report.md and plots")
    p.add_argument("--model", required=True, help="zoo name, local diffusers folder (full precision), or hub id")
    p.add_argument("--recipe", required=True, help="recipe name (see `dmquant recipes`) or YAML path")
    p.add_argument("--prompts", required=True, help="prompt file, one prompt (or class id) per line: the last "
                   "--num-eval-prompts are held out for measuring unless --eval-prompts is given")
    p.add_argument("--out", required=True, help="folder to write (an earlier inspect folder there is replaced with "
                   "--overwrite; any other non-empty folder is refused)")
    p.add_argument("--eval-prompts", help="held-out prompt file (then every --prompts line calibrates)")
    p.add_argument("--num-inference-steps", "--steps", type=POSITIVE, dest="num_inference_steps",
                   help="denoising steps (default: the recipe's calibration steps)")
    p.add_argument("--num-timesteps", type=POSITIVE, default=5, help="steps measured, evenly spaced")
    p.add_argument("--num-eval-prompts", type=POSITIVE, default=4)
    p.add_argument("--max-prompts", type=POSITIVE, help="read only the first K prompts of --prompts")
    p.add_argument("--guidance-scale", type=_finite_float)
    p.add_argument("--height", type=POSITIVE)
    p.add_argument("--width", type=POSITIVE)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier inspect folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmquant", description="Post-training quantization for diffusion models.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_calibrate(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    _add_inspect(sub)
    sub.add_parser("recipes", help="list the built-in recipes")
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _run(args: argparse.Namespace) -> None:
    if getattr(args, "quiet", False):
        silence_progress_bars()
    if args.command == "calibrate":
        fields = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "debug")}
        out = workflows.calibrate(workflows.CalibrateJob(**fields, progress=not args.quiet))
        print(f"wrote {out}")
    elif args.command == "generate":
        fields = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
        print(f"wrote {workflows.generate_image(**fields)}")
    elif args.command == "bench":
        report = bench_model(args.model, args.batch, args.latent_size, args.repeats)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    elif args.command == "evaluate":
        generation = GenerationConfig(args.num_inference_steps, args.guidance_scale, args.seed, args.batch_size,
                                      progress=not args.quiet, num_frames=args.num_frames)
        metrics = evaluate(args.model, args.prompts, args.num_images, args.out, args.reference, config=generation,
                           clip_model=args.clip_model, fid_features=args.fid_features,
                           real_images=args.real_images, device=args.device, height=args.height, width=args.width)
        keys = ("clip_score", "fid", "psnr_vs_reference", "ssim_vs_reference", "seconds")
        print(" ".join(f"{k}={metrics.get(k)}" for k in keys))
        print(f"wrote {args.out}/metrics.json, grid.png, report.md")
    elif args.command == "demo":
        config = DemoConfig(recipes=tuple(args.recipes.split(",")), num_images=args.num_images,
                            num_inference_steps=args.num_inference_steps, out=args.out, progress=not args.quiet)
        print(format_table(run_demo(config)))
    elif args.command == "inspect":
        fields = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "debug")}
        out, data = run_inspect(InspectJob(**fields, progress=not args.quiet))
        print(format_summary(data))
        print(f"wrote {out}/inspect.json, report.md, sqnr_layers.png, step_ranges.png")
    elif args.command == "recipes":
        for name in list_recipes():
            config = load_recipe(name)
            print(f"{name:16s} {config.tag:6s} {' '.join(config.description.split())}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input or environment (DMQuantError, or an OSError: unreadable file,
    read-only place, full disk), one line on stderr; 1 a bug of dmquant (any other exception), one line
    asking for a report; 130 interrupted. ``--debug`` (or DMQUANT_DEBUG=1) adds the traceback."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("DMQUANT_DEBUG", "") not in ("", "0")
    try:
        _run(args)
    except DMQuantError as exc:
        code, line = 2, f"dmquant: error: {_one_line(exc)}"
        trace = traceback.format_exc()
    except OSError as exc:  # the environment, not dmquant: a file that cannot be read or written
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        code, line = 2, f"dmquant: error: {_one_line(exc.strerror or exc)}{where}: check the path and its permissions"
        trace = traceback.format_exc()
    except KeyboardInterrupt:
        code, line = 130, "dmquant: interrupted; nothing was written"
        trace = traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a report request
        code = 1
        line = (f"dmquant: internal error ({type(exc).__name__}: {_one_line(exc)[:300]}): this is a bug in dmquant, "
                f"please report it with the command you ran; rerun with --debug for the traceback")
        trace = traceback.format_exc()
    else:
        return 0
    if debug:
        print(trace, file=sys.stderr, end="")
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
