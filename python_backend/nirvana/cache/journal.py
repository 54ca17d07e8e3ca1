"""Append-only journal of cache changes, written by a background thread.

Between two snapshots every admission ("put": the entry, one state and its statistics),
eviction ("forget") and flush is appended to ``journal-<n>.log`` under the snapshot root,
so a restart loses nothing a snapshot has not caught yet. Requests never write to disk
themselves: they queue the change, and the writer thread serializes and writes it. How
soon it is on disk is the ``appendfsync`` setting, as in Redis:

``always``
    :meth:`Journal.sync` (called by an admission before it is acknowledged) waits until
    every change queued so far is fsynced. Concurrent admissions share one fsync (group
    commit). An acknowledged admission survives kill -9 and power loss.
``everysec``
    The writer fsyncs at most once a second: a crash loses at most the last second.
``off``
    Written to the OS at once, fsynced when the OS decides: a process crash loses nothing
    written, a power loss may lose more.

Record format (little endian): ``length u32, crc32 u32, payload``; the payload is
``json length u32, json, raw bytes`` (the state tensor, then the entry embedding, for a
"put"). A torn or corrupt record (a crash while writing) ends the replay of its segment:
everything before it is applied, nothing after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from nirvana.cache.engine import CacheKey, EntryRecord, StateRecord
from nirvana.cache.policy import StateStats

APPENDFSYNC = ("always", "everysec", "off")
MAGIC = b"NIRVANA-JOURNAL 1\n"
_HEADER = struct.Struct("<II")
_JSON_LEN = struct.Struct("<I")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def segment_path(root: Path, seq: int) -> Path:
    return Path(root) / f"journal-{seq:08d}.log"


def segments(root: Path) -> List[Tuple[int, Path]]:
    """The journal segments under ``root``, oldest first."""
    out = []
    for path in Path(root).glob("journal-*.log"):
        try:
            out.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return sorted(out)


def encode(change: tuple) -> bytes:
    """One change (as :attr:`LatentCache.listener` reports it) as a journal record."""
    op = change[0]
    blobs = b""
    if op == "put":
        record: EntryRecord = change[1]
        state = record.states[0]
        tensor = state.tensor.detach().to("cpu").contiguous()
        # bfloat16 has no numpy dtype: its bytes travel as int16.
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        data = raw.numpy().tobytes()
        embedding = np.asarray(record.embedding, np.float32).tobytes()
        meta = {"op": op, "id": record.entry_id, "key": dataclasses.asdict(record.key), "step": state.step,
                "stats": dataclasses.asdict(state.stats), "dtype": str(tensor.dtype).replace("torch.", ""),
                "shape": list(tensor.shape), "state_bytes": len(data)}
        blobs = data + embedding
    elif op == "forget":
        meta = {"op": op, "id": change[1], "step": change[2]}
    elif op == "flush":
        meta = {"op": op, "tenant": change[1]}
    else:
        raise ValueError(f"unknown journal change {op!r}")
    text = json.dumps(meta).encode()
    payload = _JSON_LEN.pack(len(text)) + text + blobs
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> tuple:
    """The change a record's payload holds (the inverse of :func:`encode`)."""
    (n,) = _JSON_LEN.unpack_from(payload)
    meta = json.loads(payload[4:4 + n])
    if meta["op"] != "put":
        return (meta["op"], meta["id"], meta["step"]) if meta["op"] == "forget" else ("flush", meta["tenant"])
    blobs = payload[4 + n:]
    dtype = _DTYPES[meta["dtype"]]
    state_bytes = blobs[:meta["state_bytes"]]
    if dtype == torch.bfloat16:
        tensor = torch.from_numpy(np.frombuffer(state_bytes, np.int16).copy()).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.frombuffer(state_bytes, np.dtype(meta["dtype"])).copy())
    tensor = tensor.reshape(meta["shape"])
    embedding = np.frombuffer(blobs[meta["state_bytes"]:], np.float32).copy()
    record = EntryRecord(int(meta["id"]), CacheKey(**meta["key"]), embedding,
                         [StateRecord(int(meta["step"]), StateStats(**meta["stats"]), tensor)])
    return ("put", record)


def read_segment(path: Path) -> Tuple[List[tuple], Optional[str]]:
    """The changes in one segment, and why reading stopped early (None: read to the end)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        return [], f"{Path(path).name}: not a journal of this format; ignored"
    changes, at = [], len(MAGIC)
    while at < len(data):
        if at + _HEADER.size > len(data):
            return changes, f"{Path(path).name}: torn record header at byte {at}; the rest ignored"
        length, crc = _HEADER.unpack_from(data, at)
        payload = data[at + _HEADER.size:at + _HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            return changes, f"{Path(path).name}: torn or corrupt record at byte {at}; the rest ignored"
        try:
            changes.append(decode(payload))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            return changes, f"{Path(path).name}: unreadable record at byte {at} ({exc}); the rest ignored"
        at += _HEADER.size + length
    return changes, None


class Journal:
    """The writer of the journal segments under ``root`` (see the module docstring).

    Args:
        appendfsync: ``always``, ``everysec`` or ``off``.
        first_segment: The number of the segment to open (one past any on disk).
    """

    def __init__(self, root: Path, appendfsync: str = "everysec", first_segment: int = 1):
        if appendfsync not in APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {', '.join(APPENDFSYNC)}, not {appendfsync!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.segment = first_segment
        self._queue: "queue.Queue" = queue.Queue()
        self._queued = 0  # changes queued so far (guarded by _cond)
        self._written = 0  # changes written and fsynced as appendfsync promises
        self._cond = threading.Condition()
        self._error: Optional[BaseException] = None
        self.records_since_rotate = 0
        self.bytes_written = 0
        self._file = self._open(first_segment)
        self._thread = threading.Thread(target=self._run, name="nirvana-journal", daemon=True)
        self._thread.start()

    def _open(self, seq: int):
        path = segment_path(self.root, seq)
        f = open(path, "ab")
        if f.tell() == 0:
            f.write(MAGIC)
            f.flush()
            os.fsync(f.fileno())
            # The new file's directory entry too, or a power loss could drop the whole segment.
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return f

    # -- called with the cache's lock held ----------------------------------------------------------

    def append(self, change: tuple) -> None:
        """Queue one change (cheap: the writer thread serializes it)."""
        self._check()
        with self._cond:
            self._queued += 1
            self.records_since_rotate += 1
        self._queue.put(("change", change))

    def rotate(self) -> int:
        """Start a new segment for the changes queued after this call; returns its number.
        Everything queued before stays in the older segments."""
        self._check()
        self.segment += 1
        self.records_since_rotate = 0
        self._queue.put(("rotate", self.segment))
        return self.segment

    # -- callable from any thread --------------------------------------------------------------------

    def sync(self, timeout: float = 30.0) -> None:
        """Wait until every change queued so far is on disk as ``appendfsync`` promises (with
        ``always``: fsynced). Raises if the writer failed or did not get there in ``timeout``."""
        with self._cond:
            target = self._queued
            if self.appendfsync == "always":
                self._queue.put(("sync", None))
            if not self._cond.wait_for(lambda: self._written >= target or self._error is not None, timeout):
                raise TimeoutError(f"the cache journal did not reach disk within {timeout:.0f}s")
        self._check()

    def remove_before(self, seq: int) -> int:
        """Delete the segments older than ``seq`` (a snapshot holds their changes now)."""
        removed = 0
        for number, path in segments(self.root):
            if number < seq:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        """Write and fsync everything queued, then stop the writer."""
        self._queue.put(("close", None))
        self._thread.join(timeout=60)
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the cache journal writer failed: {self._error}") from self._error

    # -- the writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        last_sync = time.monotonic()
        pending = 0  # changes written but not yet fsynced
        try:
            while True:
                timeout = None if self.appendfsync != "everysec" or not pending else \
                    max(0.0, 1.0 - (time.monotonic() - last_sync))
                try:
                    kind, item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    kind, item = "tick", None
                batch = [(kind, item)]
                while True:  # drain what is queued: one write and at most one fsync for all of it
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                closing = False
                for kind, item in batch:
                    if kind == "change":
                        data = encode(item)
                        self._file.write(data)
                        self.bytes_written += len(data)
                        pending += 1
                    elif kind == "rotate":
                        self._file.flush()
                        os.fsync(self._file.fileno())
                        self._file.close()
                        self._file = self._open(item)
                    elif kind == "close":
                        closing = True
                self._file.flush()
                due = (self.appendfsync == "always" or closing or
                       (self.appendfsync == "everysec" and time.monotonic() - last_sync >= 1.0))
                if pending and due:
                    os.fsync(self._file.fileno())
                    last_sync = time.monotonic()
                with self._cond:
                    if due or self.appendfsync == "off":  # "off": in the OS's hands once flushed
                        self._written += pending
                        pending = 0
                    self._cond.notify_all()
                if closing:
                    self._file.close()
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to every caller by _check/sync
            with self._cond:
                self._error = exc
                self._cond.notify_all()
