"""Does a calibration move with the thread count? Calibrate a recipe on tiny-shapes-sd with 1 and with 2 torch
threads (each in its own process) and compare every activation scale and zero point (eval/RESULTS.md,
"Robustness").

    python eval/thread_ranges.py [--recipe w8a8-static] [--guidance 7.5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def calibrate(threads: int, recipe: str, guidance: float, out: str) -> None:
    from safetensors.torch import save_file

    import dmquant

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import robustness as R

    torch.set_num_threads(threads)
    pipe = dmquant.zoo.load("tiny-shapes-sd")
    dmquant.quantize(pipe, recipe, prompts=R.calibration_prompts("zoo", "text")[:64], progress=False,
                     guidance_scale=guidance)
    state = {k: v.float().contiguous() for k, v in pipe.unet.state_dict().items()
             if ("scale" in k or "zero" in k) and "weight" not in k}
    save_file(state, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="w8a8-static")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # threads, output file
    a = p.parse_args()
    if a.child:
        return calibrate(int(a.child[0]), a.recipe, a.guidance, a.child[1])
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for threads in (1, 2):
            out = os.path.join(tmp, f"t{threads}.safetensors")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
            subprocess.run([sys.executable, __file__, "--recipe", a.recipe, "--guidance", str(a.guidance),
                            "--child", str(threads), out], check=True, env=env)
            files.append(load_file(out))
    one, two = files
    rel = {k: float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)) for k in one}
    print(f"{len(rel)} tensors; differ: {sum(v > 0 for v in rel.values())}; largest relative difference "
          f"{max(rel.values()):.2e}; above 1e-3: {sum(v > 1e-3 for v in rel.values())}")


if __name__ == "__main__":
    main()
