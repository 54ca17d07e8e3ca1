"""Keeps a replica's cache in step with the shared tier: one background thread per replica.

The thread tails the shared tier's events stream and applies every admission, eviction and
flush in stream order to the local index (under the cache's lock), batches the uses served
from local copies into the global eviction statistics, and publishes this replica's counters
for the cross-replica stats.

On start, and whenever Redis comes back after an outage, it *resyncs*: it notes the newest
event, reads every entry Redis holds (the replica's catch-up after a restart; Redis's AOF made
them durable), replaces the index's view of the shared tier with it, re-admits what this
replica admitted while Redis was unreachable, and tails from the noted event. After an outage
of the same Redis whose stream still holds every event missed, it resumes instead; a replica so
far behind that the stream was trimmed past its position resyncs.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Dict, Optional

from nirvana.cache.engine import CacheKey, LatentCache
from nirvana.cache.shared import SharedEvent, SharedTier, SharedTierError, percentiles


log = logging.getLogger(__name__)


def _stream_id(text: str):
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


class SharedTierSync:
    """The follower thread of one replica (see the module docstring).

    Args:
        lock: The lock every user of ``cache`` holds.
        block_ms: How long one stream read waits for events: an upper bound of how late another
            replica's admission is indexed here (plus the apply time).
        retry_s: Seconds between reconnection attempts while Redis is unreachable.
        stats_interval_s: How often this replica's counters are published (and the stream's
            trimming checked).
        stats: Returns this replica's counters (the model's request counters).
        log: Where state changes are reported (Triton's logger in the model).
    """

    def __init__(self, cache: LatentCache, tier: SharedTier, lock: threading.Lock, block_ms: int = 100,
                 retry_s: float = 1.0, stats_interval_s: float = 2.0,
                 stats: Optional[Callable[[], Dict[str, object]]] = None,
                 log: Optional[Callable[[str], None]] = None):
        self.cache, self.tier, self.lock = cache, tier, lock
        self.block_ms, self.retry_s, self.stats_interval_s = int(block_ms), float(retry_s), float(stats_interval_s)
        self.stats = stats or (lambda: {})
        self.log = log or (lambda message: None)
        self.position = "0-0"  # the last event applied (or skipped as this replica's own)
        self.last_resync: Dict[str, object] = {}
        # Replication lag of other replicas' events: applied here minus written to Redis (the
        # event id is Redis's clock in ms), recent ones.
        self.lag_ms: "collections.deque[float]" = collections.deque(maxlen=10_000)
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._first_try = threading.Event()  # the first connection attempt ended (either way)
        self._thread: Optional[threading.Thread] = None
        self._reader = None
        self._published_at = 0.0
        self._server_id = ""  # Redis's run_id at the last resync

    def start(self, wait_s: float = 10.0) -> bool:
        """Start following; waits up to ``wait_s`` for the first resync (a restarted replica then
        serves its earlier entries from its first request). False when Redis did not answer (at
        once, or in time): the replica serves from its local cache and catches up once it does."""
        self._thread = threading.Thread(target=self._run, name="nirvana-shared-sync", daemon=True)
        self._thread.start()
        self._first_try.wait(wait_s)
        return self._synced.is_set()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._reader is not None:
            self._reader.close()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def lag_percentiles(self) -> Dict[str, float]:
        """p50/p99 of the replication lag (ms) over recent events from other replicas."""
        lags = {f"lag_ms_{q}": value for q, value in percentiles(self.lag_ms).items()}
        return {**lags, "lag_events": len(self.lag_ms)} if lags else {}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.tier.available:
                    if not self.tier.reconnect():
                        self._first_try.set()
                        self._stop.wait(self.retry_s)
                        continue
                    if self._synced.is_set() and self._can_resume():
                        with self.lock:  # the same Redis, and the stream still has every event missed
                            self.cache.publish_unpublished()
                    else:
                        self._synced.clear()
                if not self._synced.is_set():
                    self.resync()
                    self._first_try.set()
                self._follow()
            except SharedTierError:
                # Redis unreachable: resume or resync once it answers. Another failed call (out of
                # memory, a script error): go on from the same position.
                self._first_try.set()
                self._stop.wait(self.retry_s)
            except Exception as exc:  # noqa: BLE001 - the thread must survive any one bad event
                self.log(f"shared tier sync: {exc!r}; resyncing")
                self._synced.clear()
                self._first_try.set()
                self._stop.wait(self.retry_s)

    def _can_resume(self) -> bool:
        """Whether following on from ``position`` misses nothing: the Redis that answers is the one
        last synced with (a restart, even from its AOF, may have lost the last writes) and its
        stream was not trimmed past the position."""
        if self.tier.server_id() != self._server_id:
            return False
        first = self.tier.first_event_id()
        return first is None or self.position == "0-0" or _stream_id(first) <= _stream_id(self.position)

    def resync(self) -> Dict[str, object]:
        """Catch up with everything Redis holds (see the module docstring)."""
        began = time.perf_counter()
        self._server_id = self.tier.server_id()
        position = self.tier.last_event_id()
        entries = list(self.tier.entries())
        with self.lock:
            report = self.cache.replace_shared_view(entries)
        self.position = position
        self.tier.counters.resyncs += 1
        self.last_resync = {**report, "seconds": round(time.perf_counter() - began, 3), "position": position}
        self._synced.set()
        if self.tier.counters.resyncs > 1:  # the first one is in the model's load report
            log.warning("shared tier sync: caught up with %s: %s", self.tier.redact(self.tier.url), self.last_resync)
        return self.last_resync

    def _follow(self) -> None:
        if self._reader is None:
            self._reader = self.tier.blocking_client(self.block_ms)
        events = self.tier.read_events(self.position, self.block_ms, client=self._reader)
        if events:
            with self.lock:
                for event in events:
                    self._apply(event)
            self.position = events[-1].event_id
        self.tier.flush_uses()
        now = time.monotonic()
        if now - self._published_at >= self.stats_interval_s:
            self._published_at = now
            try:
                with self.lock:
                    stats = self.stats()
            except RuntimeError:  # a counter changed size while copied: publish next time
                stats = None
            if stats is not None:
                self.tier.publish_replica_stats(stats)
            first = self.tier.first_event_id()
            if first is not None and self.position != "0-0" and _stream_id(first) > _stream_id(self.position):
                # Trimmed past this replica's position: events were missed.
                self._synced.clear()

    def _apply(self, event: SharedEvent) -> None:
        # This replica's own changes were applied when made, but are applied again here in stream
        # order (idempotent) so that the index ends where the stream does: after a flush by another
        # replica that this one had not yet read when it admitted, or a resync racing an admission.
        if event.origin != self.tier.replica_id:
            self.lag_ms.append(max(0.0, time.time() * 1000.0 - _stream_id(event.event_id)[0]))
        if event.op == "put" and event.key is not None:
            try:
                key = CacheKey(**event.key)
            except TypeError:
                return  # another version's key: not comparable
            self.cache.apply_shared_put(key, event.embedding, event.steps)
        elif event.op == "forget":
            self.cache.apply_shared_forget(event.digest, event.steps)
        elif event.op == "flush":
            self.cache.flush(event.tenant, shared=False)
        self.tier.counters.events_applied += 1
