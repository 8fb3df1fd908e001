"""Registers dmquant with diffusers and PEFT the moment they load the modules dmquant extends (``import
dmquant`` runs :func:`install`):

* ``diffusers.quantizers.auto``: :mod:`dmquant.diffusers_quantizer` adds the ``dmquant`` quant_method, so
  ``DiffusionPipeline.from_pretrained`` reads saved dmquant folders;
* ``peft``: :func:`dmquant.nn.lora.register` makes every ``LoraConfig`` map dmquant's quantized layers to
  their LoRA layers, so ``load_lora_weights`` works on a quantized denoiser;
* ``diffusers.loaders.lora_pipeline``: :func:`dmquant.nn.lora.register_flux` lets FLUX's LoRA loader pass
  over quantized layers.

``import dmquant`` stays cheap and needs neither diffusers nor PEFT: a target already imported is
registered at once; otherwise a finder on ``sys.meta_path`` waits for it, lets it run, then calls the
registering function (registering twice changes nothing; each registering module also registers when it
is imported), and steps aside once every target is loaded.
Nothing heavy is imported here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# module -> "dmquant module:function" that registers with it once it has run
HOOKS = {
    "diffusers.quantizers.auto": "dmquant.diffusers_quantizer:register",  # holds AUTO_QUANTIZER_MAPPING / ...
    "peft": "dmquant.nn.lora:register",
    "diffusers.loaders.lora_pipeline": "dmquant.nn.lora:register_flux",
}


def install() -> None:
    """Register with every target already imported, and with the others when they are (idempotent)."""
    for target in HOOKS:
        if target in sys.modules:
            _register(target)
    if not _all_loaded() and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _all_loaded() -> bool:
    return all(target in sys.modules for target in HOOKS)


def _register(target: str) -> None:
    # by name: this module must not import diffusers or PEFT (nor make the import graph see a dependency).
    # Each registering module also registers at the end of its own import: when it is the one importing the
    # target (partially initialised, no function yet), that call does the work.
    module, _, function = HOOKS[target].partition(":")
    registering = getattr(importlib.import_module(module), function, None)
    if registering is not None:
        registering()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module of :data:`HOOKS` it asks the other finders and wraps the loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    """The module's own loader; registers dmquant once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if _all_loaded():
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        _register(module.__name__)

    def __getattr__(self, name):  # get_source, is_package, ... of the wrapped loader
        if name == "loader":  # not set yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
