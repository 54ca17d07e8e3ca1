"""The diffusers schedulers the step loop supports, by short name."""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       LMSDiscreteScheduler, PNDMScheduler)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
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
