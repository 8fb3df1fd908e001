"""Diagnostics of a quantized denoiser: ``dmquant inspect`` (:mod:`dmquant.diagnostics.job`) measures, layer by
layer on held-out calls, the SQNR of weights only / activations only / both, the per-step and per-CFG-branch
input ranges, outlier channels and skip-concatenation parts, and names the likely cause of the worst layers."""
