"""Tiered latent store with byte budgets: device memory, host memory, local disk.

States live in the fastest tier with room. When a tier's budget is full, its
lowest-scoring state (by the eviction policy) moves down one tier instead of
being lost; only a state pushed out of the last tier is dropped. A tier with a
budget of 0 is skipped.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import os
from pathlib import Path
from typing import Dict, Hashable, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Tier:
    """A byte-budgeted place for states, with a lazily-invalidated min-heap of scores."""

    name = "tier"

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.sizes: Dict[Hashable, int] = {}
        self._heap: List[Tuple[Tuple, int, Hashable]] = []
        self._version: Dict[Hashable, int] = {}
        self.scores: Dict[Hashable, Tuple] = {}
        self._counter = itertools.count()

    def __contains__(self, key: Hashable) -> bool:
        return key in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def set_score(self, key: Hashable, score: Tuple) -> None:
        version = next(self._counter)
        self._version[key] = version
        self.scores[key] = score
        heapq.heappush(self._heap, (score, version, key))
        if len(self._heap) > 4 * len(self.sizes) + 64:
            self._heap = [(s, v, k) for s, v, k in self._heap if self._version.get(k) == v]
            heapq.heapify(self._heap)

    def lowest(self) -> Hashable:
        while self._heap:
            score, version, key = self._heap[0]
            if self._version.get(key) == version and key in self.sizes:
                return key
            heapq.heappop(self._heap)
        raise LookupError(f"{self.name} tier is empty")

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.budget_bytes

    def _account(self, key: Hashable, nbytes: int) -> None:
        self.sizes[key] = nbytes
        self.used_bytes += nbytes

    def _unaccount(self, key: Hashable) -> None:
        self.used_bytes -= self.sizes.pop(key)
        self._version.pop(key, None)
        self.scores.pop(key, None)

    # Implemented by subclasses.
    def write(self, key: Hashable, tensor: torch.Tensor) -> None: ...
    def read(self, key: Hashable) -> torch.Tensor: ...
    def delete(self, key: Hashable) -> None: ...


class MemoryTier(Tier):
    """States as torch tensors in device (CUDA) or host memory."""

    def __init__(self, budget_bytes: int, device: torch.device):
        super().__init__(budget_bytes)
        self.device = torch.device(device)
        self.name = "device" if self.device.type == "cuda" else "host"
        self._tensors: Dict[Hashable, torch.Tensor] = {}

    def write(self, key, tensor):
        stored = tensor.to(self.device, copy=True)
        self._tensors[key] = stored
        self._account(key, stored.numel() * stored.element_size())

    def read(self, key):
        return self._tensors[key]

    def delete(self, key):
        del self._tensors[key]
        self._unaccount(key)


class DiskTier(Tier):
    """States as safetensors files under a directory, with a SHA-256 kept per file.

    A file whose checksum no longer matches is reported as missing (never served).
    """

    name = "disk"

    def __init__(self, budget_bytes: int, directory: Path):
        super().__init__(budget_bytes)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: Dict[Hashable, Tuple[Path, str]] = {}

    def _path(self, key) -> Path:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:20]
        return self.directory / f"{digest}.safetensors"

    def write(self, key, tensor):
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        save_file({"state": tensor.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)
        self._files[key] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
        self._account(key, path.stat().st_size)

    def read(self, key):
        path, checksum = self._files[key]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != checksum:
            raise KeyError(f"state {key} failed its checksum on disk")
        return load_file(str(path))["state"]

    def delete(self, key):
        path, _ = self._files.pop(key)
        path.unlink(missing_ok=True)
        self._unaccount(key)


class LatentStore:
    """Tiers in order (fastest first) behind one put/get interface.

    Args:
        tiers: The tiers, fastest first; those with a zero budget are ignored.
        dtype: Storage dtype (float16 halves the bytes of fp32 latents).
    """

    def __init__(self, tiers: List[Tier], dtype: torch.dtype = torch.float16):
        self.tiers = [t for t in tiers if t.budget_bytes > 0]
        if not self.tiers:
            raise ValueError("the latent store needs at least one tier with a non-zero byte budget")
        self.dtype = dtype
        self._tier_of: Dict[Hashable, Tier] = {}
        # Score of the last state dropped from the last tier: the aging floor of LCBFU.
        self.inflation = 0.0
        self.evictions: Dict[str, int] = {t.name: 0 for t in self.tiers}  # states pushed out, per tier

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tier_of

    def __len__(self) -> int:
        return len(self._tier_of)

    def tier_name(self, key: Hashable) -> str:
        return self._tier_of[key].name

    def placement(self, key: Hashable) -> Optional[Tuple[str, int]]:
        """The tier holding ``key`` and its size in bytes, or None if it is not stored."""
        tier = self._tier_of.get(key)
        return None if tier is None else (tier.name, tier.sizes[key])

    def put(self, key: Hashable, tensor: torch.Tensor, score: Tuple,
            dtype: Optional[torch.dtype] = None) -> List[Hashable]:
        """Store ``tensor`` under ``key`` in the fastest tier it fits.

        Args:
            dtype: Overrides the store dtype (exact-hit final latents are kept in fp32).

        Returns:
            The keys dropped from the last tier to make room (possibly ``key`` itself).
        """
        if key in self._tier_of:
            self.remove(key)
        return self._place(0, key, tensor.to(dtype or self.dtype), score)

    def _place(self, level: int, key, tensor: torch.Tensor, score: Tuple) -> List[Hashable]:
        if level >= len(self.tiers):
            if score and isinstance(score[0], (int, float)):
                self.inflation = max(self.inflation, float(score[0]))
            return [key]
        tier = self.tiers[level]
        nbytes = tensor.numel() * tensor.element_size()
        if not tier.fits(nbytes):
            return self._place(level + 1, key, tensor, score)
        tier.write(key, tensor)
        tier.set_score(key, score)
        self._tier_of[key] = tier
        dropped: List[Hashable] = []
        while tier.used_bytes > tier.budget_bytes:
            victim = tier.lowest()
            self.evictions[tier.name] += 1
            victim_tensor = tier.read(victim)
            victim_score = tier.scores.get(victim, ())
            tier.delete(victim)
            del self._tier_of[victim]
            dropped += self._place(level + 1, victim, victim_tensor, victim_score)
        return dropped

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        """The stored state, or None if absent or corrupt (a corrupt one is removed)."""
        tier = self._tier_of.get(key)
        if tier is None:
            return None
        try:
            return tier.read(key)
        except (KeyError, OSError, ValueError):
            self.remove(key)
            return None

    def set_score(self, key: Hashable, score: Tuple) -> None:
        tier = self._tier_of.get(key)
        if tier is not None:
            tier.set_score(key, score)

    def remove(self, key: Hashable) -> None:
        tier = self._tier_of.pop(key, None)
        if tier is not None:
            tier.delete(key)

    def usage(self) -> Dict[str, Dict[str, int]]:
        """Bytes used, budget and state count per tier."""
        return {t.name: {"used_bytes": t.used_bytes, "budget_bytes": t.budget_bytes, "states": len(t)}
                for t in self.tiers}
