"""Eviction policies at noise-state granularity.

Every cached noise state (one prompt's latents after K steps) carries its own
statistics; a policy turns them into a score and the lowest score is evicted
first. LCBFU (Least Computationally Beneficial and Frequently Used, the
paper's policy) weighs how many UNet steps a state saves (K) by how often it
has been used; LRU, LFU and FIFO are there for comparison.

Pure frequency counts never decay: once a small cache is full of states used
once, every new state scores lower and is evicted at once (measured on the SD
Discord log: 0.8% hit rate at 5k states against LRU's 52%). So LCBFU ages like
GreedyDual-Size-Frequency: a state's score is ``floor + K * (uses + 1)``, where
``floor`` is the store's *inflation* (the score of the last state evicted) at
the time the state was admitted or last used. Old, once-useful states sink
below fresh ones over time; among states of the same age, higher K and more
uses still win.
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
    floor: float = 0.0  # the store's inflation when admitted or last used (LCBFU aging)


def lcbfu(s: StateStats) -> Tuple:
    # (uses + 1) so a fresh state is worth its K, not zero; recency breaks ties.
    return (s.floor + s.step * (s.uses + 1), s.last_used)


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
