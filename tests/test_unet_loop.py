import pytest
import torch

from nirvana.unet_loop import DenoiseJob, StepRangeLoop

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


def job(seed=0, start=0, latents=None, steps=20, guidance=7.5, save=(2, 4, 6, 8, 10)):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(4, 8, 8, generator=g)
    return DenoiseJob(latents=noise if latents is None else latents,
                      prompt_embeds=torch.randn(77, 32, generator=g), negative_embeds=torch.randn(77, 32, generator=g),
                      start_step=start, steps=steps, guidance_scale=guidance, save_steps=save)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="needs a CUDA GPU"))]


def tolerance(device, latents):
    """1e-4 on the CPU. On a GPU, kernels picked per batch size (and TF32 convolutions) change
    rounding; with TF32 off, the documented bound is 1e-4 relative to the latents' magnitude."""
    if device == "cpu":
        return 1e-4
    return 1e-4 * float(latents.abs().max())


def on(device, j):
    if device == "cuda":  # exact fp32 kernels, see tolerance()
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    j.latents, j.prompt_embeds, j.negative_embeds = (x.to(device) for x in
                                                      (j.latents, j.prompt_embeds, j.negative_embeds))
    return j


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp", "lms"])
def test_resuming_from_own_checkpoint_gives_the_same_latents(tiny_unet, scheduler, device):
    loop = StepRangeLoop(tiny_unet, scheduler, SD_SCHEDULER)
    full = loop.run([on(device, job())])[0]
    assert full.latents.device.type == device
    assert sorted(full.checkpoints) == [2, 4, 6, 8, 10]
    assert full.steps_run == 20
    for k, state in full.checkpoints.items():
        resumed_job = job(start=k, latents=state)
        resumed_job.history = full.histories[k]
        resumed = loop.run([on(device, resumed_job)])[0]
        assert resumed.steps_run == 20 - k
        assert torch.max(torch.abs(resumed.latents - full.latents)) <= 1e-4, k


@pytest.mark.parametrize("device", DEVICES)
def test_batch_with_different_start_steps_matches_each_alone(tiny_unet, device):
    loop = StepRangeLoop(tiny_unet, "ddim", SD_SCHEDULER)
    base = loop.run([on(device, job(seed=1))])[0]
    jobs = [on(device, j) for j in (job(seed=1), job(seed=2, start=4, latents=base.checkpoints[4]),
                                    job(seed=3, start=10, latents=base.checkpoints[10], guidance=1.0))]
    alone = [loop.run([j])[0].latents for j in jobs]
    calls_before = loop.unet_calls
    together = loop.run(jobs)
    assert loop.unet_calls - calls_before == 20  # one UNet call per tick, not per request
    for a, b in zip(alone, together):
        assert torch.max(torch.abs(a - b.latents)) <= tolerance(device, a)


def test_exact_hit_runs_no_step(tiny_unet):
    loop = StepRangeLoop(tiny_unet, "ddim", SD_SCHEDULER)
    latents = torch.ones(4, 8, 8)
    result = loop.run([job(start=20, latents=latents)])[0]
    assert result.steps_run == 0 and torch.equal(result.latents, latents)


def test_dpmpp_without_history_deviates(tiny_unet):
    """Why checkpoints carry the solver history: without it DPM-Solver++ restarts at first order."""
    loop = StepRangeLoop(tiny_unet, "dpmpp", SD_SCHEDULER)
    full = loop.run([job()])[0]
    resumed = loop.run([job(start=10, latents=full.checkpoints[10])])[0]
    assert full.histories[10].shape == (1, 4, 8, 8)
    assert torch.max(torch.abs(resumed.latents - full.latents)) > 1e-3
