"""Writes the prompt sets under calib/ (deterministic): ``python -m dmquant.zoo.prompt_sets [repo root]``.

- shapes_calib.txt: 256 captions of the training split (30% with two objects), for calibration;
- shapes_eval.txt: 200 distinct held-out captions (one object of a held-out (shape, color) pair);
- shapes_grid.txt: 12 fixed captions (training and held-out) for the grid a person checks by eye;
- partiprompts_calib.txt / partiprompts_eval.txt: 128 / 200 disjoint PartiPrompts, taken round-robin
  over the 12 categories after a seeded shuffle (from /work/shared/data/PartiPrompts.tsv, Apache-2.0).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from dmquant.zoo import data

GRID_PROMPTS = [
    "a large red circle at the top left on a black background",
    "a medium green square in the center on a gray background",
    "a large blue triangle at the bottom on a brown background",
    "a medium magenta diamond at the right on a black background",
    "a small white square at the bottom right on a gray background",
    "a large cyan circle at the left on a brown background",
    "a small red triangle at the top right and a large blue circle at the bottom left on a black background",
    # held out: these (shape, color) pairs never appear in training
    "a large yellow circle in the center on a black background",
    "a large blue square at the top on a gray background",
    "a medium white triangle at the bottom left on a brown background",
    "a large green diamond in the center on a gray background",
    "a medium yellow circle at the right on a brown background",
]


def _write(path: Path, header: str, lines: list[str]) -> None:
    path.write_text("".join(f"# {h}\n" for h in header.splitlines()) + "\n".join(lines) + "\n", encoding="utf-8")


def parti_subsets(tsv: Path, n_calib: int = 128, n_eval: int = 200, seed: int = 0) -> tuple[list[str], list[str]]:
    with open(tsv, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["Prompt"].strip()]
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["Category"], []).append(" ".join(r["Prompt"].split()))
    rng = random.Random(seed)
    for cat in sorted(by_cat):
        rng.shuffle(by_cat[cat])
    order: list[str] = []
    cats = sorted(by_cat)
    for i in range(max(len(v) for v in by_cat.values())):
        order += [by_cat[c][i] for c in cats if i < len(by_cat[c])]
    return order[:n_calib], order[n_calib : n_calib + n_eval]


def write_all(root: Path, parti_tsv: Path | None = None) -> None:
    calib = root / "calib"
    calib.mkdir(exist_ok=True)
    _, caps = data.make_dataset(256, seed=11, split="train")
    _write(calib / "shapes_calib.txt", "tiny-shapes zoo: training-split captions (dmquant.zoo.data, seed 11)", caps)
    _write(calib / "shapes_eval.txt",
           "tiny-shapes zoo: held-out captions, (shape, color) pairs never seen in training (seed 7)",
           data.sample_captions(200, seed=7, split="heldout"))
    _write(calib / "shapes_grid.txt", "tiny-shapes zoo: fixed prompts of eval/zoo_fp_grid.png (last 5 held out)",
           GRID_PROMPTS)
    if parti_tsv is not None and parti_tsv.is_file():
        cal, ev = parti_subsets(parti_tsv)
        src = "PartiPrompts (Apache-2.0, see PartiPrompts.LICENSE), round-robin over categories, seed 0"
        _write(calib / "partiprompts_calib.txt", f"{src}: calibration subset", cal)
        _write(calib / "partiprompts_eval.txt", f"{src}: evaluation subset (disjoint from calibration)", ev)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    tsv = Path(sys.argv[2]) if len(sys.argv) > 2 else root.parent / "shared" / "data" / "PartiPrompts.tsv"
    write_all(root, tsv)
