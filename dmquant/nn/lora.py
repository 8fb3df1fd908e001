"""LoRA on a dmquant-quantized denoiser, without re-quantization: PEFT LoRA layers for
:class:`~dmquant.nn.layers.QuantLinear` and :class:`~dmquant.nn.layers.QuantConv2d`, so that diffusers'
``load_lora_weights``, ``set_adapters``, the LoRA scale, ``fuse_lora`` / ``unfuse_lora`` and
``unload_lora_weights`` work on a quantized UNet or transformer, simulated or frozen, quantized in this
process or loaded from a saved folder.

**The LoRA is a side branch.** :class:`LoraQuantLinear` / :class:`LoraQuantConv2d` wrap the quantized layer
(PEFT's ``base_layer``) and add ``scale · B(A(x))`` on the layer's input ``x``, in the adapter's float dtype
(the layer's: 16-bit in a 16-bit pipeline). Loading, scaling, ``set_adapters``, disabling and unloading
change only the adapter modules: the quantized codes and scales are never read nor written.

**Fusing joins the layer's low-rank branch.** ``merge`` (diffusers' ``fuse_lora``) does not touch the codes
either: it appends the scaled LoRA to the layer's 16-bit low-rank branch (:class:`~dmquant.nn.outlier.OutlierBranch`,
SVDQuant's ``L1·L2``; a layer without a branch gets one). The branch reads the transformed input
``x' = (x / s)·H``, and with ``H`` orthonormal ``x = (x'·Hᵀ)·diag(s)``, so ``x·Aᵀ = x'·(A·diag(s)·H)ᵀ``:
the down factor the branch stores is ``A' = (A·diag(s))·H``, the same fold the layer's weight got
(:meth:`OutlierBranch.fold`; a conv's ``A`` is folded per input channel, for every kernel tap). The new
ranks are concatenated after the branch's own, ``L1 <- [L1 | scale·B]``, ``L2 <- [L2 ; A']``, so where the
layer already had an SVD branch the LoRA costs no extra matmul (one wider down and up product). ``unmerge``
keeps the first ranks again (their stored values untouched): the branch, and the outputs, come back bit for
bit. A frozen layer's prepared kernels are rebuilt whenever its branch changes.

**How PEFT finds these layers.** PEFT's extension point for layer types it does not know is the experimental
``LoraConfig._register_custom_module({QuantLinear: LoraQuantLinear, ...})``, a mapping held by each
``LoraConfig``. diffusers builds its ``LoraConfig`` inside ``load_lora_adapter`` (from the state dict or the
file's metadata) and injects it at once, so there is no moment at which a user could register the mapping
on it. :func:`register` therefore extends ``LoraConfig.__post_init__`` (where PEFT itself sets the mapping to
``None``) to make that documented call on every ``LoraConfig`` made from then on: diffusers' own,
``LoraConfig(...)`` given to ``add_adapter`` or ``inject_adapter_in_model``, ``LoraConfig.from_pretrained``.
The keys are dmquant's classes, so models without dmquant layers see no change. The alternatives were
worse: wrapping diffusers' private ``_create_lora_config`` or PEFT's ``LoraModel._create_new_module``
depends on private names that move between releases, and registering per call would need a hook in every
diffusers loader mixin. :mod:`dmquant.diffusers_hook` calls :func:`register` once ``peft`` is imported
(``import dmquant`` itself stays free of torch and PEFT); a ``LoraConfig`` made before dmquant was imported
gets the mapping with :func:`register_layers`. PEFT puts new adapters on the device of the layer's
``qweight`` (its name for a quantized layer's stored weight: :attr:`QuantLayer.qweight`); the adapters take
the layer's float dtype (:meth:`QuantLoraLayer._get_base_layer_device_and_dtype`), and the wrapper's
``weight`` is the layer's own (None when frozen), as without the LoRA.

FLUX's pipeline loader (``FluxLoraLoaderMixin._maybe_expand_lora_state_dict``, for Control LoRAs that widen
the input embedding) reads every targeted module's float ``weight`` from the state dict, which a frozen
quantized layer does not have. :func:`register_flux` (called by :mod:`dmquant.diffusers_hook` once
``diffusers.loaders.lora_pipeline`` is loaded) makes it pass over dmquant's layers (a quantized layer is
never widened: its input size is fixed by its codes) and handle the float layers as before. This is the one
private diffusers name dmquant wraps; if a diffusers release drops it, nothing is wrapped.

Limits: plain LoRA only (DoRA and PEFT's other variants, and initialisations that read the base weight,
raise one :class:`~dmquant.errors.DMQuantError` line); a LoRA with a bias (``lora_bias``), or one on a grouped,
dilated or non-zero-padded conv, runs unfused but cannot be fused. The activation ranges (static recipes)
and smoothing factors were calibrated without the LoRA: a LoRA that moves the activations far from the
calibration data is clipped by them (README, "LoRA on a quantized model").
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from dmquant.nn.outlier import OutlierBranch

INITS = (True, False, "gaussian")  # LoRA initialisations that do not read the base weight
BRANCH_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}  # anything else: a float32 branch


class QuantLoraLayer(nn.Module, LoraLayer):
    """What the LoRA layers of both quantized kinds share (PEFT's ``LoraLayer`` conventions)."""

    def _init_lora(self, base_layer: QuantLayer, adapter_name: str, config: LoraConfig, r: int, lora_alpha: int,
                   **kwargs) -> None:
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fused_from: dict[str, tuple[int, bool]] = {}  # merged adapter -> (branch rank before, branch made)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- PEFT's description of the base layer --------------------------------------------------------------
    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA only

    def _get_in_out_features(self, module: QuantLayer) -> tuple[int, int]:
        return in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer: QuantLayer):
        """Where the adapters go: the device of the stored weight (codes or float weight), in the layer's float
        dtype: its weight's (simulated), else that of its bias, smoothing factors or input ranges, which ``.to()``
        casts with the model (None: a frozen layer with none of them keeps the adapter's own dtype)."""
        smooth = None if base_layer.outlier is None else base_layer.outlier.smooth
        ranges = [b for q in base_layer.input_quantizers for b in q.buffers() if b.is_floating_point() and b.numel()]
        floats = [t for t in (base_layer.weight, base_layer.bias, smooth, *ranges) if t is not None]
        return base_layer.qweight.device, floats[0].dtype if floats else None

    @property
    def weight(self) -> torch.Tensor | None:
        """The wrapped layer's ``weight``, as without the LoRA (None when frozen)."""
        return self.get_base_layer().weight

    # -- adapters ----------------------------------------------------------------------------------------------
    def make_factors(self, r: int, bias: bool) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        check_config(config, r)
        try:
            self.resolve_lora_variant(config=config)
        except ValueError:
            raise DMQuantError("this LoRA uses a PEFT variant (DoRA, aLoRA, ...) that dmquant's quantized layers do not "
                               "support: use a plain LoRA") from None
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name], self.lora_B[adapter_name] = self.make_factors(r, config.lora_bias)
        self.lora_bias[adapter_name], self.use_rslora[adapter_name] = config.lora_bias, config.use_rslora
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- computation ---------------------------------------------------------------------------------------------
    def lora_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``scale · B(A(dropout(x)))`` of one adapter, in the adapter's dtype."""
        lora_a = self.lora_A[adapter]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        return self.lora_B[adapter](lora_a(self.lora_dropout[adapter](x))) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters and self.merged:
            self.unmerge()
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter in self.lora_A and self.scaling[adapter] != 0:  # scale 0: exactly the layer without LoRA
                result = result + self.lora_output(adapter, x)
        return result.to(dtype)

    # -- fusing into the low-rank branch ---------------------------------------------------------------------
    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale · B [out, r], A [r, C] or [r, C, kh, kw])``: the adapter's ``ΔW = up · down`` on the layer's
        original input, in float64."""
        up = self.lora_B[adapter].weight.detach().double().reshape(self.out_features, -1)
        return up * self.scaling[adapter], self.lora_A[adapter].weight.detach().double()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of one adapter in the layer's weight shape (float64): what it adds to the float weight."""
        up, down = self.lora_factors(adapter)
        if down.ndim == 2:
            return up @ down
        if up.shape[1] != down.shape[0]:
            raise DMQuantError("a LoRA on a grouped conv has no single delta weight: keep it unfused")
        return (up @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Join the active (or named) adapters, scaled, into the layer's low-rank branch; the codes stay as they are."""
        layer = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            check_fusable(layer, self.lora_bias[adapter])
            up, down = self.lora_factors(adapter)
            if safe_merge and not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise DMQuantError(f"LoRA adapter {adapter!r} has non-finite weights: it cannot be fused")
            self.fused_from[adapter] = (0 if layer.outlier is None else layer.outlier.rank, layer.outlier is None)
            join_branch(layer, up, down, self.lora_A[adapter].weight.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Give the branch back as it was before the merges, last merged first (bit for bit)."""
        layer = self.get_base_layer()
        while self.merged_adapters:
            rank, made = self.fused_from.pop(self.merged_adapters.pop())
            if made:
                layer.outlier = None
            else:
                layer.outlier.keep_low_rank(rank)
            branch_changed(layer)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraQuantLinear(QuantLoraLayer):
    """A LoRA beside a :class:`QuantLinear` (``lora_A``, ``lora_B``: ``nn.Linear``, as PEFT's ``lora.Linear``)."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        self._init_lora(base_layer, adapter_name, config, r, lora_alpha, **kwargs)

    def make_factors(self, r: int, bias: bool) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=bias)


class LoraQuantConv2d(QuantLoraLayer):
    """A LoRA beside a :class:`QuantConv2d`: ``lora_A`` a conv with the layer's kernel, stride and padding,
    ``lora_B`` a 1x1 conv (as PEFT's ``lora.Conv2d``)."""

    def __init__(self, base_layer: QuantConv2d, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        groups = base_layer.geometry["groups"]
        if r % groups:
            raise DMQuantError(f"a LoRA of rank {r} does not fit a conv with groups={groups}: use a rank divisible by "
                               "the groups, or leave the layer out of target_modules")
        self._init_lora(base_layer, adapter_name, config, r, lora_alpha, **kwargs)

    def make_factors(self, r: int, bias: bool) -> tuple[nn.Module, nn.Module]:
        g = self.get_base_layer().geometry
        down = nn.Conv2d(self.in_features, r, tuple(g["kernel_size"]), tuple(g["stride"]), tuple(g["padding"]),
                         bias=False)
        return down, nn.Conv2d(r, self.out_features, 1, 1, groups=g["groups"], bias=bias)


CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {QuantLinear: LoraQuantLinear, QuantConv2d: LoraQuantConv2d}


def in_out_features(layer: QuantLayer) -> tuple[int, int]:
    """``(input channels, output channels)`` of a quantized linear layer or conv."""
    g = layer.geometry
    return (g["in_features"], g["out_features"]) if layer.kind == "linear" else (g["in_channels"], g["out_channels"])


def check_config(config: LoraConfig, r: int) -> None:
    if r <= 0:
        raise DMQuantError(f"a LoRA rank must be positive, got {r}")
    if config.init_lora_weights not in INITS:
        raise DMQuantError(f"init_lora_weights={config.init_lora_weights!r} reads the float weight, which a "
                           "quantized layer does not keep: use True, False or 'gaussian'")


def check_fusable(layer: QuantLayer, lora_bias: bool) -> None:
    """DMQuantError if a LoRA cannot join this layer's low-rank branch."""
    if lora_bias:
        raise DMQuantError("a LoRA with a bias (lora_bias) cannot be fused into a quantized layer's branch: keep it "
                           "unfused (skip fuse_lora)")
    if not layer.can_take_branch or any(d != 1 for d in layer.geometry.get("dilation", (1, 1))):
        raise DMQuantError("a LoRA on a grouped, dilated or non-zero-padded quantized conv cannot be fused: keep it "
                           "unfused (skip fuse_lora)")


def join_branch(layer: QuantLayer, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> None:
    """Append ``up · down`` (a ΔW on the layer's original input, float64) to the layer's low-rank branch: the
    down factor is folded into the branch's input transform; a layer without a branch gets one (in
    ``dtype``'s 16-bit format, else float32)."""
    device = layer.qweight.device
    if layer.outlier is None:
        layer.outlier = OutlierBranch(*in_out_features(layer), layer.branch_geometry(),
                                      dtype=BRANCH_DTYPES.get(dtype, "float32"), device=device)
    branch = layer.outlier
    down = branch.fold(down.to(device))
    branch.append_low_rank(up.to(device), down)
    branch_changed(layer)


def branch_changed(layer: QuantLayer) -> None:
    """A frozen layer's prepared kernels are built again after its branch changed."""
    if layer.frozen:
        layer.prepare_kernels()


def register_layers(config: LoraConfig) -> LoraConfig:
    """Map dmquant's quantized layers to their LoRA layers in ``config`` (PEFT's custom-module registration)."""
    config._register_custom_module(CUSTOM_MODULES)
    return config


def register() -> None:
    """Every ``LoraConfig`` made from now on knows dmquant's layers (idempotent; see the module docstring)."""
    if not getattr(LoraConfig.__post_init__, "dmquant", False):
        LoraConfig.__post_init__ = _registering(LoraConfig.__post_init__)


def _registering(post_init):
    @functools.wraps(post_init)
    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        register_layers(self)

    __post_init__.dmquant = True
    return __post_init__


FLUX_LOADERS = "diffusers.loaders.lora_pipeline"


def register_flux() -> None:
    """FLUX's LoRA loader widens float layers only (idempotent; :mod:`dmquant.diffusers_hook` calls it once
    ``diffusers.loaders.lora_pipeline`` has run)."""
    mixin = getattr(sys.modules.get(FLUX_LOADERS), "FluxLoraLoaderMixin", None)
    expand = None if mixin is None else mixin.__dict__.get("_maybe_expand_lora_state_dict")
    if not isinstance(expand, classmethod) or getattr(expand.__func__, "dmquant", False):
        return
    mixin._maybe_expand_lora_state_dict = classmethod(_passing_over_quantized(expand.__func__))


def _passing_over_quantized(expand):
    """``expand`` (FLUX's ``_maybe_expand_lora_state_dict``) on the LoRA entries of float layers only; the
    entries of quantized layers are kept as they are."""

    @functools.wraps(expand)
    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        prefix = f"{cls.transformer_name}."
        quantized = {prefix + name.removesuffix(".base_layer") for name, module in transformer.named_modules()
                     if isinstance(module, QuantLayer)}
        floats = {k: v for k, v in lora_state_dict.items() if k.rpartition(".lora_")[0] not in quantized}
        expanded = expand(cls, transformer, floats)
        return {k: expanded.get(k, v) for k, v in lora_state_dict.items()} | expanded

    _maybe_expand_lora_state_dict.dmquant = True
    return _maybe_expand_lora_state_dict


register()  # importing this module registers (dmquant.diffusers_hook imports it once PEFT is loaded)
register_flux()
