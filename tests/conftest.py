import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Triton reads it when a kernel is decorated: set before any test module imports dmquant (loading a saved
# pipeline imports the kernels), not only in tests/kernels/conftest.py, which is collected after tests/calibration.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Small test models do not gain from threads, and idle OpenMP threads spin when cores are shared.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global torch RNG state: a module built from it (``nn.Linear(...)`` without a
    generator) gets the same weights whichever tests ran before, so a test passes or fails alone as in the suite."""
    torch.manual_seed(0)
    yield


def _fast_recipe(name: str):
    """A shipped recipe with its learned-rounding fit cut to 4 iterations on 2 samples: the same layers, state and
    frozen graph in seconds (the fit's quality is asserted where it is the subject: tests/calibration)."""
    from dataclasses import replace

    from dmquant.config import load_recipe

    config = load_recipe(name)
    if config.reconstruction is None:
        return config
    return replace(config, reconstruction=replace(config.reconstruction, iterations=4, num_samples=2))


@pytest.fixture
def fast_recipe():
    """:func:`_fast_recipe`, for tests that quantize with a recipe whose reconstruction they do not test (``w4a4``,
    ``w4a8``)."""
    return _fast_recipe
