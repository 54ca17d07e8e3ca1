"""Which denoising steps are cached, and which one a similarity resumes from.

The paper states its cache steps and thresholds at N=50 steps. A request with
another step count gets them scaled proportionally, so "K=25 of 50" means
"half way" at any N.
"""

from __future__ import annotations

from typing import Sequence, Tuple


def scale_steps(cache_steps: Sequence[int], base_steps: int, steps: int) -> Tuple[int, ...]:
    """Cache steps for a request of ``steps`` steps.

    Returns:
        Sorted distinct steps, each within 1..steps-1 (empty when steps < 2).
    """
    scaled = {round(k * steps / base_steps) for k in cache_steps}
    return tuple(sorted(k for k in scaled if 0 < k < steps))


def scale_step(k: int, base_steps: int, steps: int) -> int:
    """One base step, scaled like :func:`scale_steps`."""
    return round(k * steps / base_steps)


def start_step_for(similarity: float, thresholds: Sequence[Tuple[float, int]],
                   base_steps: int, steps: int) -> int:
    """The step to resume from for a match of ``similarity`` (0 for a miss).

    Args:
        similarity: Cosine similarity of the two prompt embeddings.
        thresholds: ``(min_similarity, base_step)`` pairs, highest similarity first.
        base_steps: The step count the thresholds are stated for.
        steps: The request's step count.
    """
    for min_similarity, k in thresholds:
        if similarity >= min_similarity:
            scaled = scale_step(k, base_steps, steps)
            return scaled if 0 < scaled < steps else 0
    return 0
