"""Durability of a :class:`~nirvana.cache.engine.LatentCache` off the request path.

A snapshot (see :mod:`nirvana.cache.snapshot`) plus the journal of every change since
(see :mod:`nirvana.cache.journal`), like Redis's RDB + AOF:

* **restore** loads the newest valid snapshot into the (possibly differently configured)
  cache, then replays the journal segments that follow it. It never raises: whatever
  cannot be read is reported and skipped, and the worst case is an empty cache.
* while serving, the cache reports each change to the journal (queued; the writer thread
  does the I/O). With ``appendfsync=always`` an admission waits for its fsync
  (:meth:`CachePersistence.sync`) before it is acknowledged.
* **compaction** runs in a background thread every ``interval_s``: the cache is captured
  under its lock (metadata copies and references to the stored tensors, no I/O), the
  journal moves to a new segment at the same instant, and the snapshot is written without
  the lock. Once it is CURRENT the older segments are deleted.

Requests wait only for the capture, never for a snapshot being written.
"""

from __future__ import annotations

import fcntl
import gc
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from nirvana.cache.engine import LatentCache
from nirvana.cache.journal import Journal, read_segment, segments
from nirvana.cache.snapshot import KEEP, Snapshot, read_snapshot, write_snapshot


class CachePersistence:
    """Restore, journal and compaction of one cache under ``root``.

    Args:
        lock: The lock every user of ``cache`` holds (the cache is not thread-safe).
        appendfsync: ``always``, ``everysec`` or ``off`` (see :mod:`nirvana.cache.journal`).
        interval_s: Seconds between compactions (only when something changed); < 0: only at
            :meth:`close`; 0: after every change (tests).
        log: Where problems found in the background are reported (the Triton logger in the model).
    """

    def __init__(self, cache: LatentCache, root: Path, lock: threading.Lock, appendfsync: str = "everysec",
                 interval_s: float = 60.0, log: Optional[Callable[[str], None]] = None):
        self.cache = cache
        self.root = Path(root)
        self.lock = lock
        self.appendfsync = appendfsync
        self.interval_s = interval_s
        self.log = log or (lambda message: None)
        self.journal: Optional[Journal] = None
        self.last_compaction: Dict[str, object] = {}
        self.compactions = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._compacting = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._lock_fd: Optional[int] = None
        self._journal_from = 0  # where the restored snapshot's journal starts
        self.failed: Optional[str] = None  # why persistence stopped (then the cache serves on without it)

    def acquire(self, timeout_s: float = 30.0) -> bool:
        """Take the directory's exclusive lock (``LOCK``, flock: released by the kernel when the
        process dies), waiting up to ``timeout_s`` for a previous owner (a model instance being
        replaced) to let go. Two live writers would interleave journals and delete each other's
        segments, so without the lock there is no persistence."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.2)

    # -- start-up ------------------------------------------------------------------------------------

    def restore(self) -> Dict[str, object]:
        """Load the snapshot and replay the journal into the cache; never raises.

        Returns:
            snapshot (name or None), entries and states in the cache afterwards, what was
            dropped and why, journal records replayed, and every problem found."""
        report: Dict[str, object] = {"snapshot": None, "entries": 0, "states": 0, "journal_records": 0,
                                     "dropped_by_budget": 0, "dropped_other_steps": 0, "problems": []}
        problems: List[str] = report["problems"]  # type: ignore[assignment]
        try:
            loaded = read_snapshot(self.root)
            problems += loaded.problems
            report["snapshot"] = loaded.name
            self._journal_from = loaded.snapshot.journal_from
            imported = self.cache.import_entries(loaded.snapshot.records, loaded.snapshot.clock)
            problems += imported.problems
            report["dropped_by_budget"] = imported.dropped_by_budget
            report["dropped_other_steps"] = imported.dropped_other_steps
            for seq, path in segments(self.root):
                if seq < loaded.snapshot.journal_from:
                    continue
                changes, stopped = read_segment(path)
                if stopped:
                    problems.append(stopped)
                for change in changes:
                    self._apply(change, report)
                report["journal_records"] = int(report["journal_records"]) + len(changes)
        except Exception as exc:  # noqa: BLE001 - a restore must never fail the model load
            problems.append(f"restore failed ({type(exc).__name__}: {exc}); starting with an empty cache")
            self.cache.flush()
        stats = self.cache.stats()
        report["entries"], report["states"] = stats["entries"], stats["states"]
        return report

    def _apply(self, change: tuple, report: Dict[str, object]) -> None:
        op = change[0]
        if op == "put":
            imported = self.cache.import_entries([change[1]], merge=True)
            report["dropped_by_budget"] = int(report["dropped_by_budget"]) + imported.dropped_by_budget
            report["dropped_other_steps"] = int(report["dropped_other_steps"]) + imported.dropped_other_steps
            report["problems"] += imported.problems  # type: ignore[operator]
        elif op == "forget":
            self.cache.forget(change[1], change[2])
        elif op == "flush":
            self.cache.flush(change[1])

    def start(self) -> None:
        """Journal every change from now on and compact in the background."""
        numbers = [seq for seq, _ in segments(self.root)]
        # Past every segment on disk and past the one the restored snapshot's journal starts at:
        # a kill inside a compaction can leave that segment not yet created (older ones already
        # deleted), and records written below it would be skipped by the next restore.
        first = max(max(numbers, default=0), self._journal_from - 1) + 1
        self.journal = Journal(self.root, self.appendfsync, first_segment=first)
        self.cache.listener = self._on_change
        if self.interval_s >= 0:
            self._thread = threading.Thread(target=self._run, name="nirvana-compaction", daemon=True)
            self._thread.start()

    # -- serving -------------------------------------------------------------------------------------

    def _on_change(self, change: tuple) -> None:
        try:
            self.journal.append(change)
        except RuntimeError as exc:  # the writer died (disk full, I/O error)
            self._give_up(exc)
            return
        if self.interval_s == 0:
            self._wake.set()

    def _give_up(self, exc: BaseException) -> None:
        """Persistence failed: say so once and keep serving without it (a cache that cannot be
        written to disk is still a cache; the requests must not fail for it)."""
        if self.failed is None:
            self.failed = f"{type(exc).__name__}: {exc}"
            self.cache.listener = None
            self.log(f"latent_cache: persistence under {self.root} failed ({self.failed}); serving on WITHOUT "
                     f"persistence until the model is reloaded")

    def sync(self) -> None:
        """With ``always``: wait until every change so far is fsynced (call it before
        acknowledging an admission, without the cache's lock). Otherwise a no-op."""
        if self.journal is not None and self.appendfsync == "always" and self.failed is None:
            try:
                self.journal.sync()
            except (RuntimeError, TimeoutError) as exc:
                self._give_up(exc)

    def compact(self, keep: Optional[int] = None) -> Optional[Path]:
        """Snapshot the cache now and drop the journal segments it makes redundant.

        Args:
            keep: Snapshots left on disk (1 after a flush, so flushed states do not linger).
        Returns:
            The snapshot folder."""
        with self._compacting:  # one compaction at a time (background, admin, shutdown)
            began = time.perf_counter()
            with self.lock:
                records = self.cache.export_entries()
                clock = self.cache.clock
                journal_from = self.journal.rotate() if self.journal is not None else 0
            captured = time.perf_counter()
            path = write_snapshot(Snapshot(records, clock, journal_from), self.root, KEEP if keep is None else keep)
            written = {"entries": len(records), "states": sum(len(r.states) for r in records)}
            del records  # only the cache holds its states now, before they are frozen
            # The cache's objects are long-lived and free themselves by reference counting (no
            # cycles): moving them out of the collector's view keeps a full collection (141 ms at
            # 10,000 states, holding the GIL) from stalling the request threads.
            gc.freeze()
            if self.journal is not None:
                self.journal.remove_before(journal_from)
            self.compactions += 1
            self.last_compaction = {"snapshot": path.name, **written, "capture_seconds": captured - began,
                                    "write_seconds": time.perf_counter() - captured}
            return path

    def _dirty(self) -> bool:
        return self.journal is not None and self.failed is None and self.journal.records_since_rotate > 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.interval_s if self.interval_s > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._dirty():
                try:
                    self.compact()
                except Exception as exc:  # noqa: BLE001 - the journal still holds every change
                    self.log(f"latent_cache: background snapshot failed ({type(exc).__name__}: {exc}); "
                             f"the journal keeps every change, retrying in {self.interval_s:.0f}s")

    def stats(self) -> Dict[str, object]:
        return {"root": str(self.root), "appendfsync": self.appendfsync, "interval_s": self.interval_s,
                "compactions": self.compactions, "last_compaction": self.last_compaction, "failed": self.failed,
                "journal_segment": self.journal.segment if self.journal else None,
                "journal_records_since_snapshot": self.journal.records_since_rotate if self.journal else 0}

    def close(self, final_snapshot: bool = True) -> None:
        """Stop the background compaction, write a final snapshot (unless ``final_snapshot`` is
        False: what a crash leaves, for tests), close the journal and release the directory."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        try:
            if final_snapshot and self._dirty():
                self.compact()
        finally:
            if self.journal is not None:
                self.cache.listener = None
                try:
                    self.journal.close()
                except RuntimeError as exc:  # its writer had failed: already reported
                    self._give_up(exc)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
