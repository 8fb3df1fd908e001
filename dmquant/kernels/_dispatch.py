"""Backend choice shared by the kernels: Triton on CUDA, plain torch elsewhere, warn-once fallback.

``backend`` arguments accept ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"``
(Triton; on CPU tensors through Triton's interpreter, slow, for tests) and ``"torch"``.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
BACKENDS = ("auto", "triton", "torch")
_warned: set[str] = set()
_failed: set[str] = set()
_interpreted: dict[int, object] = {}


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether a call with this ``backend`` on this tensor's device should run the Triton kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not has_triton():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        return True
    return tensor.is_cuda and has_triton()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def run_with_fallback(name: str, backend: str, fast: Callable[[], T], slow: Callable[[], T]) -> T:
    """Run ``fast``; if it fails and the backend was chosen automatically, warn once and run ``slow``.

    After a failure, later ``"auto"`` calls of the same kernel go straight to ``slow``.
    """
    if backend == "triton":
        return fast()
    if name in _failed:
        return slow()
    try:
        return fast()
    except Exception as err:  # an unsupported GPU or a Triton version we have not seen
        _failed.add(name)
        warn_once(name, f"dmquant: Triton {name} kernel failed ({type(err).__name__}: {err}); "
                        "using the plain torch path for it from now on")
        return slow()


def launcher(kernel, device: torch.device):
    """The kernel to launch for tensors on ``device``: itself on CUDA, its interpreted twin on CPU."""
    if device.type == "cuda":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn"):  # unwrap an Autotuner around a JITFunction
        fn = fn.fn
    key = id(fn)
    if key not in _interpreted:
        _interpreted[key] = InterpretedFunction(fn)
    return _interpreted[key]
