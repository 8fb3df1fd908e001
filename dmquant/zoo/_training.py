"""Small helpers shared by the zoo's training scripts (seeding, schedules, logging, saving)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch


def base_parser(description: str, steps: int, batch_size: int, lr: float, seed: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the budget is 2 cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=50)
    return p


def text_parser(description: str, steps: int, batch_size: int, lr: float, seed: int,
                num_scenes: int) -> argparse.ArgumentParser:
    """:func:`base_parser` with the data options of the text-conditioned denoisers (scenes, and how often the
    whole caption, its color words and its size words are left out)."""
    p = base_parser(description, steps, batch_size, lr, seed)
    p.add_argument("--num-scenes", type=int, default=num_scenes)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--color-word-dropout", type=float, default=0.25)
    p.add_argument("--size-word-dropout", type=float, default=0.25)
    return p


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_steps(opt: torch.optim.Optimizer, total: int, peak: float, warmup: int = 100):
    """``range(total)``, setting every parameter group's learning rate by :func:`lr_at` before each step."""
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, peak, warmup)
        yield step


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """``--time-budget`` and ``--schedule-cuts`` (see :func:`budgeted_steps`)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--time-budget", type=float, default=None,
                       help="seconds of training: at step 100 the step count (and the LR schedule) is cut to what fits, "
                            "and again if the host slows down; the cuts are written to train_log.json (schedule_cuts)")
    group.add_argument("--schedule-cuts", type=schedule_cuts, default=None,
                       help="repeat a budgeted run: its train_log.json, or STEP:TOTAL,... (the step count becomes "
                            "TOTAL at STEP); with the run's other arguments it trains the same steps")


def schedule_cuts(text: str) -> list[tuple[int, int]]:
    """``STEP:TOTAL,...`` or the path of a train_log.json whose ``schedule_cuts`` to take."""
    path = Path(text)
    try:
        if path.suffix == ".json" or path.is_dir():
            record = json.loads((path / "train_log.json" if path.is_dir() else path).read_text())
            pairs = [tuple(pair) for pair in record["schedule_cuts"]]
        else:
            pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"{text!r} is no STEP:TOTAL list nor a train_log.json with schedule_cuts "
                                         f"({err})") from None
    if any(len(p) != 2 or p[0] < 0 or p[1] <= p[0] for p in pairs) or [p[0] for p in pairs] != sorted({p[0] for p in pairs}):
        raise argparse.ArgumentTypeError(f"{text!r}: each cut is STEP:TOTAL with TOTAL > STEP, steps increasing")
    return [(int(a), int(b)) for a, b in pairs]


def budgeted_steps(opt: torch.optim.Optimizer, total: int, peak: float, log: Logger, time_budget: float | None,
                   warmup: int = 100, settle: int = 10, measure: int = 100, checks: int = 10,
                   cuts: list[tuple[int, int]] | None = None):
    """Like :func:`scheduled_steps`; with a ``time_budget`` (seconds of ``log``'s clock), at step ``measure`` the
    step count (and with it the schedule, and ``log.total``) is cut to what fits in the budget at the speed of
    steps ``settle`` to ``measure`` (the first steps are slower: caches and allocator warming up). With
    ``measure <= warmup`` that cut changes no learning rate already used: the warm-up does not depend on the total.
    A host that slows down later would overrun the budget: ``checks`` times more (evenly spaced) the count is cut
    again, never raised, to what fits at the speed since the previous check. Every change of the count is
    appended to ``log.cuts`` as ``(step, new total)``; ``cuts`` (such a list) replays a budgeted run's changes
    instead of measuring, so the run's learning rates, and so its weights, repeat."""
    if cuts is not None and time_budget is not None:
        raise ValueError("a time budget measures its own cuts: give a budget or the cuts to replay, not both")
    replay = dict(cuts or [])
    step, mark = 0, None
    interval = None
    while step < total:
        if step in replay:
            total = log.total = replay[step]
            log.cuts.append((step, total))
        if time_budget is not None and step == settle:
            mark = (step, log.seconds)
        if time_budget is not None and mark is not None and step > settle and (
                step == measure or (interval and step > measure and (step - measure) % interval == 0)):
            rate = (log.seconds - mark[1]) / (step - mark[0])
            fits = min(total, max(step + 1, step + int((time_budget - log.seconds) / rate)))
            if step == measure:
                interval = max(1, (fits - measure) // (checks + 1)) if checks > 0 else None
                print(f"{rate:.3f} s/step: {fits} steps fit the {time_budget:.0f}s budget", flush=True)
            elif fits < total:
                print(f"{rate:.3f} s/step since step {mark[0]}: cut to {fits} steps to hold the {time_budget:.0f}s "
                      f"budget", flush=True)
            if fits != total:
                log.cuts.append((step, fits))
            total, log.total, mark = fits, fits, (step, log.seconds)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, peak, warmup)
        yield step
        step += 1


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, max_norm: float = 1.0) -> None:
    """Backward, gradient-norm clipping of ``params`` at ``max_norm``, and the optimizer's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def to_tensor_images(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Logger:
    """Prints a line every few steps with a running mean of the loss; keeps the last mean."""

    def __init__(self, name: str, total: int, every: int) -> None:
        self.name, self.total, self.every = name, total, every
        self.cuts: list[tuple[int, int]] = []  # (step, new step count) of a budgeted run (budgeted_steps)
        self.start = time.time()
        self.window: list[float] = []
        self.last_mean = float("nan")

    def step(self, step: int, loss: float, **extra: float) -> None:
        self.window.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.last_mean = float(np.mean(self.window))
            self.window = []
            more = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
            print(
                f"[{self.name}] step {step + 1}/{self.total} loss {self.last_mean:.5f} {more} "
                f"({time.time() - self.start:.0f}s)",
                flush=True,
            )

    @property
    def seconds(self) -> float:
        return time.time() - self.start


def write_train_log(folder: Path, name: str, args: argparse.Namespace, logger: Logger, **extra) -> None:
    record = {
        "model": name,
        "final_loss": logger.last_mean,
        "seconds": round(logger.seconds, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "schedule_cuts": [list(cut) for cut in logger.cuts],
        **extra,
    }
    (folder / "train_log.json").write_text(json.dumps(record, indent=2) + "\n")
