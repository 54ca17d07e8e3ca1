"""The diffusers schedulers the step loop supports, by short name."""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler

# PNDM is left out: with skip_prk_steps it runs N+1 UNet calls and repeats a timestep, so
# "state after K steps" is not well defined for it.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
}


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A fresh scheduler of kind ``name`` built from a checkpoint's scheduler config.

    Schedulers keep per-run state (step index, solver history), so each request gets its own.
    """
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}") from None
    return cls.from_config(dict(config))


# Multistep solvers keep earlier model outputs. To resume exactly from step K, a checkpoint
# carries the last few of them ("history") next to the latents:
#   attribute holding the list, how many entries the solver reads.
_HISTORY = {
    "dpmpp": ("model_outputs", lambda s: s.config.solver_order - 1),
    "lms": ("derivatives", lambda s: 3),  # LMSDiscreteScheduler.step(order=4) reads 3 earlier ones
}


def history_length(name: str, scheduler) -> int:
    """How many earlier model outputs a checkpoint must carry for ``scheduler`` (0: stateless)."""
    spec = _HISTORY.get(name)
    return spec[1](scheduler) if spec else 0


def capture_history(name: str, scheduler, like):
    """The solver history after the current step, as a tensor [H, *latent_shape] (zeros where unset)."""
    import torch

    length = history_length(name, scheduler)
    out = torch.zeros((length, *like.shape[1:]), dtype=like.dtype, device=like.device)
    if not length:
        return out
    attr = _HISTORY[name][0]
    entries = [e for e in getattr(scheduler, attr) if e is not None][-length:]
    for i, entry in enumerate(entries):
        out[length - len(entries) + i] = entry.reshape(like.shape[1:])
    return out


def restore_history(name: str, scheduler, history, start_step: int) -> None:
    """Load a captured history into a fresh scheduler that resumes at ``start_step``."""
    length = history_length(name, scheduler)
    if not length or history is None or len(history) == 0:
        return
    attr = _HISTORY[name][0]
    valid = min(start_step, length)
    entries = [h.unsqueeze(0) for h in history[length - valid:]]
    if name == "dpmpp":
        slots = scheduler.config.solver_order
        scheduler.model_outputs = [None] * (slots - valid) + entries
        scheduler.lower_order_nums = min(start_step, slots)
    else:
        setattr(scheduler, attr, entries)
