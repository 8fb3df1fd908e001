"""The work behind dmquant's diffusers quantizer (:mod:`dmquant.diffusers_quantizer`): loading a saved
dmquant denoiser inside diffusers' ``from_pretrained``, and quantizing a float one after it loaded.

Loading a saved folder (format 4, :mod:`dmquant.serialization`), in diffusers' order:

1. ``validate``: the ``quantization_config`` entry's format version is one this dmquant reads;
2. ``install_empty_layers``: diffusers built the denoiser on the meta device; the layer descriptions of
   ``dmquant_config.json`` (next to the weights) put empty frozen layers, the quantized attention and
   the TimeTable in place, and the stored keys must be exactly the model's;
3. ``assign_stored``: each stored tensor is checked (shape, kind of dtype, finite) and assigned as stored
   (its own dtype, a fresh copy: a model must compute bit for bit what the saved one did);
4. ``finish_loading``: no tensor left on the meta device, kernels prepared, ``model.dmquant`` attached.

Only safetensors and JSON are read. Every problem a user can cause is one ``DMQuantError`` line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dmquant.api import freeze, quantize
from dmquant.config import QuantConfig, list_recipes, load_recipe
from dmquant.errors import DMQuantError
from dmquant.models.adapters import find_denoiser
from dmquant.nn.wrap import WrapReport, quant_layers
from dmquant.quantized_pipeline import (
    CORRECTION_NAME,
    QuantizationInfo,
    attach_info,
    quantized_denoiser_attribute,
)
from dmquant.runs import record_written
from dmquant.serialization import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_format_version,
    check_stored_tensor,
    install_description,
    is_quantized_denoiser_folder,
    read_description,
    write_diffusers_entries,
)


def validate(quantizer) -> None:
    """Before anything is loaded: a saved folder's format version, or a load-time recipe that needs no data."""
    config = quantizer.quantization_config
    if quantizer.pre_quantized:
        version = config.format_version
        if isinstance(version, bool) or not isinstance(version, int):
            raise DMQuantError(f"config.json's quantization_config has format version {version!r}, not an integer: "
                               "the folder is damaged; save the quantized model again")
        check_format_version(version, f"the model (saved by dmquant {config.dmquant_version})")
    elif quantizer.recipe is None:
        quantizer.recipe = load_time_recipe(config.recipe)


def load_time_recipe(recipe) -> QuantConfig:
    """The recipe of a load-time quantization; DMQuantError when it needs calibration data."""
    if recipe is None:
        raise DMQuantError("DMQuantConfig() needs a recipe to quantize with while loading, e.g. "
                           "DMQuantConfig(recipe='w4a16')")
    config = load_recipe(recipe)
    if config.needs_calibration_data:
        free = [name for name in list_recipes() if not load_recipe(name).needs_calibration_data]
        raise DMQuantError(f"recipe {config.name!r} needs calibration data (static activation ranges, smoothing, "
                           "reconstruction, noise correction or a mixed-precision plan) and cannot be applied while "
                           f"loading: use a calibration-free recipe ({', '.join(free)}), or quantize with "
                           f"dmquant.quantize(pipe, {config.name!r}, prompts=[...]), save_pretrained, and load that folder")
    return config


def install_empty_layers(model: nn.Module, folder: Path | None, loaded_keys: list[str]) -> dict:
    """Put the saved layers (empty, frozen, on the meta device) into the meta model; returns the description."""
    if folder is None:
        raise DMQuantError("diffusers gave dmquant's quantizer no checkpoint file: load the saved folder with "
                           "dmquant.load_quantized_pipeline(folder)")
    if not (folder / CONFIG_NAME).is_file():
        raise DMQuantError(f"{folder / CONFIG_NAME} is missing (it holds the quantized layers' descriptions): "
                           "download or copy the whole saved folder, or save the quantized model again")
    description = read_description(folder)
    name = description["class_name"]
    if name != type(model).__name__:
        raise DMQuantError(f"{folder} holds a quantized {name}, not a {type(model).__name__}: load it with "
                           f"{name}.from_pretrained, or with DiffusionPipeline.from_pretrained")
    try:
        install_description(model, description)
    except DMQuantError:
        raise
    except Exception as exc:  # an edited description: wrong names, kinds or numbers
        raise DMQuantError(f"{folder / CONFIG_NAME} does not describe a model that can be built ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}): the folder is damaged; save it again") from None
    expected, stored = set(model.state_dict()), set(loaded_keys)
    if expected != stored:
        missing, extra = sorted(expected - stored)[:3], sorted(stored - expected)[:3]
        raise DMQuantError(f"{folder / WEIGHTS_NAME} does not match {CONFIG_NAME} (missing {missing}, "
                           f"unexpected {extra}): the folder is damaged or mixed; save it again")
    return description


def assign_stored(model: nn.Module, key: str, tensor: torch.Tensor, device, folder: Path | None,
                  dtype: torch.dtype | None = None) -> None:
    """Assign the stored ``tensor`` to the parameter or buffer ``key`` of ``model``, as stored, on ``device``
    (``from_pretrained(torch_dtype=...)``: float tensors other than float8 codes in ``dtype``, as ``.to(dtype)``
    would give them)."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    path = Path(folder or ".") / WEIGHTS_NAME
    if old is None:
        raise DMQuantError(f"{path}: tensor {key} has no place in the model: the folder is damaged or mixed; save "
                           "it again")
    check_stored_tensor(path, key, tensor, old)
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn:
        dtype = tensor.dtype
    value = tensor.to(device=torch.device("cpu") if device is None else device, dtype=dtype, copy=True)  # fresh
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    else:
        module._buffers[leaf] = value


def finish_loading(model: nn.Module, folder: Path, description: dict) -> None:
    """After the tensors are in: nothing left empty, kernels prepared, ``model.dmquant`` attached."""
    empty = [k for k, v in model.state_dict().items() if v.is_meta]
    if empty:
        raise DMQuantError(f"{folder / WEIGHTS_NAME} lacks tensors the model needs ({empty[:3]}): the folder is "
                           "damaged or mixed; save it again")
    model.eval()
    for _, layer in quant_layers(model):
        layer.prepare_kernels()
    config = QuantConfig.from_dict(description["recipe"])
    report = WrapReport(quantized=list(description["layers"]), attention=list(description["attention"]))
    _, _, adapter = find_denoiser(model)
    attach_info(model, QuantizationInfo(config, "", adapter.name, report, frozen=True))
    if config.correction is not None and (folder.parent / CORRECTION_NAME).is_file():
        warnings.warn(f"{folder.parent} carries a noise correction ({CORRECTION_NAME}) that diffusers' "
                      "from_pretrained does not apply: load the pipeline with dmquant.load_quantized_pipeline(folder) "
                      "to use it", stacklevel=2)


def quantize_loaded(model: nn.Module, recipe: QuantConfig) -> None:
    """Quantize a just-loaded float denoiser with a calibration-free recipe, then freeze it."""
    quantize(model, recipe, progress=False)
    freeze(model)
    model.eval()


def make_diffusers_loadable(folder: str | Path) -> Path:
    """Add what diffusers' ``from_pretrained`` reads (``config.json``'s ``quantization_config`` and the shard
    index) to a format-4 folder saved before dmquant wrote them: a saved pipeline folder or its denoiser
    folder, changed in place (the weights and descriptions are not touched). Returns the denoiser folder."""
    folder = Path(folder)
    if not is_quantized_denoiser_folder(folder):
        attr = quantized_denoiser_attribute(folder)
        if attr is None:
            raise DMQuantError(f"{folder} holds no dmquant quantized denoiser: pass a folder written by "
                               "save_pretrained of a dmquant-quantized pipeline, or its unet / transformer folder")
        folder = folder / attr
    description = read_description(folder)
    if not (folder / "config.json").is_file():
        raise DMQuantError(f"{folder / 'config.json'} is missing: the quantized model folder is incomplete; save it "
                           "again")
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:  # the header only
            keys = sorted(f.keys())
    except Exception as exc:  # missing, truncated
        raise DMQuantError(f"{folder / WEIGHTS_NAME} cannot be read ({exc}): save the quantized model again") from None
    write_diffusers_entries(folder, str(description["recipe"].get("name", "custom")), keys)
    record_written(folder / INDEX_NAME)
    return folder
