"""The quantized layers (one per op kind, simulated and frozen states of the same object), their
backends, the outlier branch, attention processors, and the wrapping of a denoiser for a recipe.
They hold quantizers; they do not compute ranges."""
