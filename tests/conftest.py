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
