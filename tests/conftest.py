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
