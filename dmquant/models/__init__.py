"""Per-architecture adapters: the only place that knows the denoisers' module names."""

from dmquant.models.adapters import ADAPTERS, DenoiserAdapter, find_denoiser

__all__ = ["ADAPTERS", "DenoiserAdapter", "find_denoiser"]
