"""The tail of approximate hits: per pair kind, how often a hit loses what the new prompt names.

A *false hit*: among the hits served, one whose resumed image loses an attribute the target
prompt names that the target's own no-cache image (same seed) shows. Band means hide these,
because most pairs in a band are framing or rewording pairs; so pairs are drawn per **kind**:

- ``near-duplicate``: framing words added or changed (", 4k"), same attributes;
- ``wording``: the same attributes in other words (synonyms, order);
- ``one-attribute:<attribute>``: one attribute changed, split by which one (``colour``,
  ``background``, ...); half of them are minimal edits (one phrase replaced or added, as users
  edit a prompt, at the highest similarities), half rephrased;
- ``several``: two or three attributes changed.

Each pair is measured once at every K of the grid, and the record keeps everything a cache
policy needs to be judged offline: the similarity (for thresholds), each K's outcome (attributes
lost, adherence, PSNR/SSIM) and the latent check's divergence at each K (the guard probes an early
K and resumes at a later one, see :mod:`nirvana.guard`). A policy's false-hit rate and steps saved then follow from the records
without generating again (:mod:`nirvana_quality.policies`).

The run is resumable: records are appended to a JSON Lines file chunk by chunk, and a run
started again skips the pairs already there (a calibration of ~2,000 pairs takes an hour on
two cores; a session may end mid-run).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nirvana.guard import guidance_divergence
from nirvana_quality import harness, metrics, shapes
from nirvana_quality.generators import Generator

NEAR_DUPLICATE, WORDING, SEVERAL = "near-duplicate", "wording", "several"
ONE_ATTRIBUTE = "one-attribute"
# Every pair kind, one-attribute changes split by the attribute changed.
TAIL_KINDS = (NEAR_DUPLICATE, WORDING) + tuple(f"{ONE_ATTRIBUTE}:{a}" for a in shapes.ATTRIBUTES) + (SEVERAL,)
TAIL_KS = (5, 10, 15, 20, 25, 30, 35, 40)
# Below the paper's lowest threshold nothing hits, so such pairs say nothing about hits served.
MIN_SIMILARITY = 0.65
RECORD_VERSION = 1


@dataclass
class TailPair:
    """One (cached source, requested target) pair of a kind; ``index`` numbers it in the run."""

    index: int
    kind: str
    source: str
    target: str
    seed: int
    target_example: shapes.Example
    changed: Tuple[str, ...] = ()
    similarity: float = 0.0


def _edited(seed: int, index: int, base: shapes.Example, change: Dict[str, str]) -> shapes.Example:
    """``base`` with ``change`` applied as a minimal edit: the caption drawn again with the very
    random choices that drew the base caption, so only the changed phrases differ (an attribute the
    base did not name is added, which shifts the later choices)."""
    rng = np.random.default_rng([seed, index])
    mentioned = shapes.choose_mentioned(rng)
    shapes.sample_scene(rng, None if "count" in mentioned else {"count": "one"})  # same draws as shapes.example
    scene = shapes.Scene(**{**base.scene.values(), **change}, jitter=base.scene.jitter)
    named = tuple(dict.fromkeys(list(base.mentioned) + list(change)))
    return shapes.Example(scene, shapes.caption(scene, named, rng), named)


def _change(base: shapes.Example, names: Sequence[str], rng: np.random.Generator) -> Dict[str, str]:
    change = {}
    for name in names:
        others = [v for v in shapes.ATTRIBUTES[name] if v != getattr(base.scene, name)]
        change[str(name)] = str(others[rng.integers(len(others))])
    return change


def tail_pairs(generator: Generator, per_kind: int = 200, seed: int = 0, min_similarity: float = MIN_SIMILARITY,
               kinds: Sequence[str] = TAIL_KINDS, max_tries: int = 20) -> List[TailPair]:
    """``per_kind`` held-out shapes pairs of every kind, each at similarity >= ``min_similarity``.

    Deterministic for (seed, per_kind): a run resumed later draws the same pairs.
    """
    rng = np.random.default_rng([seed, 47])
    start = shapes.SPLITS["heldout"][0] + 20_000  # apart from nirvana-quality's band pairs and baseline
    names = list(shapes.ATTRIBUTES)
    candidates: List[TailPair] = []
    cursor = 0
    for kind in kinds:
        wanted = per_kind * max_tries // 10  # draw extra: similarity filtering drops some
        for _ in range(wanted):
            index = start + cursor
            cursor += 1
            base = shapes.example(seed, index)
            pair_seed = int(seed * 100_000 + (cursor % 100_000))
            if kind == NEAR_DUPLICATE:
                target = shapes.Example(base.scene, shapes.near_duplicate(base.caption, rng), base.mentioned)
                changed: Tuple[str, ...] = ()
            elif kind == WORDING:
                target = shapes.variant(base, {}, rng)
                changed = ()
            else:
                if kind == SEVERAL:
                    chosen = [str(n) for n in rng.permutation(names)[: int(rng.integers(2, 4))]]
                else:
                    chosen = [kind.split(":", 1)[1]]
                change = _change(base, chosen, rng)
                target = (_edited(seed, index, base, change) if rng.random() < 0.5
                          else shapes.variant(base, change, rng))
                changed = tuple(chosen)
            if target.caption != base.caption:
                candidates.append(TailPair(0, kind, base.caption, target.caption, pair_seed, target, changed))
    harness.fill_similarities(generator, candidates)
    queues = [[p for p in candidates if p.kind == kind and p.similarity >= min_similarity][:per_kind]
              for kind in kinds]
    # The kinds in turn, so that a run stopped early has measured every kind about equally.
    out = [queue[n] for n in range(per_kind) for queue in queues if n < len(queue)]
    for i, pair in enumerate(out):
        pair.index = i
    return out


def measure_chunk(generator: Generator, scorer, pairs: Sequence[TailPair], ks: Sequence[int] = TAIL_KS,
                  steps: int = 50, guidance_scale: float = 7.5, batch_size: int = 32) -> List[dict]:
    """Records of ``pairs``: the source keeping its state and guidance direction at every K, the
    target with no cache, and the target resumed at every K (the latent check measured, never
    acted on, so every K's outcome is known)."""
    ks = tuple(sorted(int(k) for k in ks if 0 < int(k) < steps))
    seeds = [p.seed for p in pairs]
    sources = generator.generate([p.source for p in pairs], seeds, steps, guidance_scale, save_steps=ks,
                                 batch_size=batch_size)
    reference = generator.generate([p.target for p in pairs], seeds, steps, guidance_scale, batch_size=batch_size)
    examples = [p.target_example for p in pairs]
    _, ref_preds = scorer.read(reference.images)
    ref_adherence = scorer.adherence(reference.images, examples)
    jobs = [(k, i) for k in ks for i in range(len(pairs))]
    resumed = generator.generate([pairs[i].target for _, i in jobs], [pairs[i].seed for _, i in jobs], steps,
                                 guidance_scale, start_step=[k for k, _ in jobs],
                                 start_latents=[sources.checkpoints[i][k] for k, i in jobs],
                                 batch_size=batch_size)
    # The latent check's divergence of x_K: the target's first call at x_K against the source's
    # direction there (what a probe of x_K measures, see nirvana.guard).
    divergences = [None if resumed.first_directions[n] is None or k not in sources.directions[i] else
                   guidance_divergence(resumed.first_directions[n], sources.directions[i][k])
                   for n, (k, i) in enumerate(jobs)]
    _, preds = scorer.read(resumed.images)
    adherence = scorer.adherence(resumed.images, [examples[i] for _, i in jobs])
    ref_images = np.stack([reference.images[i] for _, i in jobs])
    psnr = np.minimum(metrics.psnr(resumed.images, ref_images), 100.0)
    ssim = metrics.ssim(resumed.images, ref_images)
    records = []
    for i, pair in enumerate(pairs):
        by_k = {}
        for n, (k, j) in enumerate(jobs):
            if j != i:
                continue
            labels = examples[i].scene.labels()
            lost = [name for name in examples[i].mentioned
                    if ref_preds[name][i] == labels[name] and preds[name][n] != labels[name]]
            by_k[str(k)] = {"lost": lost, "adherence": float(adherence[n]), "psnr_db": float(psnr[n]),
                            "ssim": float(ssim[n]), "divergence": _finite(divergences[n])}
        records.append({"version": RECORD_VERSION, "index": pair.index, "kind": pair.kind, "changed": list(pair.changed),
                        "source": pair.source, "target": pair.target, "similarity": pair.similarity,
                        "seed": pair.seed, "target_example": pair.target_example.to_json(),
                        "steps": steps, "guidance_scale": guidance_scale,
                        "reference_adherence": float(ref_adherence[i]), "k": by_k})
    return records


def _finite(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def load_records(path: Path, model_id: Optional[str] = None) -> List[dict]:
    """Records of a tail run (the header line, if any, is skipped; a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run: measured again
        if "header" in row:
            if model_id is not None and row["header"].get("model_id") != model_id:
                raise ValueError(f"{path} holds records of model {row['header'].get('model_id')!r}, not "
                                 f"{model_id!r}: use another --tail-records file")
            continue
        records.append(row)
    return records


def run_tail(generator: Generator, scorer, path: Path, per_kind: int = 200, seed: int = 0,
             ks: Sequence[int] = TAIL_KS, steps: int = 50, guidance_scale: float = 7.5, batch_size: int = 32,
             chunk: int = 40, limit: Optional[int] = None) -> List[dict]:
    """Measure the tail pairs into ``path`` (JSON Lines), resuming where an earlier run stopped.

    Args:
        per_kind: Pairs per kind (the budget: ``per_kind * len(TAIL_KINDS)`` pairs in all).
        chunk: Pairs generated and appended together (what a killed run loses at most).
        limit: Measure at most this many new pairs now (None: all that are missing).

    Returns:
        Every record in ``path`` afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["index"] for r in load_records(path, generator.model_id)}
    if not path.exists() or path.stat().st_size == 0:
        header = {"model_id": generator.model_id, "per_kind": per_kind, "seed": seed, "ks": list(ks), "steps": steps,
                  "guidance_scale": guidance_scale, "version": RECORD_VERSION}
        path.write_text(json.dumps({"header": header}) + "\n")
    pairs = [p for p in tail_pairs(generator, per_kind, seed) if p.index not in done]
    if limit is not None:
        pairs = pairs[:limit]
    bar = tqdm(total=len(pairs), desc=f"tail pairs ({len(done)} already measured)", unit="pair", file=sys.stderr)
    for begin in range(0, len(pairs), chunk):
        part = pairs[begin:begin + chunk]
        records = measure_chunk(generator, scorer, part, ks, steps, guidance_scale, batch_size)
        with open(path, "a") as f:  # appended only when the whole chunk is measured
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
        bar.update(len(part))
    bar.close()
    return load_records(path, generator.model_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure (or continue measuring) the tail records alone; ``nirvana-quality --tail`` does
    the same and reports on them."""
    import argparse

    from nirvana_export import embedded
    from nirvana_quality.generators import RepositoryGenerator
    from nirvana_quality.scorer import load_scorer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--records", type=Path, default=Path("perf/results/quality/tail_records.jsonl"))
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = RepositoryGenerator(args.repository, threads=args.threads)
    scorer = load_scorer(embedded.WEIGHTS_DIR / embedded.SCORER_WEIGHTS)
    records = run_tail(generator, scorer, args.records, args.per_kind, limit=args.limit)
    print(f"{len(records)} records in {args.records}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
