"""The unet_loop model's logic (UNetLoopStep) over the exported UNet, without Triton: step and
execute batching give the same outputs; every request gets exactly one answer."""

import threading
import time

import numpy as np
import pytest

from nirvana.config import PipelineSpec, UNetLoopConfig
from nirvana.pipeline import UNetLoopStep
from nirvana.inputs import InvalidInput
from nirvana.step_engine import DeadlineExceeded

pytestmark = pytest.mark.timeout(120)


class Responder:
    def __init__(self):
        self.answers = []
        self.event = threading.Event()

    def send(self, outputs):
        self.answers.append(outputs)
        self.event.set()

    def fail(self, exc):
        self.answers.append(exc)
        self.event.set()

    def is_cancelled(self):
        return False

    def wait(self):
        assert self.event.wait(60)
        time.sleep(0.05)
        assert len(self.answers) == 1, "answered more than once"
        return self.answers[0]


def request(spec, seed, steps=6, start=0, deadline_ns=0):
    rng = np.random.default_rng(seed)
    return {"HIDDEN_STATES": rng.standard_normal((1, spec.max_length, spec.hidden_dim), dtype=np.float32),
            "NEGATIVE_HIDDEN_STATES": rng.standard_normal((1, spec.max_length, spec.hidden_dim), dtype=np.float32),
            "LATENTS": rng.standard_normal((1, *spec.latent_shape), dtype=np.float32),
            "START_STEP": np.array([[start]], np.int32), "STEPS": np.array([[steps]], np.int32),
            "GUIDANCE_SCALE": np.array([[7.5]], np.float32), "SAVE_STEPS": np.array([[2, 4, 0]], np.int32),
            "DEADLINE_NS": np.array([[deadline_ns]], np.int64)}


@pytest.fixture(scope="module")
def steps(repository):
    directory = repository / "unet_loop" / "1"
    step_mode = UNetLoopStep(directory, UNetLoopConfig(batching="step"))
    execute_mode = UNetLoopStep(directory, UNetLoopConfig(batching="execute"))
    yield step_mode, execute_mode, PipelineSpec.load(directory)
    step_mode.stop()


def test_step_and_execute_batching_give_the_same_outputs(steps):
    step_mode, execute_mode, spec = steps
    requests = [request(spec, seed) for seed in range(3)]
    expected = execute_mode.execute(requests)
    responders = [Responder() for _ in requests]
    for inputs, responder in zip(requests, responders):
        step_mode.submit(inputs, responder)
    for want, responder in zip(expected, responders):
        got = responder.wait()
        assert set(got) == {"FINAL_LATENTS", "CHECKPOINTS", "CHECKPOINT_STEPS", "CHECKPOINT_GUIDES", "COALESCED",
                            "START_STEP_USED", "GUARD"}
        np.testing.assert_allclose(got["FINAL_LATENTS"], want["FINAL_LATENTS"], atol=1e-4)
        assert got["CHECKPOINT_STEPS"].tolist() == [[2, 4, 0]] == want["CHECKPOINT_STEPS"].tolist()
        assert got["COALESCED"].tolist() == [[False]] == want["COALESCED"].tolist()


def test_identical_requests_are_coalesced_and_exact_hits_answered_at_once(steps):
    step_mode, _, spec = steps
    first, second, exact = Responder(), Responder(), Responder()
    step_mode.submit(request(spec, 7, steps=20), first)
    step_mode.submit(request(spec, 7, steps=20), second)
    step_mode.submit(request(spec, 8, steps=6, start=6), exact)
    assert exact.event.is_set()  # nothing to run: answered inside submit
    a, b = first.wait(), second.wait()
    assert a["COALESCED"].tolist() == [[False]] and b["COALESCED"].tolist() == [[True]]
    np.testing.assert_array_equal(a["FINAL_LATENTS"], b["FINAL_LATENTS"])


def test_bad_input_and_a_passed_deadline_are_refused_before_anything_is_held(steps):
    step_mode, _, spec = steps
    bad = request(spec, 1)
    bad["START_STEP"] = np.array([[9]], np.int32)
    with pytest.raises(InvalidInput, match=r"START_STEP: 9 is outside 0..STEPS \(6\)"):
        step_mode.submit(bad, Responder())
    missing = request(spec, 1)
    missing["LATENTS"] = None
    with pytest.raises(InvalidInput, match="LATENTS: is required"):
        step_mode.submit(missing, Responder())
    late = request(spec, 1, deadline_ns=time.time_ns() - 1)
    with pytest.raises(DeadlineExceeded, match="TIMEOUT_MS"):
        step_mode.submit(late, Responder())
    expiring = Responder()
    step_mode.submit(request(spec, 2, steps=200, deadline_ns=time.time_ns() + 200_000_000), expiring)
    assert isinstance(expiring.wait(), DeadlineExceeded)


@pytest.mark.parametrize("scheduler", ["dpmpp", "lms"])
def test_a_multistep_solver_neither_hands_out_states_nor_resumes_from_one(repository, scheduler):
    directory = repository / "unet_loop" / "1"
    step = UNetLoopStep(directory, UNetLoopConfig(batching="execute", scheduler=scheduler))
    spec = PipelineSpec.load(directory)
    assert not step.resumes_from_cache
    full, exact = step.execute([request(spec, 1), request(spec, 2, start=6)])
    assert full["CHECKPOINT_STEPS"].tolist() == [[0, 0, 0]]  # nothing to admit but the final latents
    assert exact["FINAL_LATENTS"].shape == full["FINAL_LATENTS"].shape  # an exact hit still passes
    with pytest.raises(InvalidInput, match=rf"START_STEP: unet_loop's scheduler '{scheduler}' cannot resume"):
        step.jobs_for(request(spec, 3, start=2))


def test_stateless_schedulers_resume_from_cache(steps):
    step_mode, execute_mode, _ = steps
    assert step_mode.resumes_from_cache and execute_mode.resumes_from_cache
