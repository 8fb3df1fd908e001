"""Save and load quantized denoisers (format 4): ``config.json`` (the diffusers config),
``dmquant_config.json`` (format version, recipe, the timestep keys of the denoiser's TimeTable, one
``spec()`` per quantized layer and per quantized attention module) and ``dmquant_weights.safetensors``
(the frozen state dict; float8 weight codes as F8_E4M3 tensors).

Saving freezes a copy of each simulated layer (the model itself is not changed). Loading builds the
denoiser on the meta device (no full-precision weights are materialised), puts empty frozen layers
where the description says, assigns the stored tensors in place, then prepares the integer kernels.

For diffusers' own ``from_pretrained`` (:mod:`dmquant.diffusers_quantizer`) the folder also carries, in
the same format version, ``config.json``'s ``quantization_config`` (``quant_method: dmquant``, the format
version, the recipe's name, the description's file name) and ``diffusion_pytorch_model.safetensors.index.json``
(diffusers' shard index, pointing every tensor at ``dmquant_weights.safetensors``). Older format-4
folders without them load through dmquant (``load_quantized_pipeline``); saving them again adds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from dmquant import __version__
from dmquant.config import QuantConfig
from dmquant.errors import DMQuantError
from dmquant.models.adapters import adapter_for
from dmquant.nn.attention import AttentionQuantizers
from dmquant.nn.layers import layer_from_spec
from dmquant.nn.wrap import quant_layers, quantized_attention, set_attention, time_table
from dmquant.quantizers.timetable import TimeTable

# version 4 (dmquant 0.2): one layer kind per op with its own spec (split parts, outlier branch and
# input quantizers inside it), the TimeTable's keys stored once, attention modules with their specs.
FORMAT, FORMAT_VERSION = "dmquant-denoiser", 4
CONFIG_NAME, WEIGHTS_NAME = "dmquant_config.json", "dmquant_weights.safetensors"
# what diffusers' from_pretrained reads: the quantizer named in config.json, and the shard index it opens
QUANT_METHOD, INDEX_NAME = "dmquant", "diffusion_pytorch_model.safetensors.index.json"


def is_quantized_denoiser_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def export_denoiser(denoiser: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(description of layers and attention, state dict)`` of a quantized denoiser, simulated or frozen;
    the denoiser is not modified."""
    layers, attention, state = {}, {}, {}
    prefixes = []
    for name, layer in quant_layers(denoiser):
        frozen = layer if layer.frozen else layer.frozen_copy()
        layers[name] = frozen.spec()
        prefixes.append(name + ".")
        state.update({f"{name}.{k}": v for k, v in frozen.state_dict().items()})
    for name, attn in quantized_attention(denoiser):  # loading wraps the module's own processor again
        quantizers = getattr(attn, "dmq_quant", None)
        attention[name] = {"processor": attn.processor.kernel,
                           "quantizers": None if quantizers is None else quantizers.spec()}
    state.update({k: v for k, v in denoiser.state_dict().items() if not k.startswith(tuple(prefixes))})
    return {"layers": layers, "attention": attention}, {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def check_no_adapters(denoiser: torch.nn.Module) -> None:
    """A model with LoRA adapters loaded has their layers in its state dict and would not load again: refuse."""
    names = sorted({a for m in denoiser.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")
                    for a in m.lora_A.keys()})
    if names:
        raise DMQuantError(f"the model has LoRA adapters loaded ({', '.join(names)}): call pipe.unload_lora_weights() "
                           "before saving (pipe.fuse_lora() first keeps them in the saved model)")


def save_quantized_denoiser(denoiser: torch.nn.Module, folder: str | Path, config: QuantConfig) -> None:
    check_no_adapters(denoiser)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts, state = export_denoiser(denoiser)
    table = time_table(denoiser)
    denoiser.save_config(folder)
    description = {"format": FORMAT, "version": FORMAT_VERSION, "dmquant_version": __version__,
                   "class_name": type(denoiser).__name__, "recipe": config.to_dict(),
                   "time_keys": None if table is None else table.keys.tolist(), **parts}
    # one metadata entry: safetensors writes its metadata map in no fixed order, and identical runs must
    # give identical bytes
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    (folder / CONFIG_NAME).write_text(json.dumps(description, indent=1))
    write_diffusers_entries(folder, config.name, sorted(state))


def quantization_config_entry(recipe_name: str) -> dict:
    """``config.json``'s ``quantization_config``: what diffusers needs to pick dmquant's quantizer."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "dmquant_version": __version__,
            "recipe": recipe_name, "description": CONFIG_NAME}


def write_diffusers_entries(folder: Path, recipe_name: str, keys: list[str]) -> None:
    """Make a saved denoiser folder loadable by diffusers' ``from_pretrained``: the ``quantization_config``
    entry of ``config.json`` and a one-shard index pointing at the weights file."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization_config_entry(recipe_name)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as diffusers' save_config writes it
    index = {"metadata": {"format": f"{FORMAT}/{FORMAT_VERSION}"}, "weight_map": {k: WEIGHTS_NAME for k in keys}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def read_description(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DMQuantError(f"{path} is missing: {folder} is not a dmquant quantized denoiser; save it again") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise DMQuantError(f"{path} is damaged ({exc}): save the quantized model again") from exc
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise DMQuantError(f"{path} is not a dmquant quantized-denoiser description")
    version = description.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DMQuantError(f"{path} is damaged: its format version {version!r} is not an integer; save the "
                           "quantized model again")
    for key, kind in (("class_name", str), ("layers", dict), ("attention", dict), ("recipe", dict)):
        if not isinstance(description.get(key), kind):
            raise DMQuantError(f"{path} is damaged: {key!r} is missing or not a {kind.__name__}; save the "
                               "quantized model again")
    check_format_version(version, str(folder))
    return description


def check_format_version(version: int, what: str) -> None:
    """DMQuantError unless ``what`` (a folder, or "the model") is in the format version this dmquant reads."""
    if version > FORMAT_VERSION:
        raise DMQuantError(f"{what} was written by a newer dmquant (format version {version}, this one reads "
                           f"version {FORMAT_VERSION}): upgrade dmquant")
    if version < FORMAT_VERSION:
        raise DMQuantError(f"{what} is in dmquant's format version {version}, which this dmquant (format "
                           f"{FORMAT_VERSION}) no longer reads: quantize and save the model again with this dmquant "
                           "(dmquant calibrate ...), or load it with dmquant 0.1")


def load_quantized_denoiser(folder: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A frozen quantized denoiser from ``folder``, built without materialising FP weights."""
    folder = Path(folder)
    description = read_description(folder)
    name = description["class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise DMQuantError(f"diffusers has no class {name}: upgrade diffusers (or the folder is damaged)")
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise DMQuantError(f"{folder / CONFIG_NAME} is damaged: class_name {name!r} is not a diffusers model class; "
                           "save the quantized model again")
    config = _read_json(folder / "config.json")
    if config.get("_class_name") not in (None, name):
        raise DMQuantError(f"{folder}: {CONFIG_NAME} names {name} but config.json names {config.get('_class_name')}: "
                           "the folder is damaged or mixed; save it again")
    weights = _load_weights(folder / WEIGHTS_NAME)  # header and tensors checked before building anything
    try:
        model = _build_empty(cls, folder, description)
    except DMQuantError:
        raise
    except Exception as exc:  # an edited description: wrong names, kinds or numbers
        raise DMQuantError(f"{folder / CONFIG_NAME} does not describe a model that can be built ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}): the folder is damaged; save it again") from None
    state = weights
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
        raise DMQuantError(f"{folder / WEIGHTS_NAME} does not match {CONFIG_NAME} (missing {missing}, "
                           f"unexpected {extra}): the folder is damaged or mixed; save it again")
    for key, want in expected.items():
        check_stored_tensor(folder / WEIGHTS_NAME, key, state[key], want)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shapes differ from the description (e.g. a table longer than time_keys)
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "shapes differ")
        raise DMQuantError(f"{folder / WEIGHTS_NAME} does not match {CONFIG_NAME} ({detail[:200]}): the stored "
                           "tensors and the description (layers, timestep tables) disagree; the folder is damaged "
                           "or mixed; save it again") from None
    model = model.eval().to(device)
    for _, layer in quant_layers(model):
        layer.prepare_kernels()
    return model


def check_stored_tensor(path: Path, key: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """DMQuantError unless the stored tensor ``got`` fits the empty model's ``want`` (shape, kind of dtype)
    and is finite."""
    float8 = torch.float8_e4m3fn in (got.dtype, want.dtype)  # codes: only their own dtype will do
    same_kind = got.dtype == want.dtype or (got.dtype.is_floating_point and want.dtype.is_floating_point
                                            and not float8)
    if got.shape != want.shape or not same_kind:
        raise DMQuantError(f"{path}: tensor {key} is {got.dtype} {tuple(got.shape)} but the "
                           f"description needs {want.dtype} {tuple(want.shape)}: the stored tensors and the "
                           "description (layers, timestep tables) disagree; the folder is damaged or mixed; "
                           "save it again")
    if got.dtype.is_floating_point and not bool(torch.isfinite(got.float() if float8 else got).all()):
        raise DMQuantError(f"{path}: tensor {key} holds NaN or Inf values: the saved model is "
                           "damaged; quantize and save it again")


def _build_empty(cls, folder: Path, description: dict) -> torch.nn.Module:
    """The denoiser on the meta device with empty frozen layers and attention where the description says."""
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(str(folder)))
    return install_description(model, description)


def install_description(model: torch.nn.Module, description: dict) -> torch.nn.Module:
    """Put empty frozen layers (on the meta device), the quantized attention and the TimeTable into ``model``
    (a float denoiser, usually built on the meta device) where ``description`` says; returns ``model``."""
    keys = description.get("time_keys")
    table = None if keys is None else TimeTable(keys).install(model, adapter_for(model).read_timestep)
    for name, spec in description["layers"].items():
        model.set_submodule(name, layer_from_spec(spec, table))
    for name, entry in description["attention"].items():
        spec = entry["quantizers"]
        quantizers = None if spec is None else AttentionQuantizers.from_spec(spec, table)
        set_attention(model.get_submodule(name), entry["processor"], quantizers)
    return model


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DMQuantError(f"{path} is missing: the quantized model folder is incomplete; save it again") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DMQuantError(f"{path} is damaged ({exc}): save the quantized model again") from None
    if not isinstance(data, dict):
        raise DMQuantError(f"{path} is damaged (not a JSON object): save the quantized model again")
    return data


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DMQuantError(f"{path} is missing: the quantized model folder is incomplete; save it again")
    try:
        # fresh (aligned) copies: tensors at the file's offsets can take other BLAS paths, and a loaded model
        # must compute bit for bit what the saved one did
        return {k: v.clone() for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors raises several types for truncated files
        raise DMQuantError(f"{path} is truncated or damaged ({exc}): save or download it again") from exc
