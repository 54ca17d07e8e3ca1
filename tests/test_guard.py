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


def check_for(direction, bound, probe_step=4, probe_latents=None, uncond=None, fallback_step=0, noise=None):
    return ResumeCheck(probe_step, torch.zeros(4, 8, 8) if probe_latents is None else probe_latents, direction,
                       uncond, bound, fallback_step, torch.zeros(4, 8, 8) if noise is None else noise)


def test_judge_passes_within_the_bound_and_downgrades_beyond_or_unguided():
    cached = torch.ones(4, 8, 8)
    check = check_for(cached, 0.3)
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

def test_a_source_keeps_direction_and_unconditional_prediction_at_every_save_step(loop):
    source = loop.run([job(1)])[0]
    assert sorted(source.directions) == [4, 8, 12] == sorted(source.checkpoints) == sorted(source.unconds)
    # Without guidance there is no unconditional branch, so no direction.
    assert loop.run([job(1, guidance=1.0)])[0].directions == {}


def probe_of(source, step=4, bound=0.05, fallback_step=0, noise=None, stored_uncond=True):
    return check_for(source.directions[step], bound, step, source.checkpoints[step],
                     source.unconds[step] if stored_uncond else None, fallback_step, noise)


def test_the_same_prompt_passes_the_probe_and_resumes_exactly_as_unchecked(loop):
    source = loop.run([job(1)])[0]
    checked = loop.run([job(1, start=12, latents=source.checkpoints[12], check=probe_of(source))])[0]
    unchecked = loop.run([job(1, start=12, latents=source.checkpoints[12])])[0]
    assert checked.verdict.outcome == PASSED and checked.verdict.divergence < 1e-3  # batch-size rounding
    assert checked.verdict.checked_step == 12 and checked.start_step == 12
    assert checked.steps_run == STEPS - 12 + 1 and checked.discarded_rows == 1  # the probe: one conditional row
    assert torch.max(torch.abs(checked.latents - unchecked.latents)) <= 1e-4
    assert torch.max(torch.abs(checked.latents - source.latents)) <= 1e-4
    # Without the cached unconditional prediction the probe computes it: two rows.
    computed = loop.run([job(1, start=12, latents=source.checkpoints[12],
                             check=probe_of(source, stored_uncond=False))])[0]
    assert computed.verdict.outcome == PASSED and computed.discarded_rows == 2


def test_another_prompt_past_the_bound_goes_on_from_the_probe(loop):
    source = loop.run([job(1)])[0]
    downgraded = loop.run([job(2, start=12, latents=source.checkpoints[12],
                               check=probe_of(source, bound=0.0, fallback_step=4))])[0]
    assert downgraded.verdict.outcome == DOWNGRADED and downgraded.verdict.reason == DIVERGENCE
    assert downgraded.verdict.divergence > 0 and downgraded.verdict.checked_step == 12
    assert downgraded.start_step == 4 and downgraded.discarded_rows == 0  # the probe's prediction is used
    assert downgraded.steps_run == STEPS - 4
    from_probe = loop.run([job(2, start=4, latents=source.checkpoints[4])])[0]
    assert torch.max(torch.abs(downgraded.latents - from_probe.latents)) <= 1e-4  # cached vs computed uncond
    # Every state after where it went on from is kept again for admission.
    assert sorted(downgraded.checkpoints) == [8, 12] == sorted(downgraded.directions)


def test_a_fallback_to_step_zero_is_the_requests_own_generation(loop):
    source = loop.run([job(1)])[0]
    own_noise = job(2).latents
    downgraded = loop.run([job(2, start=12, latents=source.checkpoints[12],
                               check=probe_of(source, bound=0.0, noise=own_noise))])[0]
    fresh = loop.run([job(2)])[0]
    assert downgraded.start_step == 0 and downgraded.steps_run == STEPS + 1 and downgraded.discarded_rows == 1
    assert torch.max(torch.abs(downgraded.latents - fresh.latents)) <= 1e-4


def test_an_unguided_request_is_checked_with_the_cached_unconditional_prediction(loop):
    source = loop.run([job(1)])[0]
    same = loop.run([job(1, start=12, latents=source.checkpoints[12], check=probe_of(source), guidance=1.0)])[0]
    assert same.verdict.outcome == PASSED
    blind = loop.run([job(2, start=12, latents=source.checkpoints[12], guidance=1.0,
                          check=probe_of(source, bound=10.0, stored_uncond=False, noise=job(2).latents))])[0]
    assert (blind.verdict.outcome, blind.verdict.reason, blind.start_step) == (DOWNGRADED, UNGUIDED, 0)


def test_bad_checks_are_refused(loop):
    source = loop.run([job(1)])[0]
    with pytest.raises(ValueError, match="probe_step"):
        loop.run([job(1, start=4, latents=source.checkpoints[4], check=probe_of(source, step=4))])
    with pytest.raises(ValueError, match="fallback_step"):
        loop.run([job(1, start=12, latents=source.checkpoints[12], check=probe_of(source, fallback_step=8))])


def test_decisions_depend_on_the_row_alone_batched_equals_single(loop):
    source = loop.run([job(1)])[0]
    passing = lambda: job(1, start=12, latents=source.checkpoints[12], check=probe_of(source))  # noqa: E731
    failing = lambda: job(2, start=12, latents=source.checkpoints[12],  # noqa: E731
                          check=probe_of(source, bound=0.0, fallback_step=4))
    together = loop.run([passing(), failing(), job(3)])
    alone = [loop.run([j])[0] for j in (passing(), failing(), job(3))]
    for a, b in zip(together, alone):
        assert a.verdict.outcome == b.verdict.outcome and a.start_step == b.start_step
        assert torch.max(torch.abs(a.latents - b.latents)) <= 1e-4  # as test_unet_loop: batch-size rounding


# -- the cache's side: probe states stored, bound and fallback handed out ----------------------------

DIM = 16
SHAPE = (4, 8, 8)


def unit(seed):
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def key(prompt="p", seed=1, negative=""):
    return CacheKey(prompt, negative, seed, 50, 7.5)


POLICY = GuardPolicy(bounds={10: 0.4, 25: 0.3}, probe_k=5, fallback="probe", unchecked_max_k=5)
CONFIG = CacheConfig(cache_steps=(5, 10, 25), thresholds=((0.9, 25), (0.5, 10)))


def admit_source(cache, with_guides=True):
    states = {k: torch.full(SHAPE, float(k)) for k in (5, 10, 25)}
    guides = {k: (torch.full(SHAPE, -float(k)), torch.full(SHAPE, 0.5)) for k in (5, 10, 25)} if with_guides else None
    cache.admit(unit(0), key("source"), states, final_latents=torch.zeros(SHAPE), guides=guides)


def test_a_checked_hit_carries_the_probe_the_bound_and_the_fallback():
    cache = LatentCache(CONFIG, DIM, guard=POLICY)
    admit_source(cache)
    hit = cache.lookup(unit(0), key("target"))
    assert (hit.status, hit.start_step) == ("approximate", 25) and torch.all(hit.latents == 25)
    assert hit.guard_bound == 0.3 and hit.probe_step == 5 and torch.all(hit.probe_latents == 5)
    assert torch.all(hit.direction == -5) and torch.all(hit.uncond == 0.5)
    assert hit.fallback_step == 5 and hit.save_steps == (10, 25)  # a downgrade admits 10 and 25 again
    # Only the probe step keeps its guides: the others are stored as latents alone.
    assert len(cache.store.get((1, 5))) == 3 and cache.store.get((1, 25)).shape == SHAPE
    # Another negative prompt: the cached unconditional prediction is not the request's.
    assert cache.lookup(unit(0), key("target", negative="blurry")).uncond is None
    # Without a guard the same state is served unchecked.
    plain = LatentCache(CONFIG, DIM)
    admit_source(plain)
    unchecked = plain.lookup(unit(0), key("target"))
    assert unchecked.start_step == 25 and unchecked.guard_bound is None and unchecked.latents.shape == SHAPE


def test_a_hit_at_or_below_the_unchecked_k_is_not_probed():
    cache = LatentCache(CacheConfig(cache_steps=(5, 10, 25), thresholds=((0.5, 5),)), DIM, guard=POLICY)
    admit_source(cache)
    hit = cache.lookup(unit(0), key("target"))
    assert (hit.start_step, hit.guard_bound) == (5, None)


def test_without_a_probe_state_a_hit_serves_only_up_to_the_unchecked_k():
    cache = LatentCache(CONFIG, DIM, guard=POLICY)
    admit_source(cache, with_guides=False)  # e.g. restored from a cache written before the guard
    hit = cache.lookup(unit(0), key("target"))
    assert (hit.status, hit.start_step, hit.guard_bound) == ("approximate", 5, None)
    strict = LatentCache(CONFIG, DIM, guard=GuardPolicy(bounds={10: 0.4, 25: 0.3}, unchecked_max_k=0))
    admit_source(strict, with_guides=False)
    assert strict.lookup(unit(0), key("target")).status == "miss"
    assert strict.lookup(unit(0), key("source")).status == "exact"  # exact hits are never checked


def test_a_noise_fallback_keeps_every_state_again():
    cache = LatentCache(CONFIG, DIM, guard=GuardPolicy(bounds={10: 0.4, 25: 0.3}, fallback="noise"))
    admit_source(cache)
    hit = cache.lookup(unit(0), key("target"))
    assert hit.guard_bound == 0.3 and hit.fallback_step == 0 and hit.save_steps == (5, 10, 25)


# -- calibration: which thresholds and bounds apply ------------------------------------------------

def spec_with(guard):
    return PipelineSpec("m", 4, 8, 8, 8, DIM, 32, 16, thresholds=[[0.9, 40], [0.71, 5]], guard=guard)


GUARD_DATA = {"targets": {
    "0.01": {"thresholds": [[0.95, 25]], "guard": {"bounds": {"25": 0.2}, "probe_k": 5, "fallback": "noise"}},
    "0.05": {"thresholds": [[0.8, 40]], "guard": {"bounds": {"40": 0.5}, "probe_k": 10, "fallback": "probe"}}}}


def test_the_operator_target_picks_the_loosest_calibration_that_meets_it():
    spec = spec_with(GUARD_DATA)
    assert calibration_for(spec, CacheConfig(false_hit_target=0.02)).target == 0.01
    chosen = calibration_for(spec, CacheConfig(false_hit_target=0.05))
    assert chosen.thresholds == ((0.8, 40),) and chosen.policy.bounds == {40: 0.5}
    assert (chosen.policy.probe_k, chosen.policy.fallback) == (10, "probe")
    assert GuardPolicy.from_dict(chosen.policy.as_dict()) == chosen.policy
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
    tensor = lambda value=0.0: np.full((1, *shape), value, np.float32)  # noqa: E731
    inputs = {"HIDDEN_STATES": np.zeros((1, spec.max_length, spec.hidden_dim), np.float32),
              "NEGATIVE_HIDDEN_STATES": np.zeros((1, spec.max_length, spec.hidden_dim), np.float32),
              "LATENTS": tensor(), "START_STEP": np.array([[10]], np.int32),
              "STEPS": np.array([[20]], np.int32), "GUIDANCE_SCALE": np.array([[7.5]], np.float32),
              "SAVE_STEPS": np.array([[5, 10, 15]], np.int32), "DEADLINE_NS": None,
              "PROBE_LATENTS": tensor(), "PROBE_STEP": np.array([[2]], np.int32), "PROBE_DIRECTION": tensor(1.0),
              "PROBE_UNCOND": tensor(), "GUARD_BOUND": np.array([[0.3]], np.float32),
              "FALLBACK_LATENTS": tensor(), "FALLBACK_STEP": np.array([[0]], np.int32)}
    check = step.jobs_for(inputs)[0].check
    assert check.bound == pytest.approx(0.3) and check.probe_step == 2 and check.uncond is None  # zeros: compute
    with pytest.raises(rq.InvalidInput, match="GUARD_BOUND"):
        step.jobs_for({**inputs, "GUARD_BOUND": None})
    with pytest.raises(rq.InvalidInput, match="PROBE_STEP"):
        step.jobs_for({**inputs, "PROBE_STEP": np.array([[10]], np.int32)})
    with pytest.raises(rq.InvalidInput, match="FALLBACK_STEP"):
        step.jobs_for({**inputs, "FALLBACK_STEP": np.array([[5]], np.int32)})
    with pytest.raises(rq.InvalidInput, match="PROBE_DIRECTION"):
        step.jobs_for({**inputs, "PROBE_DIRECTION": np.ones((1, 2, 2, 2), np.float32)})
    assert step.jobs_for({**inputs, "GUARD_BOUND": np.array([[-1.0]], np.float32)})[0].check is None
    out = step.execute([inputs])[0]
    assert out["START_STEP_USED"][0, 0] in (0, 10) and out["GUARD"][0, 0] in (b"passed", b"downgraded:divergence")
    assert out["CHECKPOINT_GUIDES"].shape == (1, 3, 2, *shape)
