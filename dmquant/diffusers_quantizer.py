"""dmquant as a diffusers quantization backend: ``quant_method: dmquant``.

* **Saved models.** A denoiser folder written by dmquant's ``save_pretrained`` carries
  ``quantization_config: {"quant_method": "dmquant", ...}`` in its ``config.json``, so
  ``DiffusionPipeline.from_pretrained(folder)`` and ``UNet2DConditionModel.from_pretrained(folder,
  subfolder="unet")`` (any denoiser class) load it through :class:`DMQuantizer`: the float layers of the
  empty (meta) model are swapped for empty frozen quantized layers built from the layer descriptions of
  ``dmquant_config.json``, every stored tensor is assigned as it was saved (its own dtype, a fresh copy),
  and the integer kernels are prepared after loading.
* **Quantizing while loading.** ``DMQuantConfig(recipe="w4a16")`` in ``from_pretrained(...,
  quantization_config=...)`` or ``PipelineQuantizationConfig(quant_mapping={"unet": ...})`` quantizes a
  float checkpoint after it is loaded, for recipes that need no calibration data (weight-only, dynamic
  activations); the others raise one line saying so.

This module imports only diffusers' quantizer base classes (it is imported while diffusers loads them,
see :mod:`dmquant.diffusers_hook`); the work is done in :mod:`dmquant.diffusers_native`. Importing it
registers the backend (idempotent).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from diffusers.quantizers import auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "dmquant"  # = dmquant.serialization.QUANT_METHOD (tests/test_diffusers_native.py checks it)


class DMQuantMethod(str, enum.Enum):
    """The ``quant_method`` of dmquant (diffusers reads ``quant_method.value``)."""

    DMQUANT = QUANT_METHOD


class DMQuantConfig(QuantizationConfigMixin):
    """dmquant's diffusers ``quantization_config``.

    ``DMQuantConfig(recipe)`` quantizes a float model while it loads (calibration-free recipes: a name, a
    YAML path, a dict or a :class:`dmquant.QuantConfig`). Read from a saved folder's ``config.json`` it
    names the format version, the recipe and the file with the layer descriptions.
    """

    FIELDS = ("recipe", "format_version", "dmquant_version", "description")

    def __init__(self, recipe: Any = None, format_version: int | None = None, dmquant_version: str | None = None,
                 description: str | None = None, **_ignored):
        self.quant_method = DMQuantMethod.DMQUANT
        if isinstance(recipe, Path):
            recipe = str(recipe)
        elif hasattr(recipe, "to_dict") and not isinstance(recipe, dict):  # a QuantConfig: kept as JSON
            recipe = recipe.to_dict()
        self.recipe, self.format_version = recipe, format_version
        self.dmquant_version, self.description = dmquant_version, description

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        # keys a newer dmquant may add are left out: its format version decides (validate_environment)
        config = cls(**{k: v for k, v in dict(config_dict).items() if k in cls.FIELDS})
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``repr`` shows (diffusers' mixin calls it but does not define it): the entries that are set."""
        return {k: v for k, v in self.to_dict().items() if v is not None}


class DMQuantizer(DiffusersQuantizer):
    """Loads saved dmquant denoisers (``pre_quantized``) or quantizes float ones after loading."""

    requires_calibration = False
    required_packages = None
    use_keep_in_fp32_modules = False  # every stored tensor is assigned as stored (or in torch_dtype)

    def __init__(self, quantization_config: DMQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.folder: Path | None = None  # the denoiser folder (from the checkpoint files' place)
        self.loaded_keys: list[str] = []
        self.description: dict | None = None
        self.recipe = None  # the QuantConfig of a load-time quantization

    def validate_environment(self, *args, **kwargs):
        from dmquant import diffusers_native

        diffusers_native.validate(self)

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        if self.pre_quantized:
            self.folder, self.loaded_keys = Path(checkpoint_files[0]).parent, list(loaded_keys)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            from dmquant import diffusers_native

            self.description = diffusers_native.install_empty_layers(model, self.folder, self.loaded_keys)
        return model

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict: dict, **kwargs) -> bool:
        # a saved dmquant denoiser: every tensor (codes, scales, float parts) is assigned as stored
        return self.pre_quantized

    def check_quantized_param_shape(self, *args, **kwargs) -> bool:
        return True  # checked with the dtype in create_quantized_param

    def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict: dict,
                               unexpected_keys=None, **kwargs) -> None:
        from dmquant import diffusers_native

        # the tensor as stored (param_value has already been cast to the empty model's dtype), or in torch_dtype
        diffusers_native.assign_stored(model, param_name, state_dict[param_name], target_device, self.folder,
                                       kwargs.get("dtype"))

    def _process_model_after_weight_loading(self, model, **kwargs):
        from dmquant import diffusers_native

        if self.pre_quantized:
            diffusers_native.finish_loading(model, self.folder, self.description)
            self.description, self.loaded_keys = None, []  # not needed any more (the model keeps its quantizer)
        else:
            diffusers_native.quantize_loaded(model, self.recipe)
        return model

    @property
    def supports_parallel_loading(self) -> bool:
        return False

    @property
    def is_serializable(self) -> bool:
        return False  # saved by dmquant: dmquant.load_quantized_pipeline(folder).save_pretrained(...)

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method: dmquant`` known to diffusers (idempotent)."""
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DMQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DMQuantConfig


register()
