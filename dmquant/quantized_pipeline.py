"""Drop-in quantized diffusers pipelines: ``save_pretrained`` / ``from_pretrained`` like diffusers, and
:class:`QuantizationInfo`, what ``quantize`` did (attached as ``pipe.dmquant``).

A saved folder is a diffusers pipeline folder (``model_index.json`` and one folder per component,
written by the components' own ``save_pretrained``) whose denoiser folder holds the quantized
denoiser (see :mod:`dmquant.serialization`), and so does the ControlNet's folder when the ControlNet was
quantized with it. Saving is atomic: a temporary sibling, then a rename.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
from diffusers import DiffusionPipeline, DiTPipeline, StableDiffusionPipeline
from torch import nn

from dmquant.config import QuantConfig
from dmquant.correction.ptqd import NoiseCorrectionStats, apply_noise_correction
from dmquant.errors import DMQuantError
from dmquant.models.adapters import DENOISER_ATTRIBUTES, adapter_for, find_denoiser
from dmquant.nn.wrap import WrapReport
from dmquant.runs import atomic_folder
from dmquant.serialization import (
    is_quantized_denoiser_folder,
    load_quantized_denoiser,
    read_description,
    save_quantized_denoiser,
)


@dataclass
class QuantizationInfo:
    """What ``quantize`` did; attached to the pipeline (or bare denoiser) as ``pipe.dmquant``."""

    config: QuantConfig
    denoiser: str
    adapter: str
    report: WrapReport
    calibration: dict = field(default_factory=dict)
    frozen: bool = False
    outliers: dict = field(default_factory=dict)
    correction: NoiseCorrectionStats | None = None  # recipes with 'correction'


def attach_info(pipe, info: QuantizationInfo) -> None:
    object.__setattr__(pipe, "dmquant", info)


class QuantizedPipelineMixin:
    """Adds dmquant's saving and loading to a diffusers pipeline class."""

    def save_pretrained(self, save_directory, overwrite: bool = True, extra_files: dict[str, str] | None = None,
                        **_ignored) -> Path:
        """Write a diffusers-layout folder with the quantized denoiser (and ControlNet, if quantized with it);
        ``extra_files`` are text (or bytes) files to add."""
        info = getattr(self, "dmquant", None)
        if info is None:
            raise DMQuantError("this pipeline has no quantized denoiser: call dmquant.quantize(pipe, recipe) first")
        attr, denoiser, _ = find_denoiser(self)
        quantized = {attr: (denoiser, info.config), **{name: (module, module.dmquant.config)
                                                       for name, module in quantized_components(self).items()}}
        with atomic_folder(save_directory, overwrite=overwrite) as tmp:
            self.save_config(tmp)
            _set_base_class_name(tmp / "model_index.json", type(self), getattr(self, "labels", None))
            for name, component in self.components.items():
                if name in quantized:
                    module, config = quantized[name]
                    save_quantized_denoiser(module, tmp / name, config)
                elif component is not None and hasattr(component, "save_pretrained"):
                    component.save_pretrained(tmp / name)
            if getattr(info, "correction", None) is not None:
                info.correction.save(tmp / CORRECTION_NAME)
            for filename, text in (extra_files or {}).items():  # text, or bytes (a plot)
                (tmp / filename).write_bytes(text) if isinstance(text, bytes) else (tmp / filename).write_text(text)
        return Path(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, device: str = "cpu", **kwargs):
        folder = Path(pretrained_model_name_or_path)
        attr = quantized_denoiser_attribute(folder)
        if attr is None:
            raise DMQuantError(f"{folder} holds no dmquant quantized denoiser: pass a folder written by "
                               "save_pretrained of a dmquant-quantized pipeline")
        others = [p.name for p in sorted(folder.iterdir()) if p.name != attr and is_quantized_denoiser_folder(p)]
        modules = {name: load_quantized_denoiser(folder / name, device=device) for name in (attr, *others)}
        kwargs.setdefault("use_safetensors", True)  # every component from safetensors only, never a pickle
        pipe = super().from_pretrained(str(folder), **modules, **kwargs)
        _attach_loaded_info(pipe, folder / attr)
        for name in others:  # a ControlNet quantized with the denoiser
            attach_info(modules[name], loaded_info(modules[name], name, folder / name))
        _load_correction(pipe, folder)
        return pipe.to(device)


CORRECTION_NAME = "dmquant_correction.safetensors"


def _load_correction(pipe, folder: Path) -> None:
    """Hook the saved noise correction (recipes with 'correction') back onto the loaded pipeline."""
    correction = pipe.dmquant.config.correction
    path = folder / CORRECTION_NAME
    if correction is None:
        return
    if not path.is_file():
        raise DMQuantError(f"{path} is missing: the recipe has noise correction but the folder lacks its "
                           "statistics; save the quantized pipeline again")
    stats = NoiseCorrectionStats.load(path)
    pipe.dmquant.correction = stats
    apply_noise_correction(pipe, stats, absorb_variance=correction.absorbs_variance)


def _set_base_class_name(model_index: Path, cls: type, labels: dict[str, int] | None = None) -> None:
    """model_index.json names the diffusers pipeline class, so the folder reads as a diffusers one; a
    class-conditioned pipeline's label names (DiT's ``labels``) are kept as its ``id2label``."""
    base = next(c for c in cls.__mro__ if issubclass(c, DiffusionPipeline) and not issubclass(c, QuantizedPipelineMixin))
    data = json.loads(model_index.read_text())
    data["_class_name"] = base.__name__
    if labels:
        names: dict[int, list[str]] = {}
        for name, index in labels.items():
            names.setdefault(int(index), []).append(name)
        data["id2label"] = {str(i): ", ".join(n) for i, n in sorted(names.items())}
    model_index.write_text(json.dumps(data, indent=2, sort_keys=True))


def quantized_denoiser_attribute(folder: Path) -> str | None:
    for attr in DENOISER_ATTRIBUTES:
        if is_quantized_denoiser_folder(folder / attr):
            return attr
    return None


def _attach_loaded_info(pipe, denoiser_folder: Path) -> None:
    attr, denoiser, _ = find_denoiser(pipe)
    attach_info(pipe, loaded_info(denoiser, attr, denoiser_folder))


def loaded_info(module, attr: str, folder: Path) -> QuantizationInfo:
    """The :class:`QuantizationInfo` of a module loaded from the saved quantized folder ``folder``."""
    description = read_description(folder)
    report = WrapReport(quantized=list(description["layers"]), attention=list(description["attention"]))
    return QuantizationInfo(QuantConfig.from_dict(description["recipe"]), attr, adapter_for(module).name, report,
                            frozen=True)


def quantized_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's quantized modules besides its denoiser (a ControlNet quantized with it), by attribute."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        return {}
    attr = find_denoiser(pipe)[0]
    return {name: m for name, m in components.items() if name != attr and isinstance(m, nn.Module)
            and isinstance(getattr(m, "dmquant", None), QuantizationInfo)}


class QuantizedStableDiffusionPipeline(QuantizedPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose UNet is stored and run in low bit."""


class QuantizedDiTPipeline(QuantizedPipelineMixin, DiTPipeline):
    """``DiTPipeline`` whose transformer is stored and run in low bit."""


_CLASSES: dict[type, type] = {StableDiffusionPipeline: QuantizedStableDiffusionPipeline, DiTPipeline: QuantizedDiTPipeline}


def quantized_class(pipeline_cls: type) -> type:
    """The quantized twin class of a diffusers pipeline class (made on first use for other pipelines)."""
    if issubclass(pipeline_cls, QuantizedPipelineMixin):
        return pipeline_cls
    if pipeline_cls not in _CLASSES:
        _CLASSES[pipeline_cls] = type(f"Quantized{pipeline_cls.__name__}", (QuantizedPipelineMixin, pipeline_cls), {})
    return _CLASSES[pipeline_cls]


def load_quantized_pipeline(folder: str | Path, device: str = "cpu"):
    """Load any saved quantized pipeline folder, whatever its diffusers pipeline class."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise DMQuantError(f"{folder} is not a saved pipeline folder (no model_index.json)")
    config = DiffusionPipeline.load_config(str(folder))
    base = getattr(diffusers, config["_class_name"], None)
    if base is None:
        raise DMQuantError(f"diffusers has no pipeline class {config['_class_name']}: upgrade diffusers")
    return quantized_class(base).from_pretrained(folder, device=device)


def make_quantized(pipe) -> None:
    """Give a pipeline object its quantized twin class (same state; adds save_pretrained/from_pretrained)."""
    if isinstance(pipe, DiffusionPipeline):
        pipe.__class__ = quantized_class(type(pipe))
