"""Atomic, checksummed snapshots of a :class:`~nirvana.cache.engine.LatentCache`.

Layout under the snapshot root::

    CURRENT                  "<snapshot name> <sha256 of its manifest>", replaced atomically
    snap-<time>-<n>/         one complete snapshot (written as *.partial, then renamed)
        manifest.json        sha256 of every other file
        entries.json         keys, cached steps and usage statistics
        embeddings.npy       one row per entry
        states-<i>.safetensors  noise states, in shards

A crash while writing leaves a ``.partial`` folder that is never loaded, and
CURRENT still names the previous snapshot. On restore, a file whose checksum
does not match is reported and skipped: a bad state shard loses only its
states, a bad manifest or entry file makes the loader fall back to the previous
snapshot. Nothing unverified is ever served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # pragma: no cover
    from nirvana.cache.engine import LatentCache

FORMAT = 1
STATES_PER_SHARD = 1024
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


def write_snapshot(cache: "LatentCache", root: Path, keep: int = KEEP) -> Path:
    """Write a complete snapshot of ``cache`` under ``root`` and make it CURRENT.

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
    for entry in cache._entries.values():
        steps = []
        for step in sorted(entry.steps):
            tensor = cache.store.get((entry.entry_id, step))
            stats = cache._stats.get((entry.entry_id, step))
            if tensor is None or stats is None:
                continue
            steps.append({"step": step, "stats": dataclasses.asdict(stats), "dtype": str(tensor.dtype)})
            states.append((f"e{entry.entry_id}_s{step}", tensor.detach().to("cpu").contiguous()))
        if steps:
            entries.append({"id": entry.entry_id, "key": dataclasses.asdict(entry.key), "steps": steps})
            embeddings.append(entry.embedding)
    files: Dict[str, str] = {}
    _fsync_write(partial / "entries.json", json.dumps({"format": FORMAT, "entries": entries,
                                                       "clock": cache._clock_value()}).encode())
    np.save(partial / "embeddings.npy", np.stack(embeddings) if embeddings
            else np.zeros((0, cache.index.dim), np.float32))
    for i in range(0, len(states), STATES_PER_SHARD):
        shard = partial / f"states-{i // STATES_PER_SHARD:05d}.safetensors"
        save_file(dict(states[i:i + STATES_PER_SHARD]), str(shard))
    for path in sorted(partial.iterdir()):
        files[path.name] = _sha256(path)
    manifest = json.dumps({"format": FORMAT, "files": files}, sort_keys=True).encode()
    _fsync_write(partial / "manifest.json", manifest)
    final = root / name
    os.replace(partial, final)
    current_tmp = root / "CURRENT.tmp"
    _fsync_write(current_tmp, f"{name} {hashlib.sha256(manifest).hexdigest()}\n".encode())
    os.replace(current_tmp, root / "CURRENT")
    _prune(root, final, keep)
    return final


def _prune(root: Path, newest: Path, keep: int) -> None:
    snaps = sorted((p for p in root.glob("snap-*") if p.is_dir()), key=lambda p: p.name)
    for path in snaps:
        if path.name.endswith(".partial") and path != newest:
            shutil.rmtree(path, ignore_errors=True)
    complete = [p for p in snaps if not p.name.endswith(".partial")]
    for path in complete[:-max(keep, 1)]:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def _candidates(root: Path) -> List[Tuple[Path, str]]:
    """Snapshots to try, CURRENT first (with its manifest hash), then older complete ones."""
    found: List[Tuple[Path, str]] = []
    current = root / "CURRENT"
    if current.exists():
        parts = current.read_text(errors="replace").split()
        if len(parts) == 2:
            found.append((root / parts[0], parts[1]))
    older = sorted((p for p in root.glob("snap-*") if p.is_dir() and not p.name.endswith(".partial")),
                   key=lambda p: p.name, reverse=True)
    found += [(p, "") for p in older if all(p != f for f, _ in found)]
    return found


def load_snapshot(cache: "LatentCache", root: Path) -> Dict[str, object]:
    """Restore the newest valid snapshot under ``root`` into an empty ``cache``.

    Returns:
        A report: which snapshot was loaded, entries and states restored, and the
        problems found (corrupt or missing files), each skipped.
    """
    root = Path(root)
    report: Dict[str, object] = {"snapshot": None, "entries": 0, "states": 0, "problems": []}
    problems: List[str] = report["problems"]  # type: ignore[assignment]
    if not root.exists():
        return report
    for folder, manifest_hash in _candidates(root):
        try:
            manifest_bytes = (folder / "manifest.json").read_bytes()
            if manifest_hash and hashlib.sha256(manifest_bytes).hexdigest() != manifest_hash:
                raise ValueError("manifest.json does not match CURRENT")
            files = json.loads(manifest_bytes)["files"]
            for name in ("entries.json", "embeddings.npy"):
                if _sha256(folder / name) != files.get(name):
                    raise ValueError(f"{name} failed its checksum")
            meta = json.loads((folder / "entries.json").read_text())
            embeddings = np.load(folder / "embeddings.npy")
        except (OSError, ValueError, KeyError, TypeError) as exc:
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
        restored_entries, restored_states = cache._restore(meta, embeddings, tensors)
        report.update(snapshot=folder.name, entries=restored_entries, states=restored_states)
        return report
    return report
