"""The resume guard: the latent check in the step loop, the cache's side of it, and the token check."""

import math

import numpy as np
import pytest
import torch

from nirvana import inputs as rq
from nirvana.cache import CacheKey, LatentCache
from nirvana.config import CacheConfig, PipelineSpec
from nirvana.guard import (CONSERVATIVE, DIVERGENCE, DOWNGRADED, PASSED, UNGUIDED, GuardPolicy, ResumeCheck,
                           TokenCaps, calibration_for, format_verdict, guidance_divergence, judge, novel_tokens,
                           parse_verdict, policy_for)
from nirvana.unet_loop import DenoiseJob, StepRangeLoop

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
STEPS = 20


def prompt_states(seed):
    return torch.randn(77, 32, generator=torch.Generator().manual_seed(seed))


NEGATIVE = prompt_states(1000)


def job(prompt_seed, start=0, latents=None, check=None, guidance=7.5, save=(4, 8, 12)):
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(7))
    return DenoiseJob(latents=noise if latents is None else latents, prompt_embeds=prompt_states(prompt_seed),
                      negative_embeds=NEGATIVE, start_step=start, steps=STEPS, guidance_scale=guidance,
                      save_steps=save, check=check)


@pytest.fixture
def loop(tiny_unet):
    return StepRangeLoop(tiny_unet, "ddim", SD_SCHEDULER)


# -- the divergence and the verdict ----------------------------------------------------------------

def test_divergence_is_relative_to_the_cached_direction():
    cached = torch.ones(4, 8, 8)
    assert guidance_divergence(cached, cached) == 0.0
    assert guidance_divergence(cached * 1.5, cached) == pytest.approx(0.5)
    assert guidance_divergence(3 * cached, 2 * cached) == pytest.approx(0.5)  # scale-free
    assert guidance_divergence(cached, torch.zeros(4, 8, 8)) == math.inf  # degenerate: never passes


def test_judge_passes_within_the_bound_and_downgrades_beyond_or_unguided():
    cached = torch.ones(4, 8, 8)
    check = ResumeCheck(cached, 0.3, 0, torch.zeros(4, 8, 8))
    assert judge(check, cached * 1.2, 10).outcome == PASSED
    verdict = judge(check, cached * 2.0, 10)
    assert (verdict.outcome, verdict.reason, verdict.checked_step) == (DOWNGRADED, DIVERGENCE, 10)
    assert verdict.divergence == pytest.approx(1.0)
    assert judge(check, None, 10).reason == UNGUIDED
    for v in (judge(check, cached, 10), verdict, judge(check, None, 10)):
        assert parse_verdict(format_verdict(v)) == (v.outcome, v.reason)
    with pytest.raises(ValueError):
        parse_verdict("downgraded")


# -- the latent check in the step loop --------------------------------------------------------------

def test_a_source_keeps_its_guidance_direction_at_every_save_step(loop):
    source = loop.run([job(1)])[0]
    assert sorted(source.directions) == [4, 8, 12] == sorted(source.checkpoints)
    # Without guidance there is no unconditional branch, so no direction.
    assert loop.run([job(1, guidance=1.0)])[0].directions == {}


def test_the_same_prompt_passes_and_resumes_exactly_as_unchecked(loop):
    source = loop.run([job(1)])[0]
    check = ResumeCheck(source.directions[8], 0.05, 0, job(1).latents)
    checked = loop.run([job(1, start=8, latents=source.checkpoints[8], check=check)])[0]
    unchecked = loop.run([job(1, start=8, latents=source.checkpoints[8])])[0]
    assert checked.verdict.outcome == PASSED and checked.verdict.divergence < 1e-5
    assert checked.start_step == 8 and checked.steps_run == STEPS - 8
    assert torch.equal(checked.latents, unchecked.latents)
    assert torch.max(torch.abs(checked.latents - source.latents)) <= 1e-4


def test_another_prompt_past_the_bound_restarts_from_the_fallback_state(loop):
    source = loop.run([job(1)])[0]
    check = ResumeCheck(source.directions[12], 0.0, 4, source.checkpoints[4])
    downgraded = loop.run([job(2, start=12, latents=source.checkpoints[12], check=check)])[0]
    assert downgraded.verdict.outcome == DOWNGRADED and downgraded.verdict.reason == DIVERGENCE
    assert downgraded.verdict.divergence > 0 and downgraded.verdict.checked_step == 12
    assert downgraded.start_step == 4
    assert downgraded.steps_run == STEPS - 4 + 1  # the discarded call counts
    from_fallback = loop.run([job(2, start=4, latents=source.checkpoints[4])])[0]
    assert torch.equal(downgraded.latents, from_fallback.latents)
    # Every state after the fallback is kept again, with its direction, for admission.
    assert sorted(downgraded.checkpoints) == [8, 12] == sorted(downgraded.directions)


def test_a_fallback_to_step_zero_is_the_requests_own_generation(loop):
    source = loop.run([job(1)])[0]
    own_noise = job(2).latents
    check = ResumeCheck(source.directions[8], 0.0, 0, own_noise)
    downgraded = loop.run([job(2, start=8, latents=source.checkpoints[8], check=check)])[0]
    fresh = loop.run([job(2)])[0]
    assert downgraded.start_step == 0 and downgraded.steps_run == STEPS + 1
    assert torch.equal(downgraded.latents, fresh.latents)


def test_an_unguided_resume_is_downgraded(loop):
    source = loop.run([job(1)])[0]
    check = ResumeCheck(source.directions[8], 10.0, 0, job(2).latents)
    result = loop.run([job(2, start=8, latents=source.checkpoints[8], check=check, guidance=1.0)])[0]
    assert (result.verdict.outcome, result.verdict.reason, result.start_step) == (DOWNGRADED, UNGUIDED, 0)


def test_decisions_depend_on_the_row_alone_batched_equals_single(loop):
    source = loop.run([job(1)])[0]
    passing = lambda: job(1, start=8, latents=source.checkpoints[8],  # noqa: E731
                          check=ResumeCheck(source.directions[8], 0.05, 0, job(1).latents))
    failing = lambda: job(2, start=12, latents=source.checkpoints[12],  # noqa: E731
                          check=ResumeCheck(source.directions[12], 0.0, 4, source.checkpoints[4]))
    together = loop.run([passing(), failing(), job(3)])
    alone = [loop.run([j])[0] for j in (passing(), failing(), job(3))]
    for a, b in zip(together, alone):
        assert a.verdict.outcome == b.verdict.outcome and a.start_step == b.start_step
        assert torch.max(torch.abs(a.latents - b.latents)) <= 1e-4  # as test_unet_loop: batch-size rounding


# -- the cache's side: directions stored, bound and fallback handed out ------------------------------

DIM = 16
SHAPE = (4, 8, 8)


def unit(seed):
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def key(prompt="p", seed=1):
    return CacheKey(prompt, "", seed, 50, 7.5)


POLICY = GuardPolicy(bounds={10: 0.4, 25: 0.3}, fallback_max_k=10, unchecked_max_k=5)
CONFIG = CacheConfig(cache_steps=(5, 10, 25), thresholds=((0.9, 25), (0.5, 10)))


def admit_source(cache, with_directions=True):
    states = {k: torch.full(SHAPE, float(k)) for k in (5, 10, 25)}
    directions = {k: torch.full(SHAPE, -float(k)) for k in (5, 10, 25)} if with_directions else None
    cache.admit(unit(0), key("source"), states, final_latents=torch.zeros(SHAPE), directions=directions)


def test_a_checked_hit_carries_the_direction_the_bound_and_the_fallback():
    cache = LatentCache(CONFIG, DIM, guard=POLICY)
    admit_source(cache)
    hit = cache.lookup(unit(0), key("target"))
    assert (hit.status, hit.start_step) == ("approximate", 25)
    assert torch.all(hit.latents == 25) and torch.all(hit.direction == -25)
    assert hit.guard_bound == 0.3
    assert hit.fallback_step == 10 and torch.all(hit.fallback_latents == 10)
    assert hit.save_steps == (25,)  # everything after the fallback: a downgrade admits 25 again
    # Without a guard the same state is served unchecked, latents only.
    plain = LatentCache(CONFIG, DIM)
    admit_source(plain)
    unchecked = plain.lookup(unit(0), key("target"))
    assert unchecked.start_step == 25 and unchecked.guard_bound is None and unchecked.latents.shape == SHAPE


def test_states_without_a_direction_serve_only_up_to_the_unchecked_limit():
    cache = LatentCache(CONFIG, DIM, guard=POLICY)
    admit_source(cache, with_directions=False)  # e.g. restored from a cache written before the guard
    hit = cache.lookup(unit(0), key("target"))
    assert (hit.status, hit.start_step, hit.guard_bound) == ("approximate", 5, None)
    # ... and with no unchecked K allowed, not at all (the exact hit still works).
    strict = LatentCache(CONFIG, DIM, guard=GuardPolicy(bounds={10: 0.4, 25: 0.3}))
    admit_source(strict, with_directions=False)
    assert strict.lookup(unit(0), key("target")).status == "miss"
    assert strict.lookup(unit(0), key("source")).status == "exact"


def test_no_fallback_state_means_the_requests_own_noise():
    cache = LatentCache(CONFIG, DIM, guard=GuardPolicy(bounds={10: 0.4, 25: 0.3}, fallback_max_k=0))
    admit_source(cache)
    hit = cache.lookup(unit(0), key("target"))
    assert hit.guard_bound == 0.3 and hit.fallback_step == 0 and hit.fallback_latents is None
    assert hit.save_steps == (5, 10, 25)


# -- calibration: which thresholds and bounds apply ------------------------------------------------

def spec_with(guard):
    return PipelineSpec("m", 4, 8, 8, 8, DIM, 32, 16, thresholds=[[0.9, 40], [0.71, 5]], guard=guard)


GUARD_DATA = {"targets": {
    "0.01": {"thresholds": [[0.95, 25]], "guard": {"bounds": {"25": 0.2}, "fallback_max_k": 0, "unchecked_max_k": 0}},
    "0.05": {"thresholds": [[0.8, 40]], "guard": {"bounds": {"40": 0.5}, "fallback_max_k": 5, "unchecked_max_k": 0}}}}


def test_the_operator_target_picks_the_loosest_calibration_that_meets_it():
    spec = spec_with(GUARD_DATA)
    assert calibration_for(spec, CacheConfig(false_hit_target=0.02)).target == 0.01
    chosen = calibration_for(spec, CacheConfig(false_hit_target=0.05))
    assert chosen.thresholds == ((0.8, 40),) and chosen.policy.bounds == {40: 0.5}
    assert calibration_for(spec, CacheConfig(false_hit_target=0.005)) is None
    assert policy_for(spec, CacheConfig(false_hit_target=0.005)) == CONSERVATIVE
    assert policy_for(spec, CacheConfig(guard="off")) is None
    assert policy_for(spec_with({}), CacheConfig()) == CONSERVATIVE  # an uncalibrated checkpoint


def test_model_thresholds_follow_the_guard_setting():
    spec = spec_with(GUARD_DATA)
    guarded = CacheConfig(thresholds=(), false_hit_target=0.05).with_model_thresholds(spec)
    assert guarded.thresholds == ((0.8, 40),) and 40 in guarded.cache_steps
    unguarded = CacheConfig(thresholds=(), guard="off").with_model_thresholds(spec)
    assert unguarded.thresholds == ((0.9, 40), (0.71, 5))
    uncalibrated = CacheConfig(thresholds=()).with_model_thresholds(spec_with({}))
    assert uncalibrated.thresholds == ((0.9, 40), (0.71, 5))


def test_guard_settings_are_validated():
    from nirvana.config import ConfigError

    with pytest.raises(ConfigError, match="guard"):
        CacheConfig(guard="maybe").validate()
    with pytest.raises(ConfigError, match="false_hit_target"):
        CacheConfig(false_hit_target=0.0).validate()


# -- the token check -----------------------------------------------------------------------------

def test_novel_tokens_count_replaced_and_added_words_not_moved_ones():
    black, white, red, circle, on, a, bg, k4 = range(10, 18)
    base = [a, red, circle, on, black, bg]
    assert novel_tokens([a, red, circle, on, white, bg], base) == (white,)
    assert novel_tokens([on, black, bg, a, red, circle], base) == ()  # reordered: nothing new
    assert novel_tokens(base + [k4], base) == (k4,)
    assert novel_tokens([0, a, red, circle, 1], [0, a, red, circle, 1], special=(0, 1)) == ()
    caps = TokenCaps({0: 40, 1: 10, 2: 5, 3: 0})
    assert caps.cap(0) == 40 and caps.cap(1) == 10 and caps.cap(7) == 0


# -- unet_loop's inputs for the check ---------------------------------------------------------------

def test_unet_loop_rejects_a_partial_or_inconsistent_check(repository):
    from nirvana.config import UNetLoopConfig
    from nirvana.pipeline import UNetLoopStep

    step = UNetLoopStep(repository / "unet_loop" / "1", UNetLoopConfig(batching="execute"))
    spec = step.spec
    shape = spec.latent_shape
    inputs = {"HIDDEN_STATES": np.zeros((1, spec.max_length, spec.hidden_dim), np.float32),
              "NEGATIVE_HIDDEN_STATES": np.zeros((1, spec.max_length, spec.hidden_dim), np.float32),
              "LATENTS": np.zeros((1, *shape), np.float32), "START_STEP": np.array([[10]], np.int32),
              "STEPS": np.array([[20]], np.int32), "GUIDANCE_SCALE": np.array([[7.5]], np.float32),
              "SAVE_STEPS": np.array([[5, 10, 15]], np.int32), "DEADLINE_NS": None,
              "FALLBACK_LATENTS": np.zeros((1, *shape), np.float32), "FALLBACK_STEP": np.array([[0]], np.int32),
              "GUIDE_DIRECTION": np.ones((1, *shape), np.float32), "GUARD_BOUND": np.array([[0.3]], np.float32)}
    assert step.jobs_for(inputs)[0].check.bound == pytest.approx(0.3)
    with pytest.raises(rq.InvalidInput, match="GUARD_BOUND"):
        step.jobs_for({**inputs, "GUARD_BOUND": None})
    with pytest.raises(rq.InvalidInput, match="FALLBACK_STEP"):
        step.jobs_for({**inputs, "FALLBACK_STEP": np.array([[10]], np.int32)})
    with pytest.raises(rq.InvalidInput, match="GUIDE_DIRECTION"):
        step.jobs_for({**inputs, "GUIDE_DIRECTION": np.ones((1, 2, 2, 2), np.float32)})
    assert step.jobs_for({**inputs, "GUARD_BOUND": np.array([[-1.0]], np.float32)})[0].check is None
    out = step.execute([inputs])[0]
    assert out["START_STEP_USED"][0, 0] in (0, 10) and out["GUARD"][0, 0] in (b"passed", b"downgraded:divergence")
