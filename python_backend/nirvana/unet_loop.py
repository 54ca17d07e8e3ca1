"""The step-range denoising loop: run steps START..STEPS for many requests at once.

Each request (a :class:`DenoiseJob`) has its own scheduler instance, step range,
guidance scale and prompt embeddings. Every tick, the UNet runs once over the
requests still active, each at its own timestep (per-sample timesteps), with
the unconditional and conditional branches in the same UNet batch. A request
resuming from a cached step K simply has fewer ticks to go.

Two things ride on UNet calls the loop makes anyway (see :mod:`nirvana.guard`): at every save
step K the row's guidance direction at x_K (its next call's conditional minus unconditional
prediction) is kept with the checkpoint, and a row resumed with a :class:`~nirvana.guard.ResumeCheck`
compares its first call's direction with the cached one and, when the new prompt moves the state
too far, discards that call and restarts from the check's fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from nirvana.guard import DOWNGRADED, GuardVerdict, ResumeCheck, judge
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
        steps_run: UNet steps this job ran (a call the guard discarded included).
        start_step: Where the row actually started: the job's start step, or the check's
            fallback step after a downgrade.
        verdict: What the resume guard decided (outcome "" when the row had no check).
    """

    latents: torch.Tensor
    checkpoints: Dict[int, torch.Tensor] = field(default_factory=dict)
    histories: Dict[int, torch.Tensor] = field(default_factory=dict)
    directions: Dict[int, torch.Tensor] = field(default_factory=dict)
    steps_run: int = 0
    start_step: int = 0
    verdict: GuardVerdict = field(default_factory=GuardVerdict)


class _Active:
    """Loop bookkeeping for one job."""

    def __init__(self, job: DenoiseJob, scheduler_name: str, scheduler_config: Mapping):
        if not 0 <= job.start_step <= job.steps:
            raise ValueError(f"start_step {job.start_step} outside 0..{job.steps}")
        if job.check is not None and not 0 <= job.check.fallback_step <= job.start_step:
            raise ValueError(f"fallback_step {job.check.fallback_step} outside 0..start_step {job.start_step}")
        self.job = job
        self.scheduler_name = scheduler_name
        self.scheduler_config = scheduler_config
        self.result = DenoiseResult(latents=job.latents, start_step=job.start_step)
        self.pending_check = job.check is not None and job.start_step > 0
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

    def settle_check(self, direction: Optional[torch.Tensor]) -> bool:
        """Run the latent check on this row's first UNet call; True when it restarted the row
        from the fallback (that call's prediction is then discarded)."""
        self.pending_check = False
        check = self.job.check
        verdict = judge(check, direction, self.step)
        self.result.verdict = verdict
        if verdict.outcome != DOWNGRADED:
            return False
        self._begin(check.fallback_step, check.fallback_latents, None)
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
        # Unconditional rows first, then conditional rows, like diffusers pipelines.
        for a, x in zip(running, scaled):
            if a.guided:
                samples.append(x)
                timesteps.append(a.timesteps[a.step])
                hidden.append(a.job.negative_embeds)
        uncond_rows = len(samples)
        for a, x in zip(running, scaled):
            samples.append(x)
            timesteps.append(a.timesteps[a.step])
            hidden.append(a.job.prompt_embeds)
        noise = self.unet(torch.cat(samples), torch.stack([torch.as_tensor(t, dtype=torch.float32)
                                                           for t in timesteps]), torch.stack(hidden))
        self.unet_calls += 1
        uncond_index = 0
        for i, a in enumerate(running):
            cond = noise[uncond_rows + i: uncond_rows + i + 1]
            if a.guided:
                uncond = noise[uncond_index: uncond_index + 1]
                uncond_index += 1
                guided = uncond + a.job.guidance_scale * (cond - uncond)
            else:
                uncond = None
                guided = cond
            a.result.steps_run += 1
            direction = None if uncond is None else (cond - uncond)[0]
            if a.pending_check and a.settle_check(direction):
                continue  # downgraded: this call's prediction was for the cached state, not the fallback
            if direction is not None and a.step in a.result.checkpoints:
                a.result.directions[a.step] = direction.clone()  # the guard's reference for x_K
            t = a.timesteps[a.step]
            a.latents = a.scheduler.step(guided, t, a.latents, return_dict=False)[0]
            a.step += 1
            if a.step in a.job.save_steps:
                a.result.checkpoints[a.step] = a.latents[0].clone()
                a.result.histories[a.step] = capture_history(a.scheduler_name, a.scheduler, a.latents).clone()
