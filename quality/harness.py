"""What an approximate hit costs in quality, per resumed step K and prompt-similarity band.

For a prompt pair (cached *source*, requested *target*) and a seed:

- the source is generated from that seed's noise, keeping its state after every K;
- the target is generated with no cache from the same noise (the reference);
- the target is generated again resumed from the source's state at each K, through
  the server's step loop (:meth:`nirvana_quality.generators.Generator.generate`).

Each (K, similarity band) cell then reports how far the resumed images fall from
the references: prompt-adherence drop with a 95% confidence interval (shapes
captions, read by :mod:`nirvana_quality.scorer`), an FID-style distance between the
two image sets (scorer features), PSNR and SSIM to the same-seed reference, and
the CLIP score when local CLIP weights are given.

:func:`calibrate` turns the table into a thresholds table by a stated rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nirvana_quality import metrics, shapes
from nirvana_quality.generators import Generator

# Similarity band edges: finer where the thresholds live (0.7..1.0).
BAND_EDGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0001)
# Resumed steps measured, at N=50: the paper's five, and beyond half way for near-duplicates.
K_GRID = (5, 10, 15, 20, 25, 30, 35, 40)
DEFAULT_GATE = 0.01  # one adherence point
# No threshold goes below the similarity of unrelated prompts: the 99.9th percentile of random
# prompt pairs of the SD Discord log under all-MiniLM-L6-v2 (README, "Choosing the thresholds"),
# so one unrelated pair in a thousand reuses a state. The shapes captions are all about shapes,
# so the quality table cannot speak for prompts that share nothing.
UNRELATED_FLOOR = 0.71
CALIBRATION_RULE = ("for each K, the lowest band edge s such that every band from s upward (with at least "
                    "min_pairs pairs) has a mean adherence drop at K, or at a larger K, within the gate, "
                    "raised to the floor "
                    "(similarity of unrelated prompts); then, from the largest K down, a K is kept only where "
                    "its similarity is lower than that of every larger K kept")


@dataclass
class PromptPair:
    """A cached prompt (source) and a request (target) that would hit it.

    Attributes:
        kind: How they differ: "near-duplicate" (framing words), "wording" (same attributes,
            other phrasing), "one-attribute",
            "several" (2-3 attributes), or "log" (nearest neighbours in a prompt log).
        target_example: The target's shapes example (its attributes), None for log prompts.
    """

    source: str
    target: str
    kind: str
    similarity: float
    seed: int
    target_example: Optional[shapes.Example] = None


def band_of(similarity: float, edges: Sequence[float] = BAND_EDGES) -> Optional[int]:
    for i in range(len(edges) - 1):
        if edges[i] <= similarity < edges[i + 1]:
            return i
    return None


def band_label(index: int, edges: Sequence[float] = BAND_EDGES) -> str:
    return f"{edges[index]:.2f}-{min(edges[index + 1], 1.0):.2f}"


def _stratify(candidates: List[PromptPair], per_band: int, rng: np.random.Generator,
              edges: Sequence[float]) -> List[PromptPair]:
    by_band: Dict[int, List[PromptPair]] = {}
    for pair in candidates:
        b = band_of(pair.similarity, edges)
        if b is not None:
            by_band.setdefault(b, []).append(pair)
    chosen = []
    for b in sorted(by_band):
        # Round-robin over the kinds present, so the rare ones (an attribute changed at high
        # similarity) weigh in the band's mean as much as the common ones (near-duplicates).
        by_kind: Dict[str, List[PromptPair]] = {}
        for i in rng.permutation(len(by_band[b])):
            pair = by_band[b][i]
            by_kind.setdefault(pair.kind, []).append(pair)
        queues = [by_kind[k] for k in sorted(by_kind)]
        picked: List[PromptPair] = []
        while len(picked) < per_band and any(queues):
            for queue in queues:
                if queue and len(picked) < per_band:
                    picked.append(queue.pop())
        chosen.extend(picked)
    return chosen


KINDS = ("near-duplicate", "wording", "one-attribute", "several")


def shapes_pairs(generator: Generator, seed: int = 0, per_band: int = 30, candidates: int = 2400,
                 edges: Sequence[float] = BAND_EDGES) -> List[PromptPair]:
    """Held-out shapes caption pairs, stratified over similarity bands (similarity from ``generator``).

    A quarter of the candidates are near-duplicates (framing words added or changed), a
    quarter differ in wording only, a quarter in one attribute, a quarter in two or
    three; each band keeps up to ``per_band`` of them at random, taking the kinds in turn.
    """
    rng = np.random.default_rng([seed, 41])
    names = list(shapes.ATTRIBUTES)
    pairs = []
    start = shapes.SPLITS["heldout"][0]
    for i in range(candidates):
        base = shapes.example(seed, start + i)
        kind = KINDS[i % len(KINDS)]
        if kind == "near-duplicate":
            target = shapes.Example(base.scene, shapes.near_duplicate(base.caption, rng), base.mentioned)
        else:
            changes = {"wording": 0, "one-attribute": 1, "several": int(rng.integers(2, 4))}[kind]
            change = {}
            for name in rng.permutation(names)[:changes]:
                others = [v for v in shapes.ATTRIBUTES[name] if v != getattr(base.scene, name)]
                change[str(name)] = str(others[rng.integers(len(others))])
            target = shapes.variant(base, change, rng)
        if target.caption == base.caption:
            continue
        pairs.append(PromptPair(base.caption, target.caption, kind, 0.0, int(seed * 100_000 + i), target))
    fill_similarities(generator, pairs)
    return _stratify(pairs, per_band, rng, edges)


def log_pairs(generator: Generator, prompts: Sequence[str], per_band: int = 30, seed: int = 0,
              edges: Sequence[float] = BAND_EDGES) -> List[PromptPair]:
    """Pairs of a prompt log: each prompt and its most similar earlier prompt, stratified by band."""
    unique = list(dict.fromkeys(p for p in prompts if p.strip()))
    pooled = generator.embed(unique).pooled
    pairs = []
    for i in range(1, len(unique)):
        sims = pooled[:i] @ pooled[i]
        j = int(np.argmax(sims))
        pairs.append(PromptPair(unique[j], unique[i], "log", float(sims[j]), int(seed * 100_000 + i)))
    return _stratify(pairs, per_band, np.random.default_rng([seed, 43]), edges)


def fill_similarities(generator: Generator, pairs: Sequence) -> None:
    """Set each pair's ``similarity`` (anything with source, target and similarity): the cosine of
    the two prompts' pooled embeddings, each prompt embedded once."""
    texts = list(dict.fromkeys([p.source for p in pairs] + [p.target for p in pairs]))
    pooled = {}
    for i in range(0, len(texts), 256):
        chunk = texts[i:i + 256]
        for text, vec in zip(chunk, generator.embed(chunk).pooled):
            pooled[text] = vec
    for pair in pairs:
        pair.similarity = float(np.dot(pooled[pair.source], pooled[pair.target]))


@dataclass
class Measurements:
    """Images of a run: the no-cache references and the resumed images per K."""

    pairs: List[PromptPair]
    ks: Tuple[int, ...]
    steps: int
    reference: np.ndarray
    resumed: Dict[int, np.ndarray] = field(default_factory=dict)


def measure(generator: Generator, pairs: Sequence[PromptPair], ks: Sequence[int] = K_GRID, steps: int = 50,
            guidance_scale: float = 7.5, batch_size: int = 32) -> Measurements:
    """Generate sources (keeping states at every K), references and resumed targets."""
    ks = tuple(sorted(set(int(k) for k in ks if 0 < k < steps)))
    seeds = [p.seed for p in pairs]
    sources = generator.generate([p.source for p in pairs], seeds, steps, guidance_scale,
                                 save_steps=ks, batch_size=batch_size, desc="sources")
    reference = generator.generate([p.target for p in pairs], seeds, steps, guidance_scale,
                                   batch_size=batch_size, desc="references").images
    jobs = [(k, i) for k in ks for i in range(len(pairs))]
    resumed = generator.generate([pairs[i].target for _, i in jobs], [pairs[i].seed for _, i in jobs], steps,
                                 guidance_scale, start_step=[k for k, _ in jobs],
                                 start_latents=[sources.checkpoints[i][k] for k, i in jobs],
                                 batch_size=batch_size, desc="resumed").images
    by_k = {k: resumed[n * len(pairs):(n + 1) * len(pairs)] for n, k in enumerate(ks)}
    return Measurements(list(pairs), ks, steps, reference, by_k)


@dataclass
class CellRow:
    """One (K, similarity band) cell of the quality table."""

    k: int
    band: str
    band_low: float
    n: int
    adherence_reference: Optional[float]
    adherence_drop: Optional[float]
    adherence_drop_ci: Optional[float]
    fid: Optional[float]
    psnr_db: float
    ssim: float
    clip_drop: Optional[float] = None


def summarize(run: Measurements, scorer=None, clip=None, edges: Sequence[float] = BAND_EDGES) -> List[CellRow]:
    """The quality table of a run (adherence columns need a scorer and shapes pairs)."""
    bands = np.array([band_of(p.similarity, edges) for p in run.pairs])
    targets = [p.target_example for p in run.pairs]
    scored = scorer is not None and all(t is not None for t in targets)
    ref_adh = scorer.adherence(run.reference, targets) if scored else None
    ref_feat = scorer.read(run.reference)[0] if scorer is not None else None
    ref_clip = clip.score(run.reference, [p.target for p in run.pairs]) if clip is not None else None
    rows = []
    for k in run.ks:
        images = run.resumed[k]
        adh = scorer.adherence(images, targets) if scored else None
        feat = scorer.read(images)[0] if scorer is not None else None
        clip_scores = clip.score(images, [p.target for p in run.pairs]) if clip is not None else None
        psnr = metrics.psnr(images, run.reference)
        ssim = metrics.ssim(images, run.reference)
        for b in sorted(set(int(x) for x in bands if x is not None)):
            sel = np.flatnonzero(bands == b)
            drop = ci = ref = fid = clip_drop = None
            if scored:
                if len(sel) >= 2:
                    drop, ci = metrics.paired_difference_ci(ref_adh[sel], adh[sel])
                else:  # one pair: a difference, no interval
                    drop, ci = float(ref_adh[sel][0] - adh[sel][0]), None
                ref = float(np.mean(ref_adh[sel]))
            if feat is not None and len(sel) >= 2:
                try:
                    fid = metrics.frechet_distance(feat[sel], ref_feat[sel])
                except ValueError:  # 30 samples in 256-d: covariances can be too ill-conditioned
                    fid = None
            if clip_scores is not None:
                clip_drop = float(np.mean(ref_clip[sel] - clip_scores[sel]))
            finite_psnr = np.minimum(psnr[sel], 100.0)  # identical images: PSNR = inf, capped for the mean
            rows.append(CellRow(k, band_label(b, edges), float(edges[b]), int(len(sel)), ref, drop, ci, fid,
                                float(np.mean(finite_psnr)), float(np.mean(ssim[sel])), clip_drop))
    return rows


def calibrate(rows: Sequence[dict], gate: float = DEFAULT_GATE, min_pairs: int = 5,
              floor: float = UNRELATED_FLOOR) -> List[List[float]]:
    """Thresholds from a quality table.

    Rule: for each K, the lowest band edge s such that in every band from s upward
    (with at least ``min_pairs`` pairs) the mean adherence drop at K, or at a larger K,
    is within ``gate``, raised to ``floor``; a K whose top band already fails gets none.
    A K is kept only if its
    similarity is higher than every smaller K's (otherwise a smaller K would never
    be chosen over it, or it would be chosen where its quality was not shown), so
    the table is monotone like the paper's.

    Returns:
        [similarity, K] pairs, highest similarity first (the ``thresholds`` format).
    """
    passes: Dict[Tuple[int, float], bool] = {}
    for row in rows:
        if row.get("adherence_drop") is None or row["n"] < min_pairs:
            continue
        passes[(int(row["k"]), float(row["band_low"]))] = row["adherence_drop"] <= gate
    # Resuming earlier leaves the target prompt more steps to steer, so it cannot cost more than
    # resuming later from the same state: a cell passes when it, or a larger K in its band, does.
    # This keeps noise in one cell (30 pairs) from failing a smaller K that a larger K clears.
    ks = sorted({k for k, _ in passes})
    lowest: Dict[int, float] = {}
    for k in ks:
        bands = sorted({b for kk, b in passes if kk == k}, reverse=True)
        edge = None
        for band in bands:
            if not any(passes.get((kk, band), False) for kk in ks if kk >= k):
                break
            edge = band
        if edge is not None:
            lowest[k] = round(max(float(edge), floor), 4)
    result: List[List[float]] = []
    for k in sorted(lowest, reverse=True):  # largest K first: it wins wherever it is allowed
        if not result or lowest[k] < result[-1][0]:
            result.append([lowest[k], k])
    return result


def rows_as_dicts(rows: Sequence[CellRow]) -> List[dict]:
    return [asdict(r) for r in rows]


def markdown_table(rows: Sequence[dict]) -> str:
    head = ("| K | similarity | pairs | adherence (no cache) | adherence drop (95% CI) | FID-style | PSNR dB | SSIM |"
            + (" CLIP drop |" if any(r.get("clip_drop") is not None for r in rows) else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(value, spec):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    for r in rows:
        drop = "-" if r["adherence_drop"] is None else f"{r['adherence_drop'] * 100:+.1f}"
        if r["adherence_drop"] is not None and r["adherence_drop_ci"] is not None:
            drop += f" ± {r['adherence_drop_ci'] * 100:.1f}"
        line = (f"| {r['k']} | {r['band']} | {r['n']} | {fmt(r['adherence_reference'], '.3f')} | {drop} | "
                f"{fmt(r['fid'], '.1f')} | {fmt(r['psnr_db'], '.1f')} | {fmt(r['ssim'], '.3f')} |")
        if "CLIP" in head:
            line += f" {fmt(r.get('clip_drop'), '+.2f')} |"
        lines.append(line)
    return "\n".join(lines)


def baseline_adherence(generator: Generator, scorer, count: int = 500, seed: int = 0, steps: int = 50,
                       guidance_scale: float = 7.5, batch_size: int = 32) -> Tuple[np.ndarray, np.ndarray,
                                                                                       List[shapes.Example]]:
    """No-cache adherence on ``count`` held-out captions: (per-image adherence, images, examples)."""
    start = shapes.SPLITS["heldout"][0] + 50_000  # apart from the pairs' captions
    examples = [shapes.example(seed, start + i) for i in range(count)]
    images = generator.generate([e.caption for e in examples], [seed * 100_000 + i for i in range(count)], steps,
                                guidance_scale, batch_size=batch_size, desc="held-out captions").images
    return scorer.adherence(images, examples), images, examples


def per_attribute(scorer, images: np.ndarray, examples: Sequence[shapes.Example]) -> Dict[str, float]:
    """Of the captions naming an attribute, the fraction whose image shows it."""
    _, preds = scorer.read(images)
    out = {}
    for name in shapes.ATTRIBUTES:
        idx = [i for i, e in enumerate(examples) if name in e.mentioned]
        if idx:
            out[name] = float(np.mean([preds[name][i] == examples[i].scene.labels()[name] for i in idx]))
    return out
