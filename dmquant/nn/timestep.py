"""The current timestep reaches the time-conditioned quantizers: a forward pre-hook on the denoiser.

The hook reads the denoiser's ``timestep`` argument (where the adapter says it is) and writes it into a
:class:`~dmquant.quantizers.timestep.TimestepState` shared by every time-conditioned quantizer of the
denoiser. No diffusers code is touched; classifier-free guidance batches share one timestep.
"""

from __future__ import annotations

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.models.adapters import DenoiserAdapter, adapter_for
from dmquant.quantizers.timestep import TimestepState

_STATE_ATTR = "_dmquant_timestep_state"
_HANDLE_ATTR = "_dmquant_timestep_hook"


def time_tables(model: nn.Module) -> list[nn.Module]:
    """Modules that read the timestep state: time-conditioned quantizers and frozen layers with tables."""
    return [m for m in model.modules() if hasattr(m, "time_state") and getattr(m, "time_conditioned", False)]


def timestep_state(model: nn.Module) -> TimestepState | None:
    return getattr(model, _STATE_ATTR, None)


def install_timestep_hook(model: nn.Module, adapter: DenoiserAdapter | None = None) -> TimestepState:
    """Give ``model`` (once) a timestep state and the pre-hook that fills it; point its quantizers at it."""
    state = timestep_state(model)
    if state is None:
        adapter = adapter or adapter_for(model)
        state = TimestepState()

        def hook(module, args, kwargs):
            state.set_timestep(adapter.read_timestep(args, kwargs))

        object.__setattr__(model, _STATE_ATTR, state)
        object.__setattr__(model, _HANDLE_ATTR, model.register_forward_pre_hook(hook, with_kwargs=True))
    for module in time_tables(model):
        module.time_state = state
    return state


def sync_keys_from_tables(model: nn.Module) -> None:
    """After loading: the state's keys are the tables' timesteps (DMQuantError if tables disagree)."""
    state = timestep_state(model)
    tables = [getattr(m, "timesteps", None) for m in time_tables(model)]
    tables = [t for t in tables if t is not None and t.numel()]
    if state is None or not tables:
        return
    first = tables[0]
    if any(t.shape != first.shape or not torch.equal(t.cpu(), first.cpu()) for t in tables):
        raise DMQuantError("the timestep tables of this quantized model disagree with each other: the weights "
                           "file mixes models; save it again")
    state.set_keys(first)


def scheduler_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """The timesteps ``scheduler`` visits in a run of ``num_inference_steps`` (known before sampling)."""
    try:
        scheduler.set_timesteps(num_inference_steps)
    except Exception as exc:  # schedulers raise various types for unsupported step counts
        raise DMQuantError(f"{type(scheduler).__name__} cannot run {num_inference_steps} steps ({exc})") from exc
    return torch.as_tensor(scheduler.timesteps).double().reshape(-1)


def precompute_learned_tables(model: nn.Module, scheduler, num_inference_steps: int) -> int:
    """TDQ: evaluate every learned range MLP at the timesteps of ``scheduler``'s run, before generation.

    Afterwards the tables hold exactly the steps the run will visit, so inference only indexes them.
    Works on the simulation and on frozen or loaded models (they keep each layer's range MLP). Returns
    how many quantizers were updated; DMQuantError if the model has no learned (``time.mode: learned``)
    quantizer.
    """
    learned = [m for m in time_tables(model) if getattr(m, "learned", False)]
    if not learned:
        raise DMQuantError("this model has no learned (TDQ) time-conditioned quantizer: only time.mode='learned' "
                           "can compute ranges for new timesteps; others fall back to the nearest calibrated step")
    keys = scheduler_timesteps(type(scheduler).from_config(scheduler.config), num_inference_steps)
    for module in learned:
        module.retable(keys)
    install_timestep_hook(model).set_keys(keys)
    return len(learned)
