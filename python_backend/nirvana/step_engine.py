"""Step-level ("continuous") batching of the denoising loop: one running batch per model instance.

A background thread calls :meth:`StepRangeLoop.tick` over every active row, each at its own
timestep. A request (a :class:`Ticket`: the rows of one Triton request plus how to answer it)
joins at the next tick and is answered the moment its own last row finishes, while the other
rows keep running. So a request resuming from a cached state at step K costs N-K ticks of the
batch and frees its slot as soon as it is done: every step the cache saves becomes a free row
for another request, which is the whole point of NIRVANA's approximate caching.

What the engine guarantees (each is tested):

* Exactly one answer per ticket, on every path: done, bad input, UNet error, deadline,
  cancellation, overload, engine stuck or dead, shutdown (:meth:`StepEngine.stop`).
* Admission control: at most ``max_active_rows`` rows per tick and ``max_pending_rows``
  waiting; past that :meth:`StepEngine.submit` raises :class:`Overloaded` at once (Triton's
  own queue limits cannot see requests held here).
* A ticket with nothing to run (an exact hit: START_STEP == STEPS) is answered inside
  :meth:`submit`, without waiting for a tick.
* Identical rows in flight (same :attr:`DenoiseJob.digest`: same latents, prompt states, step
  range, guidance, saved steps) are computed once ("coalesced"); later ones get the result of
  the first, and a computation leaves the batch only when no ticket wants it any more.
* Deadlines are checked every tick and ``is_cancelled`` every ``cancel_check_ticks`` ticks; an
  expired or cancelled ticket is answered at once and its rows leave at the next tick.
* A watchdog fails every held ticket when the loop thread dies or one tick runs longer than
  ``stuck_tick_s``, instead of letting clients hang.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

from nirvana.unet_loop import DenoiseJob, DenoiseResult, StepRangeLoop


class EngineUnavailable(RuntimeError):
    """The engine cannot take or finish a request now (Triton UNAVAILABLE): the client may retry."""


class Overloaded(EngineUnavailable):
    """Active rows and the pending queue are full."""


class DeadlineExceeded(EngineUnavailable):
    """The request's deadline (TIMEOUT_MS) passed before its last step."""


class ShuttingDown(EngineUnavailable):
    """The model is being unloaded."""


class RequestCancelled(RuntimeError):
    """The client cancelled the request (Triton CANCELLED)."""


class EngineFailure(RuntimeError):
    """The loop thread died or got stuck (Triton INTERNAL)."""


@dataclass
class Ticket:
    """One Triton request held by the engine.

    Attributes:
        jobs: Its rows.
        on_done: Called once with the rows' results and, per row, whether it was coalesced
            with an identical row already in flight (it then ran no step of its own).
        on_error: Called once with the exception that ends the request instead.
        deadline: ``time.monotonic()`` value after which the request fails; None for none.
        is_cancelled: Asks whether the client gave up (Triton's response sender); polled
            every ``cancel_check_ticks`` ticks.
    """

    jobs: Sequence[DenoiseJob]
    on_done: Callable[[List[DenoiseResult], List[bool]], None]
    on_error: Callable[[BaseException], None]
    deadline: Optional[float] = None
    is_cancelled: Optional[Callable[[], bool]] = None
    results: List[Optional[DenoiseResult]] = field(default_factory=list, repr=False)
    coalesced: List[bool] = field(default_factory=list, repr=False)
    remaining: int = 0
    answered: bool = False

    def __post_init__(self):
        self.results = [None] * len(self.jobs)
        self.coalesced = [False] * len(self.jobs)
        self.remaining = len(self.jobs)
        self._once = threading.Lock()

    def claim(self) -> bool:
        """True exactly once: whoever gets it sends the one answer."""
        with self._once:
            if self.answered:
                return False
            self.answered = True
            return True


class _Computation:
    """One row being denoised, and the tickets (rows) waiting for its result."""

    def __init__(self, job: DenoiseJob):
        self.job = job
        self.active = None  # the loop's bookkeeping, made when the row joins the batch
        self.subscribers: List[tuple] = []  # (ticket, row index)


@dataclass
class EngineStats:
    """Cumulative counters and current gauges, for metrics."""

    ticks: int = 0
    tick_rows: int = 0  # sum over ticks of rows in the tick: tick_rows / ticks = mean batch rows
    tick_seconds: float = 0.0
    requests: int = 0
    completed: int = 0
    immediate: int = 0  # answered without a tick (exact hits)
    coalesced_rows: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    failed: int = 0
    active_rows: int = 0
    pending_rows: int = 0


class StepEngine:
    """Runs :class:`StepRangeLoop` ticks in a background thread over a changing set of rows.

    Args:
        loop: The step loop (UNet function and scheduler).
        max_active_rows: Most rows per tick.
        max_pending_rows: Most rows waiting to join; past it, :meth:`submit` raises Overloaded.
        cancel_check_ticks: Poll tickets' ``is_cancelled`` every this many ticks.
        stuck_tick_s: Fail every held ticket when a tick runs longer than this (0: never).
        on_idle_or_tick: Called from the loop thread after every tick (at most every 0.25 s) and
            when it goes idle, e.g. to publish metrics. Its failures never stop the loop; the
            first one goes to ``log_error``.
        log_error: Where to report a failing ``on_idle_or_tick`` (e.g. Triton's logger).
    """

    def __init__(self, loop: StepRangeLoop, max_active_rows: int = 8, max_pending_rows: int = 64,
                 cancel_check_ticks: int = 4, stuck_tick_s: float = 120.0,
                 on_idle_or_tick: Optional[Callable[["StepEngine"], None]] = None,
                 log_error: Optional[Callable[[str], None]] = None):
        self.loop = loop
        self.max_active_rows = max_active_rows
        self.max_pending_rows = max_pending_rows
        self.cancel_check_ticks = max(1, cancel_check_ticks)
        self.stuck_tick_s = stuck_tick_s
        self.on_idle_or_tick = on_idle_or_tick
        self.log_error = log_error
        self.hook_failures = 0
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._pending: Deque[_Computation] = collections.deque()
        self._active: List[_Computation] = []
        self._joining = 0  # rows taken from the queue whose schedulers are being set up
        self._in_flight: Dict[str, _Computation] = {}  # digest -> computation (pending or active)
        self._tickets: Dict[int, Ticket] = {}
        self._stopped = False
        self._unhealthy: Optional[str] = None  # why new requests are refused
        self._stuck = False  # _unhealthy because the running tick overran: cleared when it returns
        self._hooked_at = 0.0
        self._tick_started: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="unet-step-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="unet-step-watchdog", daemon=True)
        self._watchdog.start()

    # -- requests --------------------------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        """Hold ``ticket`` until its rows are done; answers at once when there is nothing to run.

        Raises:
            Overloaded: The active rows and the pending queue are full (nothing was taken).
            EngineUnavailable: The engine is stopping, stuck or dead.
            ValueError: A row's step range is invalid (from the loop's scheduler set-up).
        """
        immediate: List[int] = []
        if not ticket.jobs:  # nothing at all to run: still exactly one answer
            if ticket.claim():
                ticket.on_done([], [])
            return
        with self._cv:
            self._check_health()
            new_rows = [job for job in ticket.jobs if job.start_step < job.steps and
                        (job.digest is None or job.digest not in self._in_flight)]
            unique = len({id(j) if j.digest is None else j.digest for j in new_rows})
            in_flight = len(self._active) + len(self._pending) + self._joining
            if unique and in_flight + unique > self.max_active_rows + self.max_pending_rows:
                self.stats.rejected += 1
                raise Overloaded(
                    f"unet_loop is at capacity: {len(self._active)} rows active, {len(self._pending)} pending, "
                    f"this request adds {unique} (max_active_rows={self.max_active_rows}, "
                    f"max_pending_rows={self.max_pending_rows}); retry later")
            self.stats.requests += 1
            for row, job in enumerate(ticket.jobs):
                if job.start_step >= job.steps:
                    immediate.append(row)
                    continue
                computation = self._in_flight.get(job.digest) if job.digest is not None else None
                if computation is None:
                    computation = _Computation(job)
                    if job.digest is not None:
                        self._in_flight[job.digest] = computation
                    self._pending.append(computation)
                else:
                    ticket.coalesced[row] = True
                    self.stats.coalesced_rows += 1
                computation.subscribers.append((ticket, row))
            if len(immediate) < len(ticket.jobs):
                self._tickets[id(ticket)] = ticket
            self._update_gauges()
            self._cv.notify()
        for row in immediate:  # exact hits: the starting latents are the result
            job = ticket.jobs[row]
            self._deliver(ticket, row, DenoiseResult(latents=job.latents))
        if immediate and len(immediate) == len(ticket.jobs):
            self.stats.immediate += 1

    def _check_health(self) -> None:
        if self._stopped:
            raise ShuttingDown("unet_loop is shutting down")
        if self._unhealthy:
            raise EngineUnavailable(f"unet_loop engine is unavailable: {self._unhealthy}")
        if not self._thread.is_alive():
            raise EngineFailure("unet_loop engine thread is not running")

    def _deliver(self, ticket: Ticket, row: int, result: DenoiseResult) -> None:
        """Record one row's result; answer the ticket when it was its last row."""
        with self._cv:
            if ticket.answered or ticket.results[row] is not None:
                return
            ticket.results[row] = result
            ticket.remaining -= 1
            done = ticket.remaining == 0
            if done:
                self._tickets.pop(id(ticket), None)
        if done and ticket.claim():
            self.stats.completed += 1
            try:
                ticket.on_done(list(ticket.results), list(ticket.coalesced))
            except Exception as exc:  # noqa: BLE001 - building the response failed: answer with that
                _safe(ticket.on_error, exc)

    def _fail(self, ticket: Ticket, exc: BaseException, counter: str = "failed") -> bool:
        """Answer ``ticket`` with ``exc`` and withdraw its rows (computations nobody wants leave).

        Returns:
            False when the ticket had been answered already (nothing is sent twice).
        """
        with self._cv:
            self._tickets.pop(id(ticket), None)
            for computation in list(self._pending) + self._active:
                computation.subscribers = [(t, r) for t, r in computation.subscribers if t is not ticket]
            self._drop_unwanted()
        if not ticket.claim():
            return False
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        _safe(ticket.on_error, exc)
        return True

    def _drop_unwanted(self) -> None:
        """(Under the lock.) Remove computations that no ticket waits for any more."""
        for queue in (self._pending, self._active):
            for computation in [c for c in queue if not c.subscribers]:
                queue.remove(computation)
                self._forget(computation)
        self._update_gauges()

    def _forget(self, computation: _Computation) -> None:
        """(Under the lock.) A computation leaves: identical rows may no longer join it."""
        if computation.job.digest is not None:
            self._in_flight.pop(computation.job.digest, None)

    def _update_gauges(self) -> None:
        self.stats.active_rows = len(self._active)
        self.stats.pending_rows = len(self._pending)

    # -- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        ticks = 0
        while True:
            with self._cv:
                idle = not self._pending and not self._active
            if idle:
                self._notify_hook()  # gauges drop to zero when the batch empties
            with self._cv:
                while not self._pending and not self._active and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                joining = []
                while self._pending and len(self._active) + len(joining) < self.max_active_rows:
                    joining.append(self._pending.popleft())
                self._joining = len(joining)
            for computation in joining:  # scheduler set-up outside the lock
                try:
                    computation.active = self.loop.start(computation.job)
                except Exception as exc:  # noqa: BLE001 - that row's tickets fail, the loop goes on
                    with self._cv:
                        self._joining -= 1
                    self._fail_computation(computation, exc)
                    continue
                with self._cv:
                    self._joining -= 1
                    computation.subscribers = [(t, r) for t, r in computation.subscribers if not t.answered]
                    if computation.subscribers:
                        self._active.append(computation)
                    else:
                        self._forget(computation)
            ticks += 1
            self._expire(poll_cancellation=ticks % self.cancel_check_ticks == 0)
            with self._cv:
                running = [c for c in self._active if not c.active.done]
                self._update_gauges()
                self._tick_started = time.monotonic()
            if running:
                try:
                    self.loop.tick([c.active for c in running])
                except Exception as exc:  # noqa: BLE001 - every row of this tick fails, the loop goes on
                    for computation in running:
                        self._fail_computation(computation, exc)
                finally:
                    with self._cv:
                        elapsed = time.monotonic() - self._tick_started
                        self._tick_started = None
                        self.stats.ticks += 1
                        self.stats.tick_rows += len(running)
                        self.stats.tick_seconds += elapsed
                        if self._stuck:
                            self._stuck = False
                            self._unhealthy = None  # the stuck tick returned: serve again
            self._finish_done()
            self._notify_hook(throttle_s=0.25)

    def _finish_done(self) -> None:
        with self._cv:
            done = [c for c in self._active if c.active is not None and c.active.done]
            for computation in done:
                self._active.remove(computation)
                self._forget(computation)
            self._update_gauges()
        for computation in done:
            result = self.loop.finish(computation.active)
            for ticket, row in computation.subscribers:
                self._deliver(ticket, row, result)

    def _fail_computation(self, computation: _Computation, exc: BaseException) -> None:
        with self._cv:
            tickets = {id(t): t for t, _ in computation.subscribers}
        for ticket in tickets.values():
            self._fail(ticket, exc)

    def _expire(self, poll_cancellation: bool) -> None:
        """Fail tickets whose deadline passed, and (when polling) those the client cancelled."""
        now = time.monotonic()
        with self._cv:
            tickets = list(self._tickets.values())
        for ticket in tickets:
            if ticket.deadline is not None and now > ticket.deadline:
                self._fail(ticket, DeadlineExceeded("TIMEOUT_MS: the request's deadline passed before its last "
                                                    "denoising step; its rows left the batch"), "expired")
            elif poll_cancellation and ticket.is_cancelled is not None:
                try:
                    cancelled = ticket.is_cancelled()
                except Exception:  # noqa: BLE001 - cannot tell: keep serving it
                    cancelled = False
                if cancelled:
                    self._fail(ticket, RequestCancelled("the request was cancelled by the client"), "cancelled")

    def _notify_hook(self, throttle_s: float = 0.0) -> None:
        if self.on_idle_or_tick is None:
            return
        now = time.monotonic()
        if throttle_s and now - self._hooked_at < throttle_s:
            return
        self._hooked_at = now
        try:
            self.on_idle_or_tick(self)
        except Exception as exc:  # noqa: BLE001 - metrics must never stop the loop
            self.hook_failures += 1
            if self.hook_failures == 1 and self.log_error is not None:
                self.log_error(f"unet_loop step engine: publishing metrics failed (reported once): {exc!r}")

    # -- health and shutdown ---------------------------------------------------------------------

    def _watch(self) -> None:
        interval = min(1.0, self.stuck_tick_s / 4) if self.stuck_tick_s else 1.0
        while True:
            time.sleep(interval)
            with self._cv:
                if self._stopped:
                    return
                started = self._tick_started
                stuck = (self.stuck_tick_s and started is not None and
                         time.monotonic() - started > self.stuck_tick_s)
                dead = not self._thread.is_alive()
                if stuck and not self._unhealthy:
                    self._stuck = True
                    self._unhealthy = f"a tick ran for over {self.stuck_tick_s:g} s (stuck_tick_s)"
                elif dead:
                    self._unhealthy = "the loop thread died"
                else:
                    continue
                reason = self._unhealthy
            self.fail_all(EngineFailure(f"unet_loop engine failed: {reason}; held requests were failed"))

    def fail_all(self, exc: BaseException) -> int:
        """Answer every held ticket with ``exc``; returns how many."""
        with self._cv:
            tickets = list(self._tickets.values())
        return sum(self._fail(ticket, exc) for ticket in tickets)

    @property
    def healthy(self) -> bool:
        return not self._stopped and not self._unhealthy and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> int:
        """Refuse new tickets, fail every held one with :class:`ShuttingDown`, end the threads.

        Returns:
            How many held tickets were failed.
        """
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        failed = self.fail_all(ShuttingDown("unet_loop is shutting down; the request was not finished"))
        self._thread.join(timeout)
        return failed


def _safe(callback: Callable[[BaseException], None], exc: BaseException) -> None:
    """Call an error callback; its own failure must not kill the loop thread."""
    try:
        callback(exc)
    except Exception:  # noqa: BLE001 - nothing more can be sent for this request
        pass
