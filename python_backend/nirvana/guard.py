"""The resume guard: does an approximate hit keep what the *new* prompt asks for?

Prompt-embedding similarity cannot tell ", 4k" added from "black" turned "white": both pairs can
sit at 0.92. Resuming the second from the cached state at K draws the cached prompt's
background, because in a diffusion model the layout and the background are settled in the first
steps. The guard asks the model itself instead.

**Latent check** (the default, :class:`GuardPolicy`). The *guidance direction* of a state x_k
under a prompt c is D = eps(x_k, t_k, c) - eps(x_k, t_k, uncond): the way the prompt pushes that
state. A generation computes it at every cache step anyway (its next UNet call), so admission
keeps it with the state, and the unconditional prediction with it. A request that would resume
from x_K of a cached entry first **probes** the entry's early state x_p (p = ``probe_k``, 5 of 50):
one conditional UNet row under the new prompt gives D_new (the stored unconditional prediction
completes it: no unconditional row), and

    divergence = ||D_new - D_cached|| / ||D_cached||

is how far the new prompt wants to move the state, relative to how far the cached prompt moved
it. Framing words and rewordings change it little (median 0.2-0.3 for the embedded model); a
changed attribute several times more (median 0.5-2.7). Within the calibrated bound for K the row
jumps to x_K and goes on from there; beyond it the hit is *downgraded*: the row continues from
x_p with the prediction it just made (``fallback`` "probe") or restarts from its own noise (a miss).

Why probe early instead of checking at K itself (which would cost no UNet call at all): by the
resume step an early-settled attribute is committed, and the model's prediction under the new
prompt barely differs from the cached one's. Measured on the embedded model, position edits
have a median divergence of 0.48 at K=35 (rewordings: 0.43) but 1.45 at K=5 (rewordings 0.26);
checking at K let 81% of position edits through with the old position.

Cost: half a UNet evaluation per checked hit (one conditional row of the batch; the stored
unconditional prediction stands in for the other when the negative prompts match, else it is
computed: one evaluation), whether it passes or not.

**Token check** (:func:`novel_tokens`, measured by the quality harness and replayed offline by
``nirvana-simulate``): the tokens of the new prompt with no counterpart in the matched one
(aligned by :class:`difflib.SequenceMatcher`); K is capped by how many there are, with caps
learned from the harness.

Nothing here imports Triton: the step loop (``unet_loop``) runs the check, the latent cache
chooses the probe, the bound and the fallback, and the quality harness calibrates them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

# Why a hit was downgraded (the reason label of nirvana_guard_fallbacks_total).
DIVERGENCE = "divergence"  # the new prompt moves the probed state further than the bound for K allows
UNGUIDED = "unguided"  # guidance_scale <= 1: no unconditional branch, so no direction to compare
FALLBACK_REASONS = (DIVERGENCE, UNGUIDED)
# What the GUARD output says about a request.
NOT_CHECKED, PASSED, DOWNGRADED = "", "passed", "downgraded"
# Where a downgraded hit goes on from (GuardPolicy.fallback).
FALLBACK_PROBE, FALLBACK_NOISE = "probe", "noise"
# The tensors a lookup hands unet_loop for the check (latent_cache outputs = unet_loop inputs, all or
# none): the latent-shaped ones per row, and those that are one number per row with their dtype.
# PROBE_UNCOND all zeros means "not cached: compute it"; GUARD_BOUND < 0 means "no check".
CHECK_FIELDS = ("PROBE_LATENTS", "PROBE_STEP", "PROBE_DIRECTION", "PROBE_UNCOND", "GUARD_BOUND",
                "FALLBACK_LATENTS", "FALLBACK_STEP")
CHECK_NUMBERS = {"PROBE_STEP": "int32", "FALLBACK_STEP": "int32", "GUARD_BOUND": "float32"}


def guidance_divergence(new_direction: torch.Tensor, cached_direction: torch.Tensor) -> float:
    """``||new - cached|| / ||cached||`` of two guidance directions of the same state and step."""
    new, cached = new_direction.float(), cached_direction.float()
    scale = float(torch.linalg.vector_norm(cached))
    if not math.isfinite(scale) or scale <= 0.0:
        return math.inf  # a degenerate stored direction proves nothing: never pass on it
    return float(torch.linalg.vector_norm(new - cached)) / scale


@dataclass
class ResumeCheck:
    """What a row resuming from another prompt's state needs for the latent check (filled by the
    cache lookup). The row's own start step and latents are the state it jumps to on a pass.

    Attributes:
        probe_step: The early step p whose state is probed (0 < p < the row's start step).
        probe_latents: The matched entry's state x_p [C,H,W].
        direction: The matched prompt's guidance direction at x_p [C,H,W].
        uncond: The unconditional prediction at x_p [C,H,W] when the request's negative prompt is
            the cached one's (the probe then needs no unconditional row); None: computed.
        bound: Largest divergence that keeps the hit.
        fallback_step: Where a downgraded row goes on from: ``probe_step`` (x_p, with the
            prediction the probe made) or 0 (``fallback_latents``: the request's own noise).
        fallback_latents: The request's own noise [C,H,W] (used when ``fallback_step`` is 0).
    """

    probe_step: int
    probe_latents: torch.Tensor
    direction: Optional[torch.Tensor]
    uncond: Optional[torch.Tensor]
    bound: float
    fallback_step: int
    fallback_latents: Optional[torch.Tensor] = None


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
    """The latent check of one row, from its probe's guidance direction."""
    if new_direction is None or check.direction is None:
        return GuardVerdict(DOWNGRADED, UNGUIDED, None, checked_step)
    divergence = guidance_divergence(new_direction, check.direction)
    if divergence <= check.bound:
        return GuardVerdict(PASSED, "", divergence, checked_step)
    return GuardVerdict(DOWNGRADED, DIVERGENCE, divergence, checked_step)


@dataclass(frozen=True)
class GuardPolicy:
    """The latent guard's calibrated settings (steps stated at ``base_steps``, like the thresholds).

    Attributes:
        bounds: K -> largest probe divergence at which a hit is resumed at K. A K above
            ``unchecked_max_k`` with no bound is not served.
        probe_k: The early cache step whose state is probed.
        fallback: Where a downgraded hit goes on from: "probe" (the probed state, so it still
            skips ``probe_k`` steps) or "noise" (its own seed's noise: a miss).
        unchecked_max_k: Hits at or below this K are served unchecked (the probe would cost more
            than they save), and so are states without a stored direction up to it.
    """

    bounds: Mapping[int, float] = field(default_factory=dict)
    probe_k: int = 5
    fallback: str = FALLBACK_NOISE
    unchecked_max_k: int = 5

    def __post_init__(self):
        if self.fallback not in (FALLBACK_PROBE, FALLBACK_NOISE):
            raise ValueError(f"guard fallback must be {FALLBACK_PROBE!r} or {FALLBACK_NOISE!r}, not {self.fallback!r}")
        if self.probe_k <= 0:
            raise ValueError("guard probe_k must be > 0")

    def bound_for(self, step: int, base_steps: int, steps: int) -> Optional[float]:
        """The bound for resuming at ``step`` of a ``steps``-step request (None: not allowed)."""
        base = round(step * base_steps / steps)
        return self.bounds.get(base)

    def probe_step(self, base_steps: int, steps: int) -> int:
        return round(self.probe_k * steps / base_steps)

    def unchecked_limit(self, base_steps: int, steps: int) -> int:
        return round(self.unchecked_max_k * steps / base_steps)

    def as_dict(self) -> Dict[str, object]:
        return {"bounds": {str(k): v for k, v in sorted(self.bounds.items())}, "probe_k": self.probe_k,
                "fallback": self.fallback, "unchecked_max_k": self.unchecked_max_k}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "GuardPolicy":
        bounds = {int(k): float(v) for k, v in dict(data.get("bounds") or {}).items()}
        return cls(bounds, int(data.get("probe_k", 5)), str(data.get("fallback", FALLBACK_NOISE)),
                   int(data.get("unchecked_max_k", 5)))


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
# the paper's thresholds, every K above 5 probed at K=5 against one bound, and a downgrade
# restarts from noise. 0.35: on the embedded model, framing and rewording pairs probe below it
# (median 0.18 and 0.26 at K=5) while one-attribute edits probe above it (median 0.46 for style,
# 0.9-2.7 for the others); the divergence is relative to the cached prompt's own guidance, so it
# does not depend on the scale of a model's noise predictions.
CONSERVATIVE_BOUND = 0.35
CONSERVATIVE = GuardPolicy(bounds={k: CONSERVATIVE_BOUND for k in (10, 15, 20, 25, 30, 35, 40)},
                           probe_k=5, fallback=FALLBACK_NOISE, unchecked_max_k=5)


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
