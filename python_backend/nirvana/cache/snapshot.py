"""Atomic, checksummed, versioned snapshots of a :class:`~nirvana.cache.engine.LatentCache`.

Layout under the snapshot root::

    CURRENT                  "<snapshot name> <sha256 of its manifest>", replaced atomically
    snap-<time>-<n>/         one complete snapshot (written as *.partial, then renamed)
        manifest.json        format and sha256 of every other file
        entries.json         keys, cached steps and usage statistics; the journal segment that follows
        embeddings.npy       one row per entry
        states-<i>.safetensors  noise states, in shards
    journal-<n>.log          admissions and evictions since (see :mod:`nirvana.cache.journal`)

A crash while writing leaves a ``.partial`` folder that is never loaded, and
CURRENT still names the previous snapshot. On restore, a file whose checksum
does not match is reported and skipped: a bad state shard loses only its
states, a bad manifest or entry file (or a format this build does not read)
makes the loader fall back to the previous snapshot. Nothing unverified is
ever served. Only the engine's public persistence API is used
(:meth:`LatentCache.export_entries`, :meth:`LatentCache.import_entries`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nirvana.cache.engine import CacheKey, EntryRecord, StateRecord
from nirvana.cache.policy import StateStats

# 3: a state at step K may be [2, C, H, W] (latents and the resume guard's guidance direction,
# nirvana.cache.engine.pack_state); 2: journal_from in entries.json, format checked on load (1 had
# neither). Format 2 is migrated on load: its states have no direction, so the guard serves them only
# unchecked (within unchecked_max_k; exact hits keep working) until they are replaced or evicted.
FORMAT = 3
MIGRATED_FORMATS = (2,)
# Small shards: safetensors' save_file holds the GIL while it serializes a file, and the snapshot
# is written beside the request threads; 64 SD 1.5 states are 2 MB, a few ms each.
STATES_PER_SHARD = 64
KEEP = 2  # snapshots kept on disk (the newest and one to fall back to)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def state_blob_name(entry_id: int, step: int) -> str:
    """The one name of a state inside a snapshot's shards."""
    return f"e{entry_id}_s{step}"


@dataclasses.dataclass
class Snapshot:
    """What a snapshot holds: the entries, the cache clock and the journal segment that follows it."""

    records: List[EntryRecord]
    clock: int = 0
    journal_from: int = 0


def write_snapshot(snapshot: Snapshot, root: Path, keep: int = KEEP) -> Path:
    """Write ``snapshot`` under ``root`` and make it CURRENT (safe to call off the request path:
    it touches only ``snapshot``, which :meth:`LatentCache.export_entries` made).

    Args:
        keep: Complete snapshots left on disk, this one included (1 after a flush, so
            flushed states do not linger in the fallback snapshot).

    Returns:
        The snapshot folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"snap-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
    partial = root / (name + ".partial")
    partial.mkdir()
    entries, embeddings, states = [], [], []
    dim = 0
    for record in snapshot.records:
        dim = len(record.embedding)
        steps = []
        for state in record.states:
            steps.append({"step": state.step, "stats": dataclasses.asdict(state.stats), "dtype": str(state.tensor.dtype)})
            states.append((state_blob_name(record.entry_id, state.step), state.tensor.detach().to("cpu").contiguous()))
        entries.append({"id": record.entry_id, "key": dataclasses.asdict(record.key), "steps": steps})
        embeddings.append(np.asarray(record.embedding, np.float32))
    _write_entries(partial / "entries.json", entries, snapshot)
    np.save(partial / "embeddings.npy", np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32))
    for i in range(0, len(states), STATES_PER_SHARD):
        shard = partial / f"states-{i // STATES_PER_SHARD:05d}.safetensors"
        save_file(dict(states[i:i + STATES_PER_SHARD]), str(shard))
        time.sleep(0)  # let the request threads in between shards
    files = {path.name: _sha256(path) for path in sorted(partial.iterdir())}
    manifest = json.dumps({"format": FORMAT, "files": files}, sort_keys=True).encode()
    _fsync_write(partial / "manifest.json", manifest)
    final = root / name
    os.replace(partial, final)
    current_tmp = root / "CURRENT.tmp"
    _fsync_write(current_tmp, f"{name} {hashlib.sha256(manifest).hexdigest()}\n".encode())
    os.replace(current_tmp, root / "CURRENT")
    _fsync_dir(root)
    _prune(root, final, keep)
    return final


def _write_entries(path: Path, entries: List[dict], snapshot: Snapshot) -> None:
    """entries.json, one entry per json.dumps call: a single dumps of every entry would hold the
    GIL for the whole encoding (140 ms at 10,000 states), stalling the request threads."""
    head = json.dumps({"format": FORMAT, "clock": snapshot.clock, "journal_from": snapshot.journal_from})
    with open(path, "w", encoding="utf-8") as f:
        f.write(head[:-1] + ', "entries": [')
        for i, entry in enumerate(entries):
            f.write(("," if i else "") + json.dumps(entry))
        f.write("]}")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, newest: Path, keep: int) -> None:
    snaps = sorted((p for p in root.glob("snap-*") if p.is_dir()), key=lambda p: p.name)
    for path in snaps:
        if path.name.endswith(".partial") and path != newest:
            shutil.rmtree(path, ignore_errors=True)
    complete = [p for p in snaps if not p.name.endswith(".partial")]
    for path in complete[:-max(keep, 1)]:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def _candidates(root: Path, problems: List[str]) -> List[Tuple[Path, str]]:
    """Snapshots to try, CURRENT first (with its manifest hash), then older complete ones."""
    found: List[Tuple[Path, str]] = []
    current = root / "CURRENT"
    if current.exists():
        parts = current.read_text(errors="replace").split()
        if len(parts) == 2 and parts[0].startswith("snap-") and "/" not in parts[0]:
            found.append((root / parts[0], parts[1]))
        else:
            problems.append("CURRENT is unreadable; trying the snapshots on disk, newest first")
    older = sorted((p for p in root.glob("snap-*") if p.is_dir() and not p.name.endswith(".partial")),
                   key=lambda p: p.name, reverse=True)
    # Then the other complete snapshots, newest first, each checked by its own manifest alone.
    # The one a readable CURRENT names is not tried again: when its manifest does not match
    # CURRENT's hash, that manifest is what cannot be trusted (an unreadable CURRENT names none,
    # so then every snapshot on disk is tried).
    found += [(p, "") for p in older if all(p != f for f, _ in found)]
    return found


@dataclasses.dataclass
class LoadedSnapshot:
    """A verified snapshot read from disk (its states minus any corrupt shard's)."""

    name: Optional[str]
    snapshot: Snapshot
    problems: List[str]


def read_snapshot(root: Path) -> LoadedSnapshot:
    """The newest valid snapshot under ``root`` (CURRENT first, then older complete ones);
    an empty one when there is none. Never raises for what is on disk: every problem found
    (missing or corrupt files, an unknown format) is reported and that file or snapshot skipped."""
    root = Path(root)
    problems: List[str] = []
    if not root.exists():
        return LoadedSnapshot(None, Snapshot([]), problems)
    for folder, manifest_hash in _candidates(root, problems):
        try:
            manifest_bytes = (folder / "manifest.json").read_bytes()
            if manifest_hash and hashlib.sha256(manifest_bytes).hexdigest() != manifest_hash:
                raise ValueError("manifest.json does not match CURRENT")
            manifest = json.loads(manifest_bytes)
            if manifest.get("format") in MIGRATED_FORMATS:
                problems.append(f"{folder.name}: snapshot format {manifest['format']} (written before the resume "
                                f"guard) migrated to {FORMAT}: its states carry no guidance direction, so they are "
                                f"served only where the guard allows unchecked hits (exact hits are unaffected)")
            elif manifest.get("format") != FORMAT:
                raise ValueError(f"snapshot format {manifest.get('format')!r} is not the one this build reads "
                                 f"({FORMAT}, or {', '.join(map(str, MIGRATED_FORMATS))} migrated)")
            files = manifest["files"]
            for name in ("entries.json", "embeddings.npy"):
                if _sha256(folder / name) != files.get(name):
                    raise ValueError(f"{name} failed its checksum")
            meta = json.loads((folder / "entries.json").read_text())
            embeddings = np.load(folder / "embeddings.npy")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{folder.name}: {exc}; skipped")
            continue
        tensors: Dict[str, torch.Tensor] = {}
        for name, checksum in sorted(files.items()):
            if not name.startswith("states-"):
                continue
            try:
                if _sha256(folder / name) != checksum:
                    raise ValueError("checksum mismatch")
                tensors.update(load_file(str(folder / name)))
            except (OSError, ValueError) as exc:
                problems.append(f"{folder.name}/{name}: {exc}; its states skipped")
        records = []
        for row, item in enumerate(meta["entries"]):
            states = [StateRecord(s["step"], StateStats(**s["stats"]), tensors[blob])
                      for s in item["steps"] if (blob := state_blob_name(item["id"], s["step"])) in tensors]
            if states:
                records.append(EntryRecord(int(item["id"]), CacheKey(**item["key"]), embeddings[row], states))
        return LoadedSnapshot(folder.name, Snapshot(records, int(meta.get("clock", 0)), int(meta.get("journal_from", 0))),
                              problems)
    return LoadedSnapshot(None, Snapshot([]), problems)
