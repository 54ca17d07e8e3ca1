"""The step-range denoising loop: run steps START..STEPS for many requests at once.

Each request (a :class:`DenoiseJob`) has its own scheduler instance, step range,
guidance scale and prompt embeddings. Every tick, the UNet runs once over the
requests still active, each at its own timestep (per-sample timesteps), with
the unconditional and conditional branches in the same UNet batch. A request
resuming from a cached step K simply has fewer ticks to go.

The resume guard (see :mod:`nirvana.guard`) rides on this loop: at every save step K the row's
guidance direction and unconditional prediction at x_K (its next call's) are kept with the
checkpoint, and a row resumed with a :class:`~nirvana.guard.ResumeCheck` first *probes* the
matched entry's early state (one conditional row when the cached unconditional prediction can
stand in), then jumps to its start state or, downgraded, goes on from the probe or its own noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from nirvana.guard import PASSED, GuardVerdict, ResumeCheck, judge
from nirvana.schedulers import capture_history, make_scheduler, restore_history

# (sample [B,C,H,W], timestep [B] float32, encoder_hidden_states [B,L,D]) -> noise prediction [B,C,H,W]
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DenoiseJob:
    """One request's work for the loop.

    Attributes:
        latents: Starting latents [C,H,W]: pure noise at START_STEP 0, else a cached state.
        prompt_embeds: Conditional token hidden states [L,D].
        negative_embeds: Unconditional (negative prompt) hidden states [L,D].
        start_step: Steps already done (0..steps).
        steps: Total denoising steps.
        guidance_scale: Classifier-free guidance; <= 1 runs the conditional branch only.
        save_steps: Steps after which the latents are returned as checkpoints.
        history: Multistep solver history saved with the starting state [H, C, H, W]
            (see :func:`nirvana.schedulers.capture_history`); None for stateless schedulers.
        digest: Identifies the job's inputs (see :func:`nirvana.pipeline.inputs_digest`): jobs with the same digest
            compute the same result, so a step engine may run them once. None: never shared.
        check: The resume guard's latent check for a row resumed from another prompt's state
            (None: resume unchecked, or a start from noise).
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    start_step: int
    steps: int
    guidance_scale: float
    save_steps: Tuple[int, ...] = ()
    history: Optional[torch.Tensor] = None
    digest: Optional[str] = None
    check: Optional[ResumeCheck] = None


@dataclass
class DenoiseResult:
    """Final latents and the checkpoints taken on the way.

    Attributes:
        latents: Final latents [C,H,W].
        checkpoints: Step -> latents [C,H,W] after that step.
        histories: Step -> solver history [H,C,H,W] at that step (H = 0 for stateless schedulers).
        directions: Step -> guidance direction [C,H,W] at that checkpoint (guided rows only).
        unconds: Step -> unconditional prediction [C,H,W] at that checkpoint (guided rows only).
        first_direction: The guidance direction of the row's first UNet call (at its starting
            state, or its probe), guided rows only: what the quality harness compares.
        steps_run: UNet calls this job took part in (its probe included).
        discarded_rows: UNet batch rows whose prediction the guard discarded (a probe followed by a
            jump or a restart: 1, or 2 when the unconditional row had to be computed too).
        start_step: Where the row actually started: the job's start step, or after a downgrade the
            probe step or 0.
        verdict: What the resume guard decided (outcome "" when the row had no check).
    """

    latents: torch.Tensor
    checkpoints: Dict[int, torch.Tensor] = field(default_factory=dict)
    histories: Dict[int, torch.Tensor] = field(default_factory=dict)
    directions: Dict[int, torch.Tensor] = field(default_factory=dict)
    unconds: Dict[int, torch.Tensor] = field(default_factory=dict)
    first_direction: Optional[torch.Tensor] = None
    steps_run: int = 0
    discarded_rows: int = 0
    start_step: int = 0
    verdict: GuardVerdict = field(default_factory=GuardVerdict)


class _Active:
    """Loop bookkeeping for one job."""

    def __init__(self, job: DenoiseJob, scheduler_name: str, scheduler_config: Mapping):
        if not 0 <= job.start_step <= job.steps:
            raise ValueError(f"start_step {job.start_step} outside 0..{job.steps}")
        check = job.check
        if check is not None:
            if not 0 < check.probe_step < job.start_step:
                raise ValueError(f"probe_step {check.probe_step} outside 1..start_step-1 ({job.start_step - 1})")
            if check.fallback_step not in (0, check.probe_step):
                raise ValueError(f"fallback_step {check.fallback_step} is neither 0 nor probe_step {check.probe_step}")
            if check.fallback_step == 0 and check.fallback_latents is None:
                raise ValueError("fallback_step 0 needs fallback_latents (the request's own noise)")
        self.job = job
        self.scheduler_name = scheduler_name
        self.scheduler_config = scheduler_config
        self.result = DenoiseResult(latents=job.latents, start_step=job.start_step)
        self.probing = check is not None
        if self.probing:
            self._begin(check.probe_step, check.probe_latents, None)
        else:
            self._begin(job.start_step, job.latents, job.history)

    def _begin(self, start_step: int, latents: torch.Tensor, history: Optional[torch.Tensor]) -> None:
        """A fresh scheduler resuming after ``start_step`` steps from ``latents``."""
        job = self.job
        self.scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)
        self.scheduler.set_timesteps(job.steps, device=latents.device)
        self.timesteps = self.scheduler.timesteps
        if len(self.timesteps) != job.steps:
            raise ValueError(f"scheduler {self.scheduler_name} runs {len(self.timesteps)} UNet calls for "
                             f"{job.steps} steps")
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start_step)
        if start_step:
            restore_history(self.scheduler_name, self.scheduler, history, start_step)
        latents = latents.to(torch.float32).unsqueeze(0)
        if start_step == 0:
            latents = latents * self.scheduler.init_noise_sigma
        self.latents = latents
        self.step = start_step
        self.result.start_step = start_step

    @property
    def needs_uncond_row(self) -> bool:
        """A guided row computes its unconditional prediction, except a probe whose cached one
        stands in for it (same state, timestep and negative prompt: the same prediction)."""
        return self.guided and not (self.probing and self.job.check.uncond is not None)

    def settle_probe(self, direction: Optional[torch.Tensor], computed_rows: int) -> bool:
        """Judge this row's probe; True when its prediction is discarded (the row jumped to its
        start state, or restarted from its own noise), False when the row goes on from the probe."""
        self.probing = False
        check = self.job.check
        verdict = judge(check, direction, self.job.start_step)
        self.result.verdict = verdict
        if verdict.outcome == PASSED:
            self._begin(self.job.start_step, self.job.latents, self.job.history)
        elif check.fallback_step == check.probe_step:
            return False  # downgraded to the probed state: its prediction is this step's
        else:
            self._begin(0, check.fallback_latents, None)
        self.result.discarded_rows += computed_rows
        return True

    @property
    def done(self) -> bool:
        return self.step >= self.job.steps

    @property
    def guided(self) -> bool:
        return self.job.guidance_scale > 1.0


class StepRangeLoop:
    """Denoises batches of jobs with a diffusers scheduler and a UNet function.

    Args:
        unet: Predicts noise for a batch (see :data:`UNetFn`).
        scheduler_name: A key of :data:`nirvana.schedulers.SCHEDULERS`.
        scheduler_config: The checkpoint's scheduler config.
    """

    def __init__(self, unet: UNetFn, scheduler_name: str, scheduler_config: Mapping):
        self.unet = unet
        self.scheduler_name = scheduler_name
        self.scheduler_config = dict(scheduler_config)
        self.unet_calls = 0

    def run(self, jobs: Sequence[DenoiseJob]) -> List[DenoiseResult]:
        """Run every job to its last step; jobs with fewer steps left leave the batch early."""
        active = [self.start(job) for job in jobs]
        while True:
            running = [a for a in active if not a.done]
            if not running:
                break
            self.tick(running)
        return [self.finish(a) for a in active]

    def start(self, job: DenoiseJob) -> "_Active":
        """Prepare a job to take part in :meth:`tick` (its own scheduler, restored history)."""
        return _Active(job, self.scheduler_name, self.scheduler_config)

    @staticmethod
    def finish(active: "_Active") -> DenoiseResult:
        active.result.latents = active.latents[0]
        return active.result

    def tick(self, running: List["_Active"]) -> None:
        """One UNet call over every running job, each at its own timestep, then one scheduler step each."""
        scaled = [a.scheduler.scale_model_input(a.latents, a.timesteps[a.step]) for a in running]
        samples, timesteps, hidden = [], [], []
        uncond_row: Dict[int, int] = {}  # index in running -> its unconditional row
        # Unconditional rows first, then conditional rows, like diffusers pipelines.
        for i, (a, x) in enumerate(zip(running, scaled)):
            if a.needs_uncond_row:
                uncond_row[i] = len(samples)
                samples.append(x)
                timesteps.append(a.timesteps[a.step])
                hidden.append(a.job.negative_embeds)
        cond_rows = len(samples)
        for a, x in zip(running, scaled):
            samples.append(x)
            timesteps.append(a.timesteps[a.step])
            hidden.append(a.job.prompt_embeds)
        noise = self.unet(torch.cat(samples), torch.stack([torch.as_tensor(t, dtype=torch.float32)
                                                           for t in timesteps]), torch.stack(hidden))
        self.unet_calls += 1
        for i, a in enumerate(running):
            cond = noise[cond_rows + i: cond_rows + i + 1]
            if i in uncond_row:
                uncond = noise[uncond_row[i]: uncond_row[i] + 1]
            elif a.probing and a.job.check.uncond is not None:
                uncond = a.job.check.uncond.to(cond.dtype).unsqueeze(0)
            else:
                uncond = None
            guided = uncond + a.job.guidance_scale * (cond - uncond) if a.guided else cond
            # The guidance direction, where something reads it: a probe, a row's first call, a checkpoint.
            wanted = a.probing or a.result.steps_run == 0 or a.step in a.result.checkpoints
            direction = (cond - uncond)[0] if wanted and uncond is not None else None
            if a.result.steps_run == 0 and direction is not None:
                a.result.first_direction = direction.clone()
            a.result.steps_run += 1
            if a.probing and a.settle_probe(direction, 1 + (i in uncond_row)):
                continue  # the probe's prediction was for another state than the one the row goes on from
            if a.step in a.result.checkpoints and a.guided:
                a.result.directions[a.step] = direction.clone()  # the guard's reference for x_K
                a.result.unconds[a.step] = uncond[0].clone()
            t = a.timesteps[a.step]
            a.latents = a.scheduler.step(guided, t, a.latents, return_dict=False)[0]
            a.step += 1
            if a.step in a.job.save_steps:
                a.result.checkpoints[a.step] = a.latents[0].clone()
                a.result.histories[a.step] = capture_history(a.scheduler_name, a.scheduler, a.latents).clone()
