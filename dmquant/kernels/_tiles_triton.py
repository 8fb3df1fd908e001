"""Triton helpers shared by the GEMM kernels (imported lazily, with them)."""

from __future__ import annotations

import triton
import triton.language as tl

from dmquant.kernels._dispatch import launcher


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's ``[BLOCK_M, BLOCK_N]`` output tile in the grouped launch order (``GROUP_M`` row blocks
    share each weight column block while it is in L2): ``(offs_m, offs_n, m_ok, n_ok)``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


def launch_tiled(tuned, kernel, device, m: int, n: int, args: tuple, consts: dict, blocks: dict) -> None:
    """Launch a GEMM kernel over ``m x n`` outputs in tiles: on CUDA ``tuned`` (an autotuned kernel; the grid
    follows the tile it picks), elsewhere ``kernel`` through the interpreter with the tile of ``blocks``
    (``BLOCK_M``, ``BLOCK_N`` and any other constants of that tile)."""
    if device.type == "cuda":
        tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](*args, **consts)
    else:
        grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
        launcher(kernel, device)[grid](*args, **consts, **blocks)
