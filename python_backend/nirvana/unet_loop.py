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
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    start_step: int
    steps: int
    guidance_scale: float
    save_steps: Tuple[int, ...] = ()
    history: Optional[torch.Tensor] = None


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


class ContinuousBatcher:
    """Iteration-level batching: jobs join the running loop at the next tick instead of waiting.

    For a decoupled Triton model serving the loop on its own (streaming gRPC). The txt2img
    ensemble does not use it: in Triton 2.51 an ensemble with a decoupled step becomes
    decoupled itself, which rules out HTTP and unary gRPC clients.

    A background thread ticks :class:`StepRangeLoop` over every active job; :meth:`submit`
    adds a group of jobs (one Triton request) whenever it arrives, and ``on_done`` is called
    with that group's results as soon as its last job finishes, while others keep running.

    Args:
        loop: The step loop to drive.
        max_active: Most jobs in one tick (the UNet batch is up to twice that with guidance).
    """

    def __init__(self, loop: StepRangeLoop, max_active: int = 8):
        import threading

        self.loop = loop
        self.max_active = max_active
        self._pending: List[Tuple[List[DenoiseJob], Callable, Callable]] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="unet-loop", daemon=True)
        self._thread.start()

    def submit(self, jobs: Sequence[DenoiseJob], on_done: Callable[[List[DenoiseResult]], None],
               on_error: Callable[[BaseException], None]) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError("the UNet loop is stopped")
            self._pending.append((list(jobs), on_done, on_error))
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        groups: List[Tuple[List["_Active"], Callable, Callable]] = []
        while True:
            with self._cv:
                while not self._pending and not groups and not self._stopped:
                    self._cv.wait()
                if self._stopped and not groups and not self._pending:
                    return
                active_count = sum(len(g[0]) for g in groups)
                while self._pending and (active_count == 0 or
                                         active_count + len(self._pending[0][0]) <= self.max_active):
                    jobs, on_done, on_error = self._pending.pop(0)
                    try:
                        groups.append(([self.loop.start(j) for j in jobs], on_done, on_error))
                        active_count += len(jobs)
                    except Exception as exc:  # noqa: BLE001 - that request fails, the loop goes on
                        on_error(exc)
            running = [a for actives, _, _ in groups for a in actives if not a.done]
            if running:
                try:
                    self.loop.tick(running)
                except Exception as exc:  # noqa: BLE001 - every job in this tick fails
                    for _, _, on_error in groups:
                        on_error(exc)
                    groups = []
                    continue
            still = []
            for actives, on_done, on_error in groups:
                if all(a.done for a in actives):
                    try:
                        on_done([self.loop.finish(a) for a in actives])
                    except Exception as exc:  # noqa: BLE001
                        on_error(exc)
                else:
                    still.append((actives, on_done, on_error))
            groups = still
