"""Registers dmquant with diffusers' quantizers the moment diffusers loads them (``import dmquant`` runs
:func:`install`), so ``DiffusionPipeline.from_pretrained`` finds the ``dmquant`` quant_method.

``import dmquant`` stays cheap and does not need diffusers: when ``diffusers.quantizers.auto`` is
already imported, :mod:`dmquant.diffusers_quantizer` registers at once; otherwise a finder on
``sys.meta_path`` waits for that module, lets it run, then imports :mod:`dmquant.diffusers_quantizer`
(which registers itself on import; registering twice changes nothing) and steps aside. Nothing heavy is
imported here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

TARGET = "diffusers.quantizers.auto"  # holds AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING
QUANTIZER_MODULE = "dmquant.diffusers_quantizer"


def install() -> None:
    """Register now if diffusers' quantizers are loaded, else when they are (idempotent)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _register() -> None:
    # by name: this module must not import diffusers (nor make the import graph see a dependency)
    importlib.import_module(QUANTIZER_MODULE)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for :data:`TARGET` it asks the other finders and wraps the loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
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
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        _register()

    def __getattr__(self, name):  # get_source, is_package, ... of the wrapped loader
        if name == "loader":  # not set yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
