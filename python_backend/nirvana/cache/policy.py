"""Eviction policies at noise-state granularity.

Every cached noise state (one prompt's latents after K steps) carries its own
statistics; a policy turns them into a score and the lowest score is evicted
first. LCBFU (Least Computationally Beneficial and Frequently Used, the
paper's policy) weighs how many UNet steps a state saves (K) by how often it
has been used; LRU, LFU and FIFO are there for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple


@dataclass
class StateStats:
    """Usage statistics of one cached state."""

    step: int
    inserted: int
    last_used: int
    uses: int = 0


def lcbfu(s: StateStats) -> Tuple:
    # (uses + 1) so a fresh state is worth its K, not zero; recency breaks ties.
    return (s.step * (s.uses + 1), s.last_used)


def lru(s: StateStats) -> Tuple:
    return (s.last_used,)


def lfu(s: StateStats) -> Tuple:
    return (s.uses, s.last_used)


def fifo(s: StateStats) -> Tuple:
    return (s.inserted,)


POLICIES: Dict[str, Callable[[StateStats], Tuple]] = {"lcbfu": lcbfu, "lru": lru, "lfu": lfu, "fifo": fifo}


def eviction_score(policy: str) -> Callable[[StateStats], Tuple]:
    """The score function of ``policy``; lower scores are evicted first."""
    try:
        return POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown eviction policy {policy!r}; choose from {sorted(POLICIES)}") from None
