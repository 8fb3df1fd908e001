"""dmquant: post-training quantization for diffusion models, on top of diffusers.

The public API is imported lazily, so ``import dmquant.kernels`` works without diffusers. Importing
dmquant registers it with diffusers' quantizers (``quant_method: dmquant``) when diffusers loads them
(:mod:`dmquant.diffusers_hook`), so ``DiffusionPipeline.from_pretrained`` reads saved dmquant folders.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "quantize": ("dmquant.api", "quantize"),
    "precompute_time_tables": ("dmquant.api", "precompute_time_tables"),
    "QuantConfig": ("dmquant.config", "QuantConfig"),
    "load_recipe": ("dmquant.config", "load_recipe"),
    "list_recipes": ("dmquant.config", "list_recipes"),
    "DMQuantError": ("dmquant.errors", "DMQuantError"),
    "freeze": ("dmquant.api", "freeze"),
    "inspect_quantization": ("dmquant.diagnostics.job", "inspect_quantization"),
    "QuantizedStableDiffusionPipeline": ("dmquant.quantized_pipeline", "QuantizedStableDiffusionPipeline"),
    "QuantizedDiTPipeline": ("dmquant.quantized_pipeline", "QuantizedDiTPipeline"),
    "load_quantized_pipeline": ("dmquant.quantized_pipeline", "load_quantized_pipeline"),
    "load_quantized_denoiser": ("dmquant.serialization", "load_quantized_denoiser"),
    "DMQuantConfig": ("dmquant.diffusers_quantizer", "DMQuantConfig"),
    "make_diffusers_loadable": ("dmquant.diffusers_native", "make_diffusers_loadable"),
    "zoo": ("dmquant.zoo", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dmquant' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


from dmquant import diffusers_hook  # noqa: E402  (last: registering may import dmquant's own modules)

diffusers_hook.install()
