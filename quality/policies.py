"""Cache policies judged offline on the tail records: how many hits, how many false, what saved.

A *policy* is what the latent cache does with a request's best match: the thresholds table picks
the step K to resume from (by prompt similarity), the latent guard (:class:`nirvana.guard.GuardPolicy`)
may downgrade the hit, or the token caps (:class:`nirvana.guard.TokenCaps`) may lower K. Every
record of :mod:`nirvana_quality.tail` holds each K's outcome and divergence, so a policy is judged
without generating: :meth:`Policy.serve` replays it on one record, :func:`evaluate` sums that per
pair kind (band means hide the rare kinds; a false-hit target must hold in each).

:func:`calibrate_tail` chooses thresholds and guard bounds for an operator's false-hit target by
the rule :data:`TAIL_CALIBRATION_RULE`, on the calibration half of the records only (even
ranks of each kind, :func:`is_heldout`); the held-out half says whether the target still holds on
pairs it has not seen.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nirvana.config import PAPER_THRESHOLDS
from nirvana.guard import FALLBACK_NOISE, FALLBACK_PROBE, GuardPolicy, TokenCaps, novel_tokens
from nirvana.steps import start_step_for
from nirvana_quality import harness
from nirvana_quality.tail import TAIL_KINDS, TAIL_KS

BASE_STEPS = 50  # the records and every thresholds table are stated at N=50
# The table nirvana-quality calibrated from band means (adherence gate) before the tail was measured.
BAND_CALIBRATED_THRESHOLDS = [[0.90, 40], [0.85, 35], [0.71, 5]]
DEFAULT_TARGET = 0.1  # the latent_cache default (config.pbtxt false_hit_target): README, "The resume guard"
TARGETS = (0.01, 0.02, 0.05, 0.10)
UPPER_PER_TARGET = 2.5  # the Wilson upper bound allowed, as a multiple of the target
SIMILARITY_STEP = 0.01  # the grid of threshold similarities the calibration chooses from
BOUND_QUANTILES = np.linspace(0.0, 1.0, 201)  # the candidate guard bounds: quantiles of divergence at K
MAX_NOVEL_COUNTED = 3  # token caps: counts above this share its cap
# The guard's probed step (nirvana.guard's default): a hit at K > PROBE_K is judged by the
# divergence the records hold at PROBE_K (what the served probe measures: the target's first call at
# the source's state there); a downgrade with fallback "probe" goes on from it with the probe's
# prediction. A hit at K <= PROBE_K cannot be probed: it is served unchecked or not at all.
PROBE_K = GuardPolicy().probe_k
# The fallbacks the calibration chooses from: only "noise" (0). Going on from the probed state
# ("probe", PROBE_K) saves 5 more steps per downgrade and kept the tail's per-kind averages within
# target, but a downgrade means the new prompt already disagrees with that state: on the integration test's
# background edit ("... on a black background" -> "... on a white background") it kept the black
# background in 4 of 12 seeds, an average over the background kind hiding it (3% there). The
# serving side still takes a calibration naming fallback "probe" (GuardPolicy.fallback).
CALIBRATED_FALLBACKS = (0,)
# What a probe costs in UNet evaluations when its prediction is not used (a pass jumps to K, a
# "noise" fallback restarts): one conditional row of a guided evaluation's two.
PROBE_COST = 0.5

CONSTRAINT_RULE = ("in every pair kind, the hits served have a false-hit rate <= target (a kind with fewer "
                   "than min_n hits: its false hits over min_n) and, where the kind has at least min_n hits, a 95% "
                   "Wilson upper bound <= upper (min_n: the fewest hits with which a kind with no false hit meets "
                   "the upper bound; below it n does not allow the bound, which is reported, not required)")
TAIL_CALIBRATION_RULE = (
    "on the calibration pairs only (the even-ranked pairs of each kind), subject to the constraint ("
    + CONSTRAINT_RULE + "): a hit at K > probe_k is kept when its probe divergence (the target's first "
    "UNet call at the source's state at probe_k) is within the bound for K, a hit at K <= probe_k cannot be "
    "probed and is served unchecked; "
    "(1) for each K, the bound is the largest candidate (a 0.5% quantile of the probe divergences of the pairs "
    "at or above the floor) such that those pairs, all resumed at K and kept when within the bound, meet the "
    "constraint (a K <= probe_k: served unchecked if all those pairs meet it); a K with no such bound is not "
    "used; "
    "(2) the thresholds table is the monotone one (higher similarity, larger K; similarities on a 0.01 grid "
    "from the floor up) that maximises the UNet steps saved (steps resumed, minus half an evaluation per probe "
    "whose prediction is not used), found by dynamic programming over the similarity grid; "
    "(3) while the policy fails the constraint, the bound of the K serving most false hits of the failing "
    "kinds (the larger K on a tie) is lowered one candidate (below the lowest: the K is dropped) and (2) is "
    "repeated; "
    "(4) a downgrade restarts from its own noise (fallback \"noise\"; going on from the probed state is not "
    "calibrated: the probe found the new prompt at odds with it); "
    "(5) then each K's bound in turn (largest K first) is raised to the candidate that saves the most steps "
    "(the table re-chosen by 2) while the constraint holds, until no bound moves")
TOKEN_CALIBRATION_RULE = (
    "on the calibration pairs only (the even-ranked pairs of each kind), subject to the constraint ("
    + CONSTRAINT_RULE + "): of every cap table "
    "(novel-token count 0, 1, 2, 3 or more -> largest K, a grid K or 0 for a miss; more novel tokens never a "
    "larger cap), the one that maximises the UNet steps saved under the given thresholds and meets the "
    "constraint (the smaller caps on a tie)")


# -- the Wilson bound --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def wilson_upper(failures: int, n: int, z: float = 1.96) -> float:
    """Upper end of the Wilson score interval of ``failures``/``n`` (two-sided, 95% for z=1.96).

    The Wilson interval rather than the normal one: at the rates that matter (0-5%) on a few
    hundred hits the normal interval collapses to zero width at zero failures. n = 0 says nothing:
    1.0. (scipy's binomtest computes it.)
    """
    if n <= 0:
        return 1.0
    if not 0 <= failures <= n:
        raise ValueError(f"failures must be within 0..n, not {failures} of {n}")
    from scipy.stats import binomtest, norm

    confidence = 2.0 * float(norm.cdf(z)) - 1.0
    return float(binomtest(int(failures), int(n)).proportion_ci(confidence, method="wilson").high)


def fewest_hits_for(upper: float, z: float = 1.96) -> int:
    """The smallest n at which zero failures have a Wilson upper bound <= ``upper`` (73 for 5%)."""
    n = max(1, math.ceil(z * z * (1.0 - upper) / upper) - 1)  # closed form of wilson_upper(0, n) = upper
    while wilson_upper(0, n, z) > upper:
        n += 1
    while n > 1 and wilson_upper(0, n - 1, z) <= upper:
        n -= 1
    return n


@dataclass(frozen=True)
class Constraint:
    """The per-kind false-hit constraint of a calibration (:data:`CONSTRAINT_RULE`)."""

    target: float
    upper: float
    min_n: int

    @classmethod
    def for_target(cls, target: float, upper: Optional[float] = None, min_n: Optional[int] = None) -> "Constraint":
        upper = UPPER_PER_TARGET * target if upper is None else upper
        return cls(float(target), float(upper), fewest_hits_for(upper) if min_n is None else int(min_n))

    def holds(self, hits: int, false_hits: int) -> bool:
        rate = false_hits / max(int(hits), self.min_n)
        if rate > self.target + 1e-12:
            return False
        # The upper bound only where n allows it: below min_n hits even none false cannot show it.
        return int(hits) < self.min_n or wilson_upper(int(false_hits), int(hits)) <= self.upper

    def most_false_hits(self, max_hits: int) -> np.ndarray:
        """[n] -> the most false hits a kind with n hits may have (-1: not even none).

        Computed once per calibration: the search then checks a kind by one lookup. For a given n
        the constraint holds up to some count of false hits and not beyond; across n it is not
        monotone (at min_n the upper bound starts to apply)."""
        out = np.full(max_hits + 1, -1, dtype=np.int64)
        for n in range(max_hits + 1):
            allowed = -1
            while allowed < n and self.holds(n, allowed + 1):
                allowed += 1
            out[n] = allowed
        return out


# -- one policy on one record ------------------------------------------------------------------------

@dataclass
class Served:
    """What a policy does with one record's pair.

    Attributes:
        k_served: The step the target resumed from (0: a miss, generated from its own noise).
        hit: Whether a cached state was used.
        false_hit: Whether the image served loses an attribute the target names (hits only).
        wasted_evals: UNet evaluations thrown away (a probe whose prediction is not used: 0.5).
        downgraded: Whether the latent guard rejected the K the thresholds chose.
    """

    k_served: int
    hit: bool
    false_hit: bool
    wasted_evals: float
    downgraded: bool


def fallback_step(guard: GuardPolicy) -> int:
    """Where a downgraded hit goes on from: the probed step, or 0 (its own noise)."""
    return guard.probe_k if guard.fallback == FALLBACK_PROBE else 0


def grid_step_at_most(k: int, grid: Sequence[int] = TAIL_KS) -> int:
    """The largest measured K <= ``k`` (0: none): a table's K that the records did not measure is
    served from the cached step below it, as a cache with only the grid's steps would."""
    below = [g for g in grid if g <= k]
    return max(below) if below else 0


def novel_count(record: Mapping) -> int:
    if "novel_tokens" not in record:
        raise KeyError("a token-capped policy needs each record's 'novel_tokens' count: "
                       "annotate the records with policies.with_novel_tokens first")
    return int(record["novel_tokens"])


@dataclass
class Policy:
    """A cache policy replayed on records: a thresholds table, optionally checked.

    Attributes:
        thresholds: [similarity, K] pairs, highest similarity first (K at N=50).
        latent: The latent guard: each hit's divergence at K against ``bounds[K]``.
        token: The token caps: K lowered by the novel-token count (needs records annotated by
            :func:`with_novel_tokens`).
    """

    name: str
    thresholds: List[List[float]]
    latent: Optional[GuardPolicy] = None
    token: Optional[TokenCaps] = None

    def serve(self, record: Mapping) -> Served:
        k = grid_step_at_most(start_step_for(float(record["similarity"]), self.thresholds, BASE_STEPS, BASE_STEPS))
        if k and self.token is not None:
            cap = self.token.cap(novel_count(record))
            k = grid_step_at_most(min(k, int(cap or 0)))
        if k == 0:
            return Served(0, False, False, 0, False)
        if self.latent is not None and k > self.latent.unchecked_max_k:
            probe = self.latent.probe_k
            bound = self.latent.bounds.get(k)
            if k <= probe or bound is None:
                return Served(0, False, False, 0, False)  # not served: no probe possible, or no bound
            divergence = record["k"][str(probe)]["divergence"]
            if divergence is None or divergence > bound:
                if self.latent.fallback == FALLBACK_PROBE:
                    return Served(probe, True, bool(record["k"][str(probe)]["lost"]), 0, True)
                return Served(0, False, False, PROBE_COST, True)
            return Served(k, True, bool(record["k"][str(k)]["lost"]), PROBE_COST, False)
        return Served(k, True, bool(record["k"][str(k)]["lost"]), 0, False)


# -- a policy on many records ------------------------------------------------------------------------

def summarize_served(served: Sequence[Served]) -> Dict[str, object]:
    """Counts and rates of one group of pairs (a kind, or all)."""
    pairs = len(served)
    hits = sum(s.hit for s in served)
    false_hits = sum(s.false_hit for s in served)
    wasted = sum(s.wasted_evals for s in served)
    return {"pairs": pairs, "hits": hits, "hit_rate": hits / pairs if pairs else 0.0,
            "false_hits": false_hits, "false_hit_rate": false_hits / hits if hits else 0.0,
            "wilson_upper": wilson_upper(false_hits, hits),
            "mean_k": float(np.mean([s.k_served for s in served if s.hit])) if hits else None,
            "downgrades": sum(s.downgraded for s in served), "wasted_evals": wasted,
            "steps_saved": (sum(s.k_served for s in served) - wasted) / (BASE_STEPS * pairs) if pairs else 0.0}


def worst_kind(kinds: Mapping[str, Mapping]) -> Optional[str]:
    """The kind with the highest false-hit rate among those with hits (the higher Wilson upper
    bound on a tie): the one an operator's target is at risk in."""
    served = [(s["false_hit_rate"], s["wilson_upper"], name) for name, s in kinds.items() if s["hits"]]
    return max(served)[2] if served else None


def evaluate(policy: Policy, records: Sequence[Mapping]) -> Dict[str, object]:
    """``policy`` replayed on ``records``: per kind and overall, and which kind is worst."""
    served = [policy.serve(r) for r in records]
    by_kind: Dict[str, List[Served]] = {}
    for record, outcome in zip(records, served):
        by_kind.setdefault(record["kind"], []).append(outcome)
    order = [k for k in TAIL_KINDS if k in by_kind] + sorted(k for k in by_kind if k not in TAIL_KINDS)
    kinds = {kind: summarize_served(by_kind[kind]) for kind in order}
    return {"policy": policy.name, "overall": summarize_served(served), "kinds": kinds, "worst_kind": worst_kind(kinds)}


def is_heldout(records: Sequence[Mapping]) -> List[bool]:
    """Per record, whether it is held out: the odd-ranked pairs of each kind (by index).

    Not the records' own ``heldout`` flag (an odd index): a run takes the kinds in turn, and
    with an even number of kinds an index's parity is its kind's, so that flag holds out whole
    kinds (wording, colour, position, background, several) and calibrates on the others. The
    rank within the kind halves every kind, and a record keeps its side as the file grows
    (later pairs have larger indices).
    """
    by_kind: Dict[str, List[int]] = {}
    for i, record in enumerate(records):
        by_kind.setdefault(record["kind"], []).append(i)
    out = [False] * len(records)
    for rows in by_kind.values():
        for rank, i in enumerate(sorted(rows, key=lambda i: int(records[i]["index"]))):
            out[i] = rank % 2 == 1
    return out


def split(records: Sequence[Mapping]) -> Tuple[List[Mapping], List[Mapping]]:
    """(calibration, held-out) records (:func:`is_heldout`)."""
    heldout = is_heldout(records)
    return ([r for r, h in zip(records, heldout) if not h], [r for r, h in zip(records, heldout) if h])


# -- the K x band x kind table -----------------------------------------------------------------------

def kind_table(records: Sequence[Mapping], ks: Sequence[int] = TAIL_KS, guard: Optional[GuardPolicy] = None,
               edges: Sequence[float] = harness.BAND_EDGES) -> List[Dict[str, object]]:
    """Per K x similarity band x kind: the false-hit rate resumed at K unchecked, and among the
    pairs within ``guard``'s bound at K, how many pass and their false-hit rate (a K with no
    bound passes none)."""
    cells: Dict[Tuple[int, str], List[Mapping]] = {}
    for record in records:
        band = harness.band_of(float(record["similarity"]), edges)
        if band is not None:
            cells.setdefault((band, record["kind"]), []).append(record)
    kind_order = {k: i for i, k in enumerate(TAIL_KINDS)}
    rows = []
    for k in ks:
        bound = guard.bounds.get(int(k)) if guard is not None else None
        for band, kind in sorted(cells, key=lambda c: (c[0], kind_order.get(c[1], len(kind_order)), c[1])):
            group = [r["k"][str(k)] for r in cells[(band, kind)]]
            lost = [bool(o["lost"]) for o in group]
            passing = [bool(o["lost"]) for o in group
                       if bound is not None and o["divergence"] is not None and o["divergence"] <= bound]
            rows.append({"k": int(k), "band": harness.band_label(band, edges), "band_low": float(edges[band]),
                         "kind": kind, "n": len(group), "false_hit_rate": sum(lost) / len(group),
                         "passing": len(passing),
                         "passing_false_hit_rate": sum(passing) / len(passing) if passing else None,
                         "passing_wilson_upper": wilson_upper(sum(passing), len(passing))})
    return rows


# -- the vectorised replay the calibration searches with ---------------------------------------------

@dataclass
class _Arrays:
    """The records as arrays: similarity [n], kind index [n], divergence and lost [n, grid]."""

    similarity: np.ndarray
    kind: np.ndarray
    kinds: Tuple[str, ...]
    divergence: np.ndarray  # nan where the record has none (never within a bound)
    lost: np.ndarray
    grid: Tuple[int, ...] = TAIL_KS
    guarded: bool = True  # False: every K is served unchecked (the thresholds alone decide)

    @property
    def probe_column(self) -> int:
        return self.grid.index(PROBE_K)

    def unchecked(self, column: int) -> bool:
        """A hit at this K cannot be probed (K <= PROBE_K, or no guard): its "bound" is infinite or
        it is unused."""
        return not self.guarded or self.grid[column] <= PROBE_K

    @classmethod
    def of(cls, records: Sequence[Mapping], grid: Sequence[int] = TAIL_KS) -> "_Arrays":
        kinds = tuple(dict.fromkeys([k for k in TAIL_KINDS if any(r["kind"] == k for r in records)]
                                    + [r["kind"] for r in records]))
        index = {k: i for i, k in enumerate(kinds)}
        div = np.array([[np.nan if r["k"][str(k)]["divergence"] is None else r["k"][str(k)]["divergence"]
                         for k in grid] for r in records], dtype=np.float64).reshape(len(records), len(grid))
        lost = np.array([[bool(r["k"][str(k)]["lost"]) for k in grid] for r in records],
                        dtype=bool).reshape(len(records), len(grid))
        return cls(np.array([float(r["similarity"]) for r in records]), np.array([index[r["kind"]] for r in records],
                   dtype=np.int64), kinds, div, lost, tuple(grid))

    def passes(self, column: int, bound: Optional[float]) -> np.ndarray:
        """Whether each record's hit at this K is kept: unchecked at K <= PROBE_K, else its probe
        divergence within ``bound``."""
        if bound is None:
            return np.zeros(len(self.similarity), dtype=bool)
        if self.unchecked(column):
            return np.ones(len(self.similarity), dtype=bool)
        with np.errstate(invalid="ignore"):
            return self.divergence[:, self.probe_column] <= bound  # nan compares False


@dataclass
class _Replay:
    """One latent-guarded policy replayed on arrays: per record, K served and outcome."""

    saved: float  # UNet steps saved, summed (steps resumed minus evaluations wasted)
    hits: np.ndarray  # per kind
    false_hits: np.ndarray  # per kind
    false_by_column: np.ndarray  # [kind, grid column] false hits served at that K after the check


def _fallback_column(grid: Sequence[int], fallback_max_k: int, k: int) -> int:
    if k <= PROBE_K:
        return -1  # never probed: never downgraded
    step = grid_step_at_most(min(fallback_max_k, k - 1), grid)
    return grid.index(step) if step else -1


def _gains(arrays: _Arrays, column: int, bound: Optional[float], fallback_max_k: int) -> np.ndarray:
    """Steps saved per record if routed to grid column ``column`` (a probe's unused prediction
    costs PROBE_COST; a downgrade going on from the probe uses it)."""
    k = arrays.grid[column]
    if arrays.unchecked(column):
        return np.full(len(arrays.similarity), float(k))
    fallback = _fallback_column(arrays.grid, fallback_max_k, k)
    failed = float(arrays.grid[fallback]) if fallback >= 0 else -PROBE_COST
    return np.where(arrays.passes(column, bound), k - PROBE_COST, failed)


def _replay(arrays: _Arrays, route: np.ndarray, bounds: Mapping[int, float], fallback_max_k: int) -> _Replay:
    """``route``: per record the grid column its table K is (-1: a miss)."""
    n_kinds, grid = len(arrays.kinds), arrays.grid
    hits = np.zeros(n_kinds, dtype=np.int64)
    false_hits = np.zeros(n_kinds, dtype=np.int64)
    false_by_column = np.zeros((n_kinds, len(grid)), dtype=np.int64)
    saved = 0.0
    for column in np.unique(route[route >= 0]):
        column = int(column)
        rows = route == column
        passed = rows & arrays.passes(column, bounds.get(grid[column]))
        failed = rows & ~passed
        served_false = passed & arrays.lost[:, column]
        hits += np.bincount(arrays.kind[passed], minlength=n_kinds)
        false_hits += np.bincount(arrays.kind[served_false], minlength=n_kinds)
        false_by_column[:, column] += np.bincount(arrays.kind[served_false], minlength=n_kinds)
        checked = not arrays.unchecked(column)
        saved += grid[column] * int(passed.sum()) - PROBE_COST * checked * int(passed.sum())
        fallback = _fallback_column(grid, fallback_max_k, grid[column])
        if fallback < 0:
            saved -= PROBE_COST * int(failed.sum())
        else:
            fallback_false = failed & arrays.lost[:, fallback]
            hits += np.bincount(arrays.kind[failed], minlength=n_kinds)
            false_hits += np.bincount(arrays.kind[fallback_false], minlength=n_kinds)
            saved += grid[fallback] * int(failed.sum())
    return _Replay(saved, hits, false_hits, false_by_column)


def _route(arrays: _Arrays, thresholds: Sequence[Sequence[float]]) -> np.ndarray:
    """Per record the grid column :func:`start_step_for` picks (-1: a miss)."""
    route = np.full(len(arrays.similarity), -1, dtype=np.int64)
    for similarity, k in sorted(((float(s), int(k)) for s, k in thresholds)):  # highest similarity last: it wins
        step = grid_step_at_most(k, arrays.grid)
        route[arrays.similarity >= similarity] = arrays.grid.index(step) if step else -1
    return route


def _failing(replay: _Replay, allowed: np.ndarray) -> np.ndarray:
    limit = allowed[np.minimum(replay.hits, len(allowed) - 1)]
    return replay.false_hits > limit


def _similarity_grid(floor: float) -> np.ndarray:
    cuts = [round(floor, 4)]
    value = math.floor(floor / SIMILARITY_STEP + 1 + 1e-9) * SIMILARITY_STEP
    while value < 1.0 - 1e-9:
        cuts.append(round(value, 4))
        value += SIMILARITY_STEP
    return np.array(cuts)


def _best_table(arrays: _Arrays, bounds: Mapping[int, float], fallback_max_k: int,
                cuts: np.ndarray) -> List[List[float]]:
    """The monotone table maximising steps saved (no constraint): DP over the similarity grid."""
    usable = [c for c, k in enumerate(arrays.grid) if k in bounds]
    if not usable:
        return []
    bins = np.searchsorted(cuts, arrays.similarity, side="right") - 1  # -1: below the floor
    inside = bins >= 0
    n_bins = len(cuts)
    # gain[b, j]: steps saved by the records of bin b routed to usable[j]; option j = len(usable): a miss.
    gain = np.zeros((n_bins, len(usable) + 1))
    for j, column in enumerate(usable):
        per_record = _gains(arrays, column, bounds[arrays.grid[column]], fallback_max_k)
        gain[:, j] = np.bincount(bins[inside], weights=per_record[inside], minlength=n_bins)
    # Options ordered by K, largest first; from the top bin down the option index never decreases
    # (larger similarity -> larger K, and a miss only below the table's lowest threshold).
    options = [j for j in sorted(range(len(usable)), key=lambda j: -arrays.grid[usable[j]])] + [len(usable)]
    best = np.full((n_bins, len(options)), -np.inf)
    choice = np.zeros((n_bins, len(options)), dtype=np.int64)
    for b in range(n_bins - 1, -1, -1):
        for o, option in enumerate(options):
            if b == n_bins - 1:
                best[b, o] = gain[b, option]
                choice[b, o] = o
            else:
                above = best[b + 1, : o + 1]
                pick = len(above) - 1 - int(np.argmax(above[::-1]))  # on a tie the smaller K above
                best[b, o] = gain[b, option] + above[pick]
                choice[b, o] = pick
    # Start from the bottom bin's best option and walk up.
    o = int(np.argmax(best[0][::-1]))  # on a tie prefer the miss (fewer hits for the same saving)
    o = len(options) - 1 - o
    assigned = []
    for b in range(n_bins):
        assigned.append(options[o])
        o = int(choice[b, o]) if b < n_bins - 1 else o
    table: List[List[float]] = []
    for b in range(n_bins):
        option = assigned[b]
        if option == len(usable):
            continue
        k = arrays.grid[usable[option]]
        if not table or table[-1][1] != k:
            table.append([float(cuts[b]), k])
    return sorted(table, key=lambda row: -row[0])


def _bound_candidates(arrays: _Arrays, column: int, floor: float) -> np.ndarray:
    if arrays.unchecked(column):
        return np.array([np.inf])  # served unchecked, or not at all
    values = arrays.divergence[arrays.similarity >= floor, arrays.probe_column]
    values = values[np.isfinite(values)]
    if not len(values):
        return np.array([])
    return np.unique(np.round(np.quantile(values, BOUND_QUANTILES), 6))


def _standalone_bound(arrays: _Arrays, column: int, candidates: np.ndarray, floor: float,
                      allowed: np.ndarray) -> int:
    """Step (1) of the rule: the index of the largest candidate under which every pair at or above
    the floor, resumed at this K, meets the constraint (-1: none)."""
    above = arrays.similarity >= floor
    for i in range(len(candidates) - 1, -1, -1):
        passed = above & arrays.passes(column, float(candidates[i]))
        hits = np.bincount(arrays.kind[passed], minlength=len(arrays.kinds))
        false_hits = np.bincount(arrays.kind[passed & arrays.lost[:, column]], minlength=len(arrays.kinds))
        if np.all(false_hits <= allowed[np.minimum(hits, len(allowed) - 1)]):
            return i
    return -1


@dataclass
class _Search:
    """The calibration's state for one fallback: candidate bounds per grid column and the index
    of the one chosen (-1: the K is not used)."""

    arrays: _Arrays
    allowed: np.ndarray
    cuts: np.ndarray
    fallback_max_k: int
    candidates: Dict[int, np.ndarray]
    chosen: Dict[int, int]

    def bounds(self, chosen: Optional[Mapping[int, int]] = None) -> Dict[int, float]:
        chosen = self.chosen if chosen is None else chosen
        return {self.arrays.grid[c]: float(self.candidates[c][i]) for c, i in chosen.items() if i >= 0}

    def policy(self, chosen: Optional[Mapping[int, int]] = None) -> Tuple[List[List[float]], _Replay, bool]:
        """Step (2) under these bounds: (table, its replay, whether it meets the constraint)."""
        bounds = self.bounds(chosen)
        table = _best_table(self.arrays, bounds, self.fallback_max_k, self.cuts)
        replay = _replay(self.arrays, _route(self.arrays, table), bounds, self.fallback_max_k)
        return table, replay, not _failing(replay, self.allowed).any()


def _tightened(arrays: _Arrays, allowed: np.ndarray, floor: float, fallback_max_k: int) -> Optional[_Search]:
    """Steps (1)-(3) of the rule for one fallback (None: no bounds meet the constraint)."""
    candidates = {c: _bound_candidates(arrays, c, floor) for c in range(len(arrays.grid))}
    chosen = {c: _standalone_bound(arrays, c, candidates[c], floor, allowed) for c in candidates}
    search = _Search(arrays, allowed, _similarity_grid(floor), fallback_max_k, candidates, chosen)
    while True:
        _, replay, holds = search.policy()
        if holds:
            return search
        served_false = replay.false_by_column[_failing(replay, allowed)].sum(axis=0)
        if served_false.max() == 0:
            return None  # the false hits come from unchecked fallbacks: no bound removes them
        column = int(np.flatnonzero(served_false == served_false.max())[-1])  # the larger K on a tie
        search.chosen[column] -= 1


def _loosened(search: _Search, max_rounds: int = 10) -> _Search:
    """Step (5) of the rule: each K's bound in turn (largest K first) raised to the candidate that
    saves the most steps (table re-chosen by step 2) while the constraint holds, until none moves."""
    saved = search.policy()[1].saved
    for _ in range(max_rounds):
        moved = False
        for column in reversed(range(len(search.arrays.grid))):
            best_index, best_saved = search.chosen[column], saved
            for index in range(search.chosen[column] + 1, len(search.candidates[column])):
                _, replay, holds = search.policy({**search.chosen, column: index})
                if holds and replay.saved > best_saved + 1e-9:
                    best_index, best_saved = index, replay.saved
            if best_index != search.chosen[column]:
                search.chosen[column], saved, moved = best_index, best_saved, True
        if not moved:
            break
    return search


@dataclass
class _Setup:
    """What every calibration starts from: the constraint, the two halves of the records, the
    calibration half as arrays and the most false hits allowed per hit count."""

    constraint: Constraint
    calibration: List[Mapping]
    heldout: List[Mapping]
    arrays: _Arrays
    allowed: np.ndarray


def _setup(records: Sequence[Mapping], target: float, upper: Optional[float],
           min_n: Optional[int] = None) -> _Setup:
    constraint = Constraint.for_target(target, upper, min_n)
    calibration, heldout = split(records)
    if not calibration:
        raise ValueError("no calibration records: measure the tail first")
    return _Setup(constraint, calibration, heldout, _Arrays.of(calibration),
                  constraint.most_false_hits(len(calibration)))


def calibrate_tail(records: Sequence[Mapping], target: float = DEFAULT_TARGET, upper: Optional[float] = None,
                   floor: float = harness.UNRELATED_FLOOR, min_n: Optional[int] = None,
                   fallbacks: Sequence[int] = CALIBRATED_FALLBACKS) -> Dict[str, object]:
    """Thresholds and latent-guard bounds for a false-hit ``target``, by :data:`TAIL_CALIBRATION_RULE`.

    Only the calibration records (:func:`split`) choose; the held-out ones are evaluated after.

    Args:
        upper: The largest Wilson upper bound of a kind's false-hit rate (default 2.5 x target).
        floor: The lowest similarity a threshold may have (unrelated prompts).
        min_n: A kind with fewer hits is judged as if it had this many (default: the fewest with
            which a kind with no false hit meets ``upper``).
    """
    setup = _setup(records, target, upper, min_n)
    constraint, calibration, heldout, arrays, allowed = (setup.constraint, setup.calibration, setup.heldout,
                                                         setup.arrays, setup.allowed)
    best: Optional[Tuple[float, _Search]] = None
    for fallback_max_k in fallbacks:
        search = _tightened(arrays, allowed, floor, fallback_max_k)
        if search is not None:
            saved = search.policy()[1].saved
            if best is None or saved > best[0] + 1e-9:
                best = (saved, search)
    if best is None:  # only when min_n makes even no false hit fail: serve nothing
        table, bounds, fallback_max_k = [], {}, 0
    else:
        search = _loosened(best[1])
        table, bounds, fallback_max_k = search.policy()[0], search.bounds(), search.fallback_max_k
    unchecked = max([k for k in bounds if k <= PROBE_K], default=0)
    guard = GuardPolicy({k: round(b, 6) for k, b in sorted(bounds.items()) if k > PROBE_K}, probe_k=PROBE_K,
                        fallback=FALLBACK_PROBE if fallback_max_k else FALLBACK_NOISE, unchecked_max_k=unchecked)
    policy = Policy(f"latent guard {target:g}", table, guard)
    return {"target": float(target), "upper": constraint.upper, "min_n": constraint.min_n, "floor": float(floor),
            "thresholds": table, "guard": guard.as_dict(), "rule": TAIL_CALIBRATION_RULE,
            "calibration": evaluate(policy, calibration), "heldout": evaluate(policy, heldout)}


def calibrate_unguarded(records: Sequence[Mapping], target: float = DEFAULT_TARGET, upper: Optional[float] = None,
                        floor: float = harness.UNRELATED_FLOOR) -> Dict[str, object]:
    """The thresholds table for ``target`` without the guard (what a latent_cache with guard off
    serves): :data:`TAIL_CALIBRATION_RULE` with every K served unchecked (steps 1-3)."""
    setup = _setup(records, target, upper)
    constraint, calibration, heldout = setup.constraint, setup.calibration, setup.heldout
    search = _tightened(dataclasses.replace(setup.arrays, guarded=False), setup.allowed, floor, 0)
    table = search.policy()[0] if search is not None else []
    policy = Policy(f"unguarded {target:g}", table)
    return {"target": float(target), "upper": constraint.upper, "thresholds": table,
            "calibration": evaluate(policy, calibration), "heldout": evaluate(policy, heldout)}


def latent_policy(calibration: Mapping, name: Optional[str] = None) -> Policy:
    """The policy a :func:`calibrate_tail` result describes."""
    return Policy(name or f"latent guard {calibration['target']:g}", [list(r) for r in calibration["thresholds"]],
                  GuardPolicy.from_dict(calibration["guard"]))


def calibrate_targets(records: Sequence[Mapping], targets: Sequence[float] = TARGETS,
                      floor: float = harness.UNRELATED_FLOOR) -> Dict[str, Dict[str, object]]:
    """One :func:`calibrate_tail` per operator target (upper = 2.5 x target), keyed as the
    calibration file keys them ("0.02"), so the server can pick the one its config names."""
    return {f"{t:g}": calibrate_tail(records, t, UPPER_PER_TARGET * t, floor) for t in targets}


# -- the token variant -------------------------------------------------------------------------------

def load_tokenizer(repository: Path = Path("model_repository")):
    """The project's tokenizer (the export's files) at the model's max_length."""
    from nirvana.config import PipelineSpec
    from nirvana.text import PromptTokenizer

    stage = Path(repository) / "tokenizer" / "1"
    return PromptTokenizer(stage / "tokenizer", PipelineSpec.load(stage).max_length)


def with_novel_tokens(records: Sequence[Mapping], tokenizer) -> List[dict]:
    """The records, each with ``novel_tokens``: how many tokens of its target have no counterpart
    in its source (:func:`nirvana.guard.novel_tokens`), special and padding ids ignored (the ids
    of an empty prompt: [CLS], [SEP], [PAD] for the MiniLM tokenizer)."""
    texts = list(dict.fromkeys([r["source"] for r in records] + [r["target"] for r in records]))
    if not texts:
        return []
    special = tuple(int(t) for t in set(tokenizer([""]).input_ids[0].tolist()))
    tokenized = tokenizer(texts)
    ids = {text: [int(t) for t, m in zip(row, mask) if m]
           for text, row, mask in zip(texts, tokenized.input_ids, tokenized.attention_mask)}
    return [{**r, "novel_tokens": len(novel_tokens(ids[r["target"]], ids[r["source"]], special))} for r in records]


def calibrate_token_caps(records: Sequence[Mapping], thresholds: Sequence[Sequence[float]],
                         target: float = DEFAULT_TARGET, upper: Optional[float] = None,
                         min_n: Optional[int] = None) -> Dict[str, object]:
    """Token caps for a false-hit ``target`` under ``thresholds``, by :data:`TOKEN_CALIBRATION_RULE`
    (records annotated by :func:`with_novel_tokens`)."""
    setup = _setup(records, target, upper, min_n)
    constraint, calibration, heldout, arrays, allowed = (setup.constraint, setup.calibration, setup.heldout,
                                                         setup.arrays, setup.allowed)
    route = _route(arrays, thresholds)
    table_k = np.where(route >= 0, np.array(arrays.grid)[np.maximum(route, 0)], 0)
    counts = np.minimum(np.array([novel_count(r) for r in calibration]), MAX_NOVEL_COUNTED)
    options = (0,) + tuple(arrays.grid)
    grid = np.array(arrays.grid)
    best: Optional[Tuple[float, Tuple[int, ...]]] = None
    # Every non-increasing cap table, smaller caps first, so a tie keeps the smaller one.
    for caps in sorted(itertools.combinations_with_replacement(options, MAX_NOVEL_COUNTED + 1), key=sum):
        caps = tuple(sorted(caps, reverse=True))  # count 0 gets the largest cap
        capped = np.minimum(table_k, np.array(caps)[counts])
        served = capped  # both are grid steps (or 0), so their minimum is one too
        hit = served > 0
        column = np.maximum(np.searchsorted(grid, served), 0).clip(max=len(grid) - 1)
        false = hit & arrays.lost[np.arange(len(served)), column]
        hits = np.bincount(arrays.kind[hit], minlength=len(arrays.kinds))
        false_hits = np.bincount(arrays.kind[false], minlength=len(arrays.kinds))
        if np.any(false_hits > allowed[hits]):
            continue
        saved = float(served.sum())
        if best is None or saved > best[0] + 1e-9:
            best = (saved, caps)
    caps = best[1] if best is not None else (0,) * (MAX_NOVEL_COUNTED + 1)
    token = TokenCaps({count: int(cap) for count, cap in enumerate(caps)}, MAX_NOVEL_COUNTED)
    policy = Policy(f"token guard {target:g}", [list(r) for r in thresholds], token=token)
    return {"target": float(target), "upper": constraint.upper, "min_n": constraint.min_n,
            "thresholds": [list(r) for r in thresholds],
            "token_caps": {"caps": {str(c): k for c, k in token.caps.items()}, "max_counted": token.max_counted},
            "rule": TOKEN_CALIBRATION_RULE, "calibration": evaluate(policy, calibration),
            "heldout": evaluate(policy, heldout)}


def token_policy(calibration: Mapping, name: Optional[str] = None) -> Policy:
    caps = calibration["token_caps"]
    return Policy(name or f"token guard {calibration['target']:g}", [list(r) for r in calibration["thresholds"]],
                  token=TokenCaps({int(c): int(k) for c, k in caps["caps"].items()}, int(caps["max_counted"])))


# -- the frontier ------------------------------------------------------------------------------------

def unguarded_policies() -> List[Policy]:
    """The tables served before the guard, unchecked."""
    from nirvana_export import embedded

    return [Policy("paper's table", [list(p) for p in PAPER_THRESHOLDS]),
            Policy("MiniLM table", [list(p) for p in embedded.MINILM_THRESHOLDS]),
            Policy("band-calibrated table", [list(p) for p in BAND_CALIBRATED_THRESHOLDS])]


def frontier_policies(calibrations: Mapping[str, Mapping], token_calibration: Optional[Mapping] = None,
                      default_target: float = DEFAULT_TARGET) -> List[Policy]:
    """The policies of the frontier: the unguarded tables, the latent guard at the default target,
    the token guard, and the latent guard at every other target."""
    default = f"{default_target:g}"
    policies = unguarded_policies()
    if default in calibrations:
        policies.append(latent_policy(calibrations[default], f"latent guard {default} (default)"))
    if token_calibration is not None:
        policies.append(token_policy(token_calibration))
    policies += [latent_policy(c) for t, c in calibrations.items() if t != default]
    return policies


def frontier(records_heldout: Sequence[Mapping], policies: Sequence[Policy]) -> List[Dict[str, object]]:
    """Per policy on the held-out records: the worst kind's false-hit rate (and Wilson upper), the
    overall false-hit rate, hit rate, steps saved and wasted evaluations per hit."""
    rows = []
    for policy in policies:
        result = evaluate(policy, records_heldout)
        overall, worst = result["overall"], result["worst_kind"]
        worst_stats = result["kinds"][worst] if worst is not None else None
        rows.append({"policy": policy.name, "thresholds": policy.thresholds,
                     "worst_kind": worst,
                     "worst_false_hit_rate": worst_stats["false_hit_rate"] if worst_stats else 0.0,
                     "worst_wilson_upper": worst_stats["wilson_upper"] if worst_stats else 1.0,
                     "false_hit_rate": overall["false_hit_rate"], "wilson_upper": overall["wilson_upper"],
                     "hit_rate": overall["hit_rate"], "steps_saved": overall["steps_saved"],
                     "wasted_per_hit": overall["wasted_evals"] / overall["hits"] if overall["hits"] else 0.0})
    return rows


# -- rendering ---------------------------------------------------------------------------------------

def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown_frontier(rows: Sequence[Mapping]) -> str:
    lines = ["| policy | worst kind | its false-hit rate (Wilson upper) | false-hit rate | hit rate | "
             "UNet steps saved | wasted evals per hit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['worst_kind'] or '-'} | {_pct(r['worst_false_hit_rate'])} "
                     f"({_pct(r['worst_wilson_upper'])}) | {_pct(r['false_hit_rate'])} | {_pct(r['hit_rate'])} | "
                     f"{_pct(r['steps_saved'])} | {r['wasted_per_hit']:.2f} |")
    return "\n".join(lines)


def markdown_kinds(results: Sequence[Mapping]) -> str:
    """Per kind, several :func:`evaluate` results side by side (hit rate, false-hit rate, upper)."""
    head = "| kind | pairs |" + "".join(f" {r['policy']}: hits, false hits (Wilson upper) |" for r in results)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    kinds = list(results[0]["kinds"]) if results else []
    for kind in kinds + ["all"]:
        cells = []
        for r in results:
            s = r["overall"] if kind == "all" else r["kinds"][kind]
            cells.append(f" {_pct(s['hit_rate'])}, {_pct(s['false_hit_rate'])} ({_pct(s['wilson_upper'])}) |")
        pairs = (results[0]["overall"] if kind == "all" else results[0]["kinds"][kind])["pairs"]
        lines.append(f"| {kind} | {pairs} |" + "".join(cells))
    return "\n".join(lines)


def markdown_kind_table(rows: Sequence[Mapping]) -> str:
    lines = ["| K | similarity | kind | pairs | false-hit rate unchecked | within the bound | "
             "their false-hit rate (Wilson upper) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['band']} | {r['kind']} | {r['n']} | {_pct(r['false_hit_rate'])} | "
                     f"{r['passing']} | {_pct(r['passing_false_hit_rate'])} ({_pct(r['passing_wilson_upper'])}) |")
    return "\n".join(lines)


def compact_kind_table(rows: Sequence[Mapping]) -> str:
    """The K x kind part of :func:`kind_table` (bands pooled), for a console."""
    pooled: Dict[Tuple[int, str], List[float]] = {}
    for r in rows:
        cell = pooled.setdefault((r["k"], r["kind"]), [0, 0.0, 0, 0.0])
        cell[0] += r["n"]
        cell[1] += r["false_hit_rate"] * r["n"]
        cell[2] += r["passing"]
        cell[3] += (r["passing_false_hit_rate"] or 0.0) * r["passing"]
    ks = sorted({k for k, _ in pooled})
    kinds = list(dict.fromkeys(kind for _, kind in pooled))
    lines = ["false-hit rate if resumed at K unchecked / within the guard's bound (pairs within), bands pooled",
             f"{'kind':<28}" + "".join(f"{'K=' + str(k):>18}" for k in ks)]
    for kind in kinds:
        cells = []
        for k in ks:
            n, lost, passing, passing_lost = pooled.get((k, kind), [0, 0.0, 0, 0.0])
            unchecked = f"{100 * lost / n:.0f}%" if n else "-"
            within = f"{100 * passing_lost / passing:.0f}%" if passing else "-"
            cells.append(f"{unchecked + '/' + within + ' (' + str(passing) + ')':>18}")
        lines.append(f"{kind:<28}" + "".join(cells))
    return "\n".join(lines)


def save_frontier_plot(path: Path, rows: Sequence[Mapping]) -> None:
    """False-hit rate (worst kind) against UNet steps saved, one point per policy; the error bar
    reaches the worst kind's Wilson upper bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        rate, upper = 100 * r["worst_false_hit_rate"], 100 * r["worst_wilson_upper"]
        ax.errorbar([100 * r["steps_saved"]], [rate], yerr=[[0.0], [max(upper - rate, 0.0)]], marker="o", capsize=3,
                    label=r["policy"])
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("UNet steps saved (% of 50 per request)")
    ax.set_ylabel("false-hit rate of the worst kind (%), bar to Wilson upper")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tail_report(records: Sequence[Mapping], targets: Sequence[float] = TARGETS,
                default_target: float = DEFAULT_TARGET, floor: float = harness.UNRELATED_FLOOR,
                tokenizer=None) -> Dict[str, object]:
    """Everything nirvana-quality reports and writes about the tail, from the records alone:
    the calibration per target, the token variant (with a tokenizer), the per-kind comparison of
    the default policy and the paper's table on held-out pairs, the K x band x kind table and the
    frontier."""
    if not records:
        raise ValueError("no tail records: measure them first (nirvana-quality, or python -m nirvana_quality.tail)")
    calibrations = calibrate_targets(records, targets, floor)
    default = calibrations[f"{default_target:g}"]
    token_calibration = None
    if tokenizer is not None:
        annotated = with_novel_tokens(records, tokenizer)
        # Every pair at or above the floor starts at the largest K: the caps alone lower it.
        token_calibration = calibrate_token_caps(annotated, [[floor, max(TAIL_KS)]], default_target)
        records = annotated
    _, heldout = split(records)
    default_policy = latent_policy(default, f"latent guard {default_target:g} (default)")
    kinds = [evaluate(default_policy, heldout), evaluate(unguarded_policies()[0], heldout)]
    unguarded = calibrate_unguarded(records, default_target, floor=floor)
    policies = frontier_policies(calibrations, token_calibration, default_target)
    policies.append(Policy(f"tail-calibrated table, no guard ({default_target:g})", unguarded["thresholds"]))
    # The variant the rule no longer chooses (CALIBRATED_FALLBACKS): downgrades going on from the probe.
    probe_variant = calibrate_tail(records, default_target, floor=floor, fallbacks=(PROBE_K,))
    policies.append(latent_policy(probe_variant, f"latent guard {default_target:g}, fallback probe"))
    rows = frontier(heldout, policies)
    return {"records": len(records), "calibration_pairs": len(records) - len(heldout), "heldout_pairs": len(heldout),
            "targets": calibrations, "default_target": float(default_target), "token": token_calibration,
            "unguarded": unguarded,
            "kinds_heldout": kinds, "kind_table": kind_table(records, TAIL_KS, default_policy.latent),
            "frontier": rows}


def guard_calibration(report: Mapping) -> Dict[str, object]:
    """The calibration file's (and pipeline.json's) "guard" entry (read by
    :func:`nirvana.guard.calibration_for`)."""
    targets = {}
    for key, c in report["targets"].items():
        targets[key] = {"thresholds": c["thresholds"], "guard": c["guard"], "upper": c["upper"], "min_n": c["min_n"],
                        "calibration": _brief(c["calibration"]), "heldout": _brief(c["heldout"])}
    return {"metric": "guidance_divergence", "rule": TAIL_CALIBRATION_RULE, "constraint": CONSTRAINT_RULE,
            "default_target": report["default_target"], "targets": targets,
            "records": report["records"], "frontier": report["frontier"],
            **({"token": {k: report["token"][k] for k in ("target", "thresholds", "token_caps", "rule")}}
               if report.get("token") else {})}


def _brief(result: Mapping) -> Dict[str, object]:
    """An :func:`evaluate` result without the per-kind detail but the worst kind's."""
    worst = result["worst_kind"]
    return {"overall": result["overall"], "worst_kind": worst,
            "worst": result["kinds"][worst] if worst is not None else None,
            "kinds": {k: {"hits": s["hits"], "false_hits": s["false_hits"], "pairs": s["pairs"]}
                      for k, s in result["kinds"].items()}}
