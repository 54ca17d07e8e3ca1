"""The resume guard: does an approximate hit keep what the *new* prompt asks for?

Prompt-embedding similarity cannot tell ", 4k" added from "black" turned "white": both pairs can
sit at 0.92. Resuming the second from the cached state at K draws the cached prompt's
background, because in a diffusion model the layout and the background are settled in the first
steps. The guard asks the model itself instead.

**Latent check** (the default, :class:`GuardPolicy`). When a request's step loop reaches a cache
step K, its next UNet call predicts the noise of x_K under its own prompt and under the empty
(negative) prompt anyway; the difference is the *guidance direction* D = eps(x_K, t_K, c) -
eps(x_K, t_K, uncond), the way the prompt pushes that state. It is kept with the state at
admission (no extra UNet call). A request resuming from x_K computes its own D_new in its first
UNet call (again no extra call) and the guard measures

    divergence = ||D_new - D_cached|| / ||D_cached||

how far the new prompt wants to move the state, relative to how far the cached prompt moved it.
Framing words and rewordings change it little (about 0.25 for the embedded model); a changed
attribute several times more. Above the calibrated bound for K the call's result is discarded
and the row restarts from the fallback (a smaller K of the same entry, or its own seed's noise):
one UNet evaluation lost, only on a downgrade.

**Token check** (:func:`novel_tokens`, measured by the quality harness and replayed offline by
``nirvana-simulate``): the tokens of the new prompt with no counterpart in the matched one
(aligned by :class:`difflib.SequenceMatcher`); K is capped by how many there are, with caps
learned from the harness.

Nothing here imports Triton: the step loop (``unet_loop``) runs the check, the latent cache
chooses the fallback and the bound, and the quality harness calibrates both.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

# Why a hit was downgraded (the reason label of nirvana_guard_fallbacks_total).
DIVERGENCE = "divergence"  # the new prompt moves the state further than the bound for K allows
UNGUIDED = "unguided"  # guidance_scale <= 1: no unconditional branch, so no direction to compare
FALLBACK_REASONS = (DIVERGENCE, UNGUIDED)
# What the GUARD output says about a request.
NOT_CHECKED, PASSED, DOWNGRADED = "", "passed", "downgraded"


def guidance_divergence(new_direction: torch.Tensor, cached_direction: torch.Tensor) -> float:
    """``||new - cached|| / ||cached||`` of two guidance directions of the same state and step."""
    new, cached = new_direction.float(), cached_direction.float()
    scale = float(torch.linalg.vector_norm(cached))
    if not math.isfinite(scale) or scale <= 0.0:
        return math.inf  # a degenerate stored direction proves nothing: never pass on it
    return float(torch.linalg.vector_norm(new - cached)) / scale


@dataclass
class ResumeCheck:
    """What a resumed row needs for the latent check (filled by the cache lookup).

    Attributes:
        direction: The cached guidance direction of the start state [C,H,W].
        bound: Largest divergence that keeps the hit.
        fallback_step: Where the row restarts when the check fails (0: from ``fallback_latents``
            as noise).
        fallback_latents: The state after ``fallback_step`` steps (noise when 0) [C,H,W].
    """

    direction: Optional[torch.Tensor]
    bound: float
    fallback_step: int
    fallback_latents: torch.Tensor


@dataclass
class GuardVerdict:
    """What the check decided for one row (kept in its :class:`nirvana.unet_loop.DenoiseResult`)."""

    outcome: str = NOT_CHECKED  # NOT_CHECKED, PASSED or DOWNGRADED
    reason: str = ""  # a FALLBACK_REASONS value when downgraded
    divergence: Optional[float] = None
    checked_step: int = 0  # the K the row looked up (its start step before any downgrade)


def format_verdict(verdict: GuardVerdict) -> str:
    """The GUARD output of a row: "" (no check), "passed", or "downgraded:<reason>"."""
    return f"{DOWNGRADED}:{verdict.reason}" if verdict.outcome == DOWNGRADED else verdict.outcome


def parse_verdict(text: str) -> Tuple[str, str]:
    """(outcome, reason) of a GUARD output (see :func:`format_verdict`)."""
    outcome, _, reason = text.partition(":")
    if outcome not in (NOT_CHECKED, PASSED, DOWNGRADED) or (outcome == DOWNGRADED) != bool(reason):
        raise ValueError(f"not a guard verdict: {text!r}")
    return outcome, reason


def judge(check: ResumeCheck, new_direction: Optional[torch.Tensor], checked_step: int) -> GuardVerdict:
    """The latent check of one row at its first UNet call."""
    if new_direction is None or check.direction is None:
        return GuardVerdict(DOWNGRADED, UNGUIDED, None, checked_step)
    divergence = guidance_divergence(new_direction, check.direction)
    if divergence <= check.bound:
        return GuardVerdict(PASSED, "", divergence, checked_step)
    return GuardVerdict(DOWNGRADED, DIVERGENCE, divergence, checked_step)


@dataclass(frozen=True)
class GuardPolicy:
    """The latent guard's calibrated bounds (stated at ``base_steps``, like the thresholds).

    Attributes:
        bounds: K -> largest divergence at which a hit resumed at K is kept. A K with no bound
            is never served from a checked state above ``unchecked_max_k``.
        fallback_max_k: A downgraded hit restarts from the largest step of the same entry at or
            below this (0: from its own seed's noise, a miss).
        unchecked_max_k: States without a stored direction (admitted by an unguided request, or
            restored from a cache written before the guard) serve at most this K, unchecked.
    """

    bounds: Mapping[int, float] = field(default_factory=dict)
    fallback_max_k: int = 0
    unchecked_max_k: int = 0

    def bound_for(self, step: int, base_steps: int, steps: int) -> Optional[float]:
        """The bound for resuming at ``step`` of a ``steps``-step request (None: not allowed)."""
        base = round(step * base_steps / steps)
        return self.bounds.get(base)

    def fallback_limit(self, base_steps: int, steps: int) -> int:
        return round(self.fallback_max_k * steps / base_steps)

    def unchecked_limit(self, base_steps: int, steps: int) -> int:
        return round(self.unchecked_max_k * steps / base_steps)

    def as_dict(self) -> Dict[str, object]:
        return {"bounds": {str(k): v for k, v in sorted(self.bounds.items())},
                "fallback_max_k": self.fallback_max_k, "unchecked_max_k": self.unchecked_max_k}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "GuardPolicy":
        bounds = {int(k): float(v) for k, v in dict(data.get("bounds") or {}).items()}
        return cls(bounds, int(data.get("fallback_max_k", 0)), int(data.get("unchecked_max_k", 0)))


# -- the token check (variant a: offline, in the harness and nirvana-simulate) ----------------------

def novel_tokens(new_ids: Sequence[int], matched_ids: Sequence[int], special: Sequence[int] = ()) -> Tuple[int, ...]:
    """Tokens of the new prompt with no counterpart in the matched one.

    The two id sequences are aligned (:class:`difflib.SequenceMatcher`); a token inside an
    inserted or replaced span counts unless the same token occurs anywhere in the matched prompt
    (a moved word is no new content). ``special``: ids to ignore (padding, [CLS], [SEP]).
    """
    skip = set(special)
    new = [t for t in new_ids if t not in skip]
    old = [t for t in matched_ids if t not in skip]
    present = set(old)
    out = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            out.extend(t for t in new[j1:j2] if t not in present)
    return tuple(out)


@dataclass(frozen=True)
class TokenCaps:
    """Variant a's calibration: the largest K allowed for a given count of novel tokens."""

    caps: Mapping[int, int] = field(default_factory=dict)  # novel-token count -> largest K (0: miss)
    max_counted: int = 3  # counts above this use its cap

    def cap(self, novel_count: int) -> Optional[int]:
        return self.caps.get(min(int(novel_count), self.max_counted))


# -- calibration: which thresholds and bounds a model and an operator's target give ----------------

# For a checkpoint without a calibration (an SD folder exported with nirvana-export --checkpoint):
# the paper's thresholds, every K checked against one bound, and a downgrade restarts from noise.
# 0.35: on the embedded model, framing and rewording pairs stay below it at every K (median 0.25),
# while one-attribute edits sit above it (median 2 to 6 where the remaining steps redraw the
# attribute, 0.5 to 1.0 where they fail to); the divergence is relative to the cached prompt's own
# guidance, so it does not depend on the scale of a model's noise predictions.
CONSERVATIVE_BOUND = 0.35
CONSERVATIVE = GuardPolicy(bounds={k: CONSERVATIVE_BOUND for k in (5, 10, 15, 20, 25, 30, 35, 40)},
                           fallback_max_k=0, unchecked_max_k=0)


@dataclass(frozen=True)
class Calibration:
    """The thresholds and guard bounds calibrated for one false-hit target."""

    target: float
    thresholds: Tuple[Tuple[float, int], ...]
    policy: GuardPolicy


def calibration_for(spec, config) -> Optional[Calibration]:
    """The calibration of ``spec`` (a PipelineSpec) for ``config.false_hit_target`` (a CacheConfig).

    A model calibrated for several targets serves the loosest one that is not looser than the
    operator's (a stricter one always meets it); None when the model has none that strict.
    """
    targets = dict((spec.guard or {}).get("targets") or {})
    usable = sorted((float(t) for t in targets if float(t) <= config.false_hit_target + 1e-12), reverse=True)
    if not usable:
        return None
    chosen = next(data for t, data in targets.items() if abs(float(t) - usable[0]) < 1e-12)
    thresholds = tuple(sorted(((float(s), int(k)) for s, k in chosen["thresholds"]), reverse=True))
    return Calibration(usable[0], thresholds, GuardPolicy.from_dict(chosen["guard"]))


def policy_for(spec, config) -> Optional[GuardPolicy]:
    """The guard a latent_cache serves with: None when ``config.guard`` is "off"; the model's
    calibration for the operator's target; else :data:`CONSERVATIVE`."""
    if config.guard == "off":
        return None
    calibrated = calibration_for(spec, config)
    return calibrated.policy if calibrated is not None else CONSERVATIVE
