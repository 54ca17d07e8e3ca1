"""The step engine (continuous batching) over a tiny diffusers UNet, without Triton."""

import threading
import time

import pytest
import torch

from nirvana.step_engine import (DeadlineExceeded, EngineFailure, EngineUnavailable, Overloaded, RequestCancelled,
                                 ShuttingDown, StepEngine, Ticket)
from nirvana.unet_loop import DenoiseJob, StepRangeLoop

from tests.test_unet_loop import SD_SCHEDULER, job

pytestmark = pytest.mark.timeout(120)


class Answer:
    """Collects a ticket's one answer and fails the test on a second."""

    def __init__(self):
        self.event = threading.Event()
        self.results = self.coalesced = self.error = None
        self.calls = 0
        self.at = None

    def done(self, results, coalesced):
        self._once()
        self.results, self.coalesced = results, coalesced

    def fail(self, exc):
        self._once()
        self.error = exc

    def _once(self):
        self.calls += 1
        assert self.calls == 1, "a ticket was answered twice"
        self.at = time.monotonic()
        self.event.set()

    def wait(self, timeout=60):
        assert self.event.wait(timeout), "no answer"
        return self


def ticket(jobs, answer, **kwargs):
    return Ticket(list(jobs), answer.done, answer.fail, **kwargs)


def digest_job(seed, **kwargs):
    j = job(seed=seed, **kwargs)
    j.digest = f"seed{seed}-{j.start_step}-{j.steps}"
    return j


class SlowUNet:
    """Wraps a UNet: optional delay per call, a gate that can hold a call, and a failure switch."""

    def __init__(self, unet, delay=0.0):
        self.unet, self.delay = unet, delay
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.rows = []

    def __call__(self, sample, timestep, hidden):
        self.rows.append(len(sample))
        self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("UNet exploded")
        if self.delay:
            time.sleep(self.delay)
        return self.unet(sample, timestep, hidden)


@pytest.fixture
def make_engine(tiny_unet):
    engines = []

    def make(scheduler="ddim", delay=0.0, **kwargs):
        unet = SlowUNet(tiny_unet, delay)
        engine = StepEngine(StepRangeLoop(unet, scheduler, SD_SCHEDULER), **kwargs)
        engine.unet = unet
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.unet.gate.set()
        engine.stop()


def wait_until(predicate, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp", "lms"])
def test_a_row_joining_at_any_tick_equals_its_solo_run(tiny_unet, make_engine, scheduler):
    loop = StepRangeLoop(tiny_unet, scheduler, SD_SCHEDULER)
    base = loop.run([job(seed=9)])[0]
    solo = {"long": loop.run([job(seed=1)])[0].latents}
    resumed = job(seed=2, start=10, latents=base.checkpoints[10])
    resumed.history = base.histories[10]
    solo["resumed"] = loop.run([resumed])[0].latents
    engine = make_engine(scheduler)
    for join_at in (1, 7):
        long_answer, short_answer = Answer(), Answer()
        before = engine.stats.ticks
        engine.submit(ticket([job(seed=1)], long_answer))
        assert wait_until(lambda: engine.stats.ticks - before >= join_at)
        late = job(seed=2, start=10, latents=base.checkpoints[10])
        late.history = base.histories[10]
        engine.submit(ticket([late], short_answer))
        long_answer.wait(), short_answer.wait()
        assert long_answer.error is None and short_answer.error is None
        assert torch.max(torch.abs(long_answer.results[0].latents - solo["long"])) <= 1e-4
        assert torch.max(torch.abs(short_answer.results[0].latents - solo["resumed"])) <= 1e-4
        assert short_answer.results[0].steps_run == 10


def test_a_late_short_request_is_answered_before_the_long_one(make_engine):
    engine = make_engine(delay=0.01)
    long_answer, short_answer = Answer(), Answer()
    engine.submit(ticket([job(seed=1, steps=50, save=())], long_answer))
    assert wait_until(lambda: engine.stats.ticks >= 3)
    engine.submit(ticket([job(seed=2, steps=5, save=())], short_answer))
    short_answer.wait(), long_answer.wait()
    assert short_answer.at < long_answer.at
    assert engine.stats.ticks < 50 + 5  # the short one shared the long one's UNet calls
    assert 2 in engine.unet.rows and 4 in engine.unet.rows  # 1 row = 2 UNet rows with guidance; 2 rows = 4


def test_an_exact_hit_is_answered_inside_submit_without_a_tick(make_engine):
    engine = make_engine()
    answer = Answer()
    latents = torch.ones(4, 8, 8)
    engine.submit(ticket([job(start=20, steps=20, latents=latents)], answer))
    assert answer.event.is_set()  # before submit returned
    assert torch.equal(answer.results[0].latents, latents) and answer.results[0].steps_run == 0
    assert engine.stats.ticks == 0 and engine.stats.immediate == 1


def test_overload_is_refused_at_once_and_nothing_is_taken(make_engine):
    engine = make_engine(max_active_rows=1, max_pending_rows=1)
    engine.unet.gate.clear()  # hold the first tick
    first, second, third = Answer(), Answer(), Answer()
    engine.submit(ticket([job(seed=1)], first))
    engine.submit(ticket([job(seed=2)], second))
    with pytest.raises(Overloaded, match="max_active_rows=1, max_pending_rows=1"):
        engine.submit(ticket([job(seed=3)], third))
    assert engine.stats.rejected == 1 and not third.event.is_set()
    exact = Answer()  # nothing to run: still served under overload
    engine.submit(ticket([job(start=20, steps=20)], exact))
    assert exact.event.is_set()
    engine.unet.gate.set()
    assert first.wait().error is None and second.wait().error is None


def test_an_expired_deadline_fails_the_request_and_its_rows_leave(make_engine):
    engine = make_engine(delay=0.02)
    doomed, other = Answer(), Answer()
    engine.submit(ticket([job(seed=1, steps=200, save=())], doomed, deadline=time.monotonic() + 0.3))
    engine.submit(ticket([job(seed=2, steps=30, save=())], other))
    doomed.wait()
    assert isinstance(doomed.error, DeadlineExceeded) and "TIMEOUT_MS" in str(doomed.error)
    assert engine.stats.expired == 1
    assert other.wait().error is None
    assert wait_until(lambda: engine.stats.active_rows == 0)
    assert engine.stats.tick_rows < 200  # the expired row stopped taking batch rows


def test_a_cancelled_request_leaves_the_batch(make_engine):
    engine = make_engine(delay=0.01, cancel_check_ticks=2)
    cancelled = threading.Event()
    answer = Answer()
    engine.submit(ticket([job(seed=1, steps=200, save=())], answer, is_cancelled=cancelled.is_set))
    assert wait_until(lambda: engine.stats.ticks >= 3)
    cancelled.set()
    answer.wait()
    assert isinstance(answer.error, RequestCancelled)
    assert wait_until(lambda: engine.stats.active_rows == 0) and engine.stats.ticks < 50


def test_identical_rows_in_flight_run_once(make_engine):
    engine = make_engine(delay=0.005)
    first, second = Answer(), Answer()
    engine.submit(ticket([digest_job(1)], first))
    assert wait_until(lambda: engine.stats.ticks >= 2)
    engine.submit(ticket([digest_job(1)], second))
    first.wait(), second.wait()
    assert second.coalesced == [True] and first.coalesced == [False]
    assert torch.equal(first.results[0].latents, second.results[0].latents)
    assert engine.stats.tick_rows == 20  # one row, 20 steps: the second ran nothing
    assert engine.stats.coalesced_rows == 1


def test_a_coalesced_row_outlives_its_first_requester(make_engine):
    engine = make_engine(delay=0.01)
    leader, follower = Answer(), Answer()
    engine.submit(ticket([digest_job(1, steps=40)], leader, deadline=time.monotonic() + 0.15))
    engine.submit(ticket([digest_job(1, steps=40)], follower))
    leader.wait(), follower.wait()
    assert isinstance(leader.error, DeadlineExceeded)
    assert follower.error is None and follower.results[0].steps_run == 40


def test_a_unet_error_fails_that_tick_only_and_the_engine_keeps_serving(make_engine):
    engine = make_engine()
    engine.unet.fail_next = True
    broken, fine = Answer(), Answer()
    engine.submit(ticket([job(seed=1)], broken))
    assert "UNet exploded" in str(broken.wait().error)
    engine.submit(ticket([job(seed=2)], fine))
    assert fine.wait().error is None and engine.healthy


def test_a_stuck_tick_fails_held_requests_and_refuses_new_ones_until_it_returns(make_engine):
    engine = make_engine(stuck_tick_s=0.4)
    engine.unet.gate.clear()
    answers = [Answer(), Answer()]
    for i, answer in enumerate(answers):
        engine.submit(ticket([job(seed=i)], answer))
    for answer in answers:
        assert isinstance(answer.wait(10).error, EngineFailure) and "stuck_tick_s" in str(answer.error)
    with pytest.raises(EngineUnavailable, match="stuck_tick_s"):
        engine.submit(ticket([job(seed=5)], Answer()))
    engine.unet.gate.set()  # the tick returns: serving again
    assert wait_until(lambda: engine.healthy)
    engine.stuck_tick_s = 60.0  # a busy machine's slow tick must not count as stuck from here on
    again = Answer()
    engine.submit(ticket([job(seed=6)], again))
    assert again.wait().error is None


def test_stop_fails_every_held_request_once_and_refuses_new_ones(make_engine):
    engine = make_engine(max_active_rows=1)
    engine.unet.gate.clear()
    answers = [Answer() for _ in range(3)]
    for i, answer in enumerate(answers):
        engine.submit(ticket([job(seed=i)], answer))
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    for answer in answers:
        assert isinstance(answer.wait(10).error, ShuttingDown)
    engine.unet.gate.set()
    stopper.join(30)
    with pytest.raises(ShuttingDown):
        engine.submit(ticket([job(seed=9)], Answer()))
    time.sleep(0.2)
    assert all(a.calls == 1 for a in answers)


def test_a_request_with_more_rows_than_a_tick_holds_is_served(make_engine):
    engine = make_engine(max_active_rows=2, max_pending_rows=8)
    answer = Answer()
    engine.submit(ticket([job(seed=i, steps=6, save=()) for i in range(5)], answer))
    assert answer.wait().error is None and len(answer.results) == 5
    assert max(engine.unet.rows) <= 4  # 2 rows x (uncond + cond)


def test_a_ticket_without_rows_is_answered_once(make_engine):
    engine = make_engine()
    answer = Answer()
    engine.submit(ticket([], answer))
    assert answer.event.is_set() and answer.results == [] and answer.error is None
