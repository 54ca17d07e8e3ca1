"""The step-range denoising loop: run steps START..STEPS for many requests at once.

Each request (a :class:`DenoiseJob`) has its own scheduler instance, step range,
guidance scale and prompt embeddings. Every tick, the UNet runs once over the
requests still active, each at its own timestep (per-sample timesteps), with
the unconditional and conditional branches in the same UNet batch. A request
resuming from a cached step K simply has fewer ticks to go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

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


@dataclass
class DenoiseResult:
    """Final latents and the checkpoints taken on the way.

    Attributes:
        latents: Final latents [C,H,W].
        checkpoints: Step -> latents [C,H,W] after that step.
        histories: Step -> solver history [H,C,H,W] at that step (H = 0 for stateless schedulers).
        steps_run: UNet steps this job ran.
    """

    latents: torch.Tensor
    checkpoints: Dict[int, torch.Tensor] = field(default_factory=dict)
    histories: Dict[int, torch.Tensor] = field(default_factory=dict)
    steps_run: int = 0


class _Active:
    """Loop bookkeeping for one job."""

    def __init__(self, job: DenoiseJob, scheduler_name: str, scheduler_config: Mapping):
        if not 0 <= job.start_step <= job.steps:
            raise ValueError(f"start_step {job.start_step} outside 0..{job.steps}")
        self.job = job
        self.scheduler = make_scheduler(scheduler_name, scheduler_config)
        self.scheduler.set_timesteps(job.steps, device=job.latents.device)
        self.timesteps = self.scheduler.timesteps
        if len(self.timesteps) != job.steps:
            raise ValueError(f"scheduler {scheduler_name} runs {len(self.timesteps)} UNet calls for {job.steps} steps")
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(job.start_step)
        self.scheduler_name = scheduler_name
        if job.start_step:
            restore_history(scheduler_name, self.scheduler, job.history, job.start_step)
        latents = job.latents.to(torch.float32).unsqueeze(0)
        if job.start_step == 0:
            latents = latents * self.scheduler.init_noise_sigma
        self.latents = latents
        self.step = job.start_step
        self.result = DenoiseResult(latents=latents[0])

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
                guided = cond
            t = a.timesteps[a.step]
            a.latents = a.scheduler.step(guided, t, a.latents, return_dict=False)[0]
            a.step += 1
            a.result.steps_run += 1
            if a.step in a.job.save_steps:
                a.result.checkpoints[a.step] = a.latents[0].clone()
                a.result.histories[a.step] = capture_history(a.scheduler_name, a.scheduler, a.latents).clone()
