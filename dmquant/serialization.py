"""Save and load quantized denoisers: ``config.json`` (the diffusers config), ``dmquant_config.json``
(format version, recipe, one description per quantized layer) and ``dmquant_weights.safetensors``.

Loading builds the denoiser on the meta device (no full-precision weights are materialised), puts
frozen low-bit layers where the description says, and assigns the stored tensors in place, so peak
memory stays near the file size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dmquant import __version__
from dmquant.config import QuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn.int_layers import ActSpec, IntConv2d, IntLinear, IntOutlierLayer, IntSplitLayer, freeze_layer
from dmquant.nn.layers import _QuantLayer
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import _set_submodule, attention_modules, quantize_attention
from dmquant.quantizers.packed import QuantizedWeight

# version 2: layer entries of type "split" (two parts of a skip concatenation) and activation
# timestep tables ("act": {..., "table": K}); version 3: entries of type "outlier" (smoothing,
# rotation, low-rank branch around an inner entry), per-group dynamic activations and learned
# (TDQ) tables that keep their range MLP ("act": {..., "learned": {...}}). Older folders load unchanged.
FORMAT, FORMAT_VERSION = "dmquant-denoiser", 3
CONFIG_NAME, WEIGHTS_NAME = "dmquant_config.json", "dmquant_weights.safetensors"


def is_quantized_denoiser_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def _layer_entry(layer) -> dict:
    frozen = freeze_layer(layer) if isinstance(layer, _QuantLayer) else layer
    if isinstance(frozen, IntOutlierLayer):
        inner = _layer_entry(frozen.inner)[0]
        return {"type": "outlier", "branch": frozen.branch.spec(), "channel_dim": frozen.channel_dim,
                "inner": inner}, frozen
    if isinstance(frozen, IntSplitLayer):
        parts = [_layer_entry(p)[0] for p in frozen.parts]
        return {"type": "split", "split": frozen.split, "channel_dim": frozen.channel_dim, "parts": parts}, frozen
    entry = {"type": "conv2d" if isinstance(frozen, IntConv2d) else "linear",
             "weight": frozen.qweight.spec(), "bias": frozen.bias is not None,
             "act": None if frozen.act is None else frozen.act.spec()}
    if isinstance(frozen, IntConv2d):
        entry["geometry"] = frozen.geometry()
    return entry, frozen


def export_denoiser(denoiser: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(layers description, state dict)`` of a quantized denoiser, simulated or frozen; not modified."""
    layers, state = {}, {}
    skip_prefixes = []
    for name, module in denoiser.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue  # the parts of a frozen split layer
        if isinstance(module, (_QuantLayer, IntLinear, IntConv2d, IntSplitLayer, IntOutlierLayer)):
            entry, frozen = _layer_entry(module)
            layers[name] = entry
            skip_prefixes.append(name + ".")
            state.update({f"{name}.{k}": v for k, v in frozen.state_dict().items()})
    for key, value in denoiser.state_dict().items():
        if not any(key.startswith(p) for p in skip_prefixes):
            state[key] = value
    return layers, {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_quantized_denoiser(denoiser: torch.nn.Module, folder: str | Path, config: QuantConfig) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, state = export_denoiser(denoiser)
    attention = [n for n, m in attention_modules(denoiser)] if config.attention is not None else []
    denoiser.save_config(folder)
    description = {"format": FORMAT, "version": FORMAT_VERSION, "dmquant_version": __version__,
                   "class_name": type(denoiser).__name__, "recipe": config.to_dict(),
                   "attention_modules": attention, "layers": layers}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    (folder / CONFIG_NAME).write_text(json.dumps(description, indent=1))


def read_description(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DMQuantError(f"{path} is missing: {folder} is not a dmquant quantized denoiser; save it again") from exc
    except json.JSONDecodeError as exc:
        raise DMQuantError(f"{path} is damaged ({exc}): save the quantized model again") from exc
    if description.get("format") != FORMAT:
        raise DMQuantError(f"{path} is not a dmquant quantized-denoiser description")
    if int(description.get("version", 0)) > FORMAT_VERSION:
        raise DMQuantError(f"{folder} was written by a newer dmquant (format version {description['version']}, "
                           f"this one reads up to {FORMAT_VERSION}): upgrade dmquant")
    return description


def load_quantized_denoiser(folder: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A frozen quantized denoiser from ``folder``, built without materialising FP weights."""
    import diffusers
    from accelerate import init_empty_weights

    folder = Path(folder)
    description = read_description(folder)
    cls = getattr(diffusers, description["class_name"], None)
    if cls is None:
        raise DMQuantError(f"diffusers has no class {description['class_name']}: upgrade diffusers")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(str(folder)))
    for name, entry in description["layers"].items():
        _set_submodule(model, name, _empty_layer(entry))
    recipe = QuantConfig.from_dict(description["recipe"])
    for name in description.get("attention_modules", []):
        quantize_attention(model.get_submodule(name), recipe.attention, recipe.time)
    state = _load_weights(folder / WEIGHTS_NAME)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise DMQuantError(f"{folder / WEIGHTS_NAME} does not match {CONFIG_NAME} (missing {missing}, "
                           f"unexpected {extra}): the folder is damaged or mixed; save it again")
    model.load_state_dict(state, strict=True, assign=True)
    for attn_name in description.get("attention_modules", []):
        quantizers = getattr(model.get_submodule(attn_name), "dmq_quant", None)
        for q in quantizers.quantizers() if quantizers is not None else []:
            q.set_mode("quant")
    _connect_time_tables(model)
    return model.eval().to(device)


def _connect_time_tables(model: torch.nn.Module) -> None:
    """Give a loaded model with timestep tables its timestep hook; the tables must agree on the steps."""
    from dmquant.nn.timestep import install_timestep_hook, sync_keys_from_tables, time_tables

    if time_tables(model):
        install_timestep_hook(model)
        sync_keys_from_tables(model)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DMQuantError(f"{path} is missing: the quantized model folder is incomplete; save it again")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated files
        raise DMQuantError(f"{path} is truncated or damaged ({exc}): save or download it again") from exc


def _empty_layer(entry: dict):
    if entry["type"] == "outlier":
        branch = OutlierBranch.from_spec(entry["branch"], device="meta")
        return IntOutlierLayer(_empty_layer(entry["inner"]), branch, entry["channel_dim"])
    if entry["type"] == "split":
        parts = tuple(_empty_layer(p) for p in entry["parts"])
        return IntSplitLayer(parts, entry["split"], entry["channel_dim"])
    qweight = QuantizedWeight.from_spec(entry["weight"], device="meta")
    out = qweight.shape[0]
    bias = torch.empty(out, device="meta") if entry["bias"] else None
    act = None if entry["act"] is None else ActSpec(**entry["act"])
    if entry["type"] == "conv2d":
        g = entry["geometry"]
        return IntConv2d(qweight, bias, act, g["stride"], g["padding"], g["dilation"], g["groups"], device="meta")
    if entry["type"] == "linear":
        return IntLinear(qweight, bias, act, device="meta")
    raise DMQuantError(f"unknown layer type {entry['type']!r} in the quantized model: upgrade dmquant")

