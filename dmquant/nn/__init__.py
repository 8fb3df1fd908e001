"""Quantized twins of torch/diffusers modules. They hold quantizers; they do not compute ranges."""
