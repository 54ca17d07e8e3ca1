"""``nirvana-simulate``: replay a prompt log through the cache engine, without running diffusion.

Prompts are embedded with the served model's own tokenizer and ONNX text
encoder (from the model repository), so similarities are the ones the server
sees. For each eviction policy and cache size it reports hit rates, the
histogram of resumed steps K and the fraction of UNet steps saved; it also
characterizes the log like the paper does (repeat rate, popularity skew,
nearest-neighbour similarity) and measures similarity distributions of
related and unrelated prompt pairs, from which the embedded model's thresholds
were chosen.

It also compares lookups and threshold tables side by side (LCBFU at each size and in an
unbounded cache): the nearest entry only (``--lookup-k 1``) against the best of the k
nearest (the configured ``lookup_k``), and the configured thresholds ("current") against any
table given with ``--thresholds`` (a JSON list such as ``[[0.95,25],[0.91,20]]``, "0.95:25,..."
text, or a pipeline.json with a "thresholds" key; ``LABEL=`` in front names it). Each table
runs with the configured cache_steps plus every K it names, as a server configured with it
would have to. The "bound" column is the share of requests whose nearest earlier prompt is
within the table at all (or that repeat an earlier prompt and seed): what no lookup can exceed.

Examples:
    nirvana-simulate perf/data/diffusiondb_sample.jsonl
    nirvana-simulate ../shared/workloads/sd_discord_dreambot_W1-dream-2.jsonl --limit 20000 --sizes 500,2000,8000
    nirvana-simulate perf/data/diffusiondb_sample.jsonl --lookup-k 1,4,8,16 \
        --thresholds calibrated=path/to/pipeline.json --thresholds 'strict=[[0.97,25],[0.93,20]]'
    nirvana-simulate ../shared/workloads/sd_discord_dreambot_W1-dream-2.jsonl --limit 20000 --no-compare \
        --policies '' --guard-tokens 0:40,1:10,2:5,3:0 --guarded-thresholds '[[0.9,40],[0.85,35],[0.71,5]]' \
        --guard-bounds 10:0.35,35:0.35,40:0.35

The resume guard comparison (LCBFU, unbounded cache, the configured lookup_k) sets the paper's
table and the current one, unguarded, against the guard's two variants. The token check (a) is
decidable offline and replayed fully: every lookup caps each candidate's K by the novel tokens of
the request's prompt against the candidate's (``--guard-tokens``). The latent check (b) needs the
UNet: the guarded thresholds replayed unguarded are an upper bound, and the estimate downgrades
each checked approximate hit with the rate measured on the held-out tail records of the shapes
quality pairs at its K and similarity band (``--guard-records``, ``--guard-bounds``), counting the
probe's half evaluation and the fallback (:func:`hit_savings`): that rests on the embedded shapes
model's calibration. Defaults come from the calibration file's "guard" entry; a
variant without its inputs is skipped, with a note saying why.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nirvana.cache import CacheKey, LatentCache
from nirvana.config import (PAPER_THRESHOLDS, PIPELINE_FILE, CacheConfig, ConfigError, PipelineSpec,
                            _parse_thresholds, parse_parameters, read_pbtxt_parameters)
from nirvana.guard import FALLBACK_NOISE, FALLBACK_PROBE, GuardPolicy, TokenCaps, novel_tokens
from nirvana.onnx_session import OnnxModel
from nirvana.steps import start_step_for
from nirvana.text import PromptTokenizer

STEPS = 50
POLICIES = ("lcbfu", "lru", "lfu", "fifo")


# -- data --------------------------------------------------------------------------------------

def load_log(path: Path, limit: Optional[int] = None) -> List[dict]:
    """Rows of a JSON Lines prompt log with a non-empty ``prompt`` (``seed``, ``user`` optional)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if str(row.get("prompt", "")).strip():
                rows.append(row)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no rows with a prompt")
    return rows


class RepositoryEmbedder:
    """The served model's tokenizer and ONNX text encoder, outside Triton."""

    def __init__(self, repository: Path):
        repository = Path(repository)
        self.spec = PipelineSpec.load(repository / "text_encoder" / "1")
        self.tokenizer = PromptTokenizer(repository / "tokenizer" / "1" / "tokenizer", self.spec.max_length)
        self.encoder = OnnxModel(repository / "text_encoder" / "1" / "model.onnx")

    def embed(self, prompts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        out = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="embedding", unit="batch",
                      disable=not progress, file=sys.stderr):
            tokens = self.tokenizer(prompts[i:i + batch_size])
            out.append(self.encoder.run({"INPUT_IDS": tokens.input_ids,
                                         "ATTENTION_MASK": tokens.attention_mask})["POOLED_EMBEDDING"])
        return np.concatenate(out).astype(np.float32)


def embed_with_cache(embedder: RepositoryEmbedder, prompts: Sequence[str], cache_dir: Path) -> np.ndarray:
    """Embeddings of ``prompts``, reusing a saved .npy for the same model and prompts."""
    digest = hashlib.sha256((embedder.spec.model_id + "\x1e" + "\x1f".join(prompts)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"embeddings-{digest}.npy"
    if path.exists():
        return np.load(path)
    unique = sorted(set(prompts))
    vectors = embedder.embed(unique)
    lookup = {p: i for i, p in enumerate(unique)}
    embeddings = vectors[[lookup[p] for p in prompts]]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, embeddings)
    return embeddings


# -- characterization --------------------------------------------------------------------------

def nearest_previous_similarity(embeddings: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each request, the highest cosine similarity to any earlier request (-1 for the first)."""
    n = len(embeddings)
    best = np.full(n, -1.0, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = embeddings[start:stop] @ embeddings[:stop].T
        rows = np.arange(stop - start)
        sims[rows[:, None] + start <= np.arange(stop)[None, :]] = -1.0  # only earlier requests
        best[start:stop] = sims.max(axis=1)
    return best


def characterize(prompts: Sequence[str], embeddings: np.ndarray,
                 nearest: Optional[np.ndarray] = None) -> Dict[str, object]:
    """The log's repeat rate, popularity skew and nearest-earlier-prompt similarity (``nearest``:
    :func:`nearest_previous_similarity` of ``embeddings``, computed here when not given)."""
    counts = collections.Counter(prompts)
    freqs = np.array(sorted(counts.values(), reverse=True), dtype=np.float64)
    n = len(prompts)
    top = lambda frac: float(freqs[:max(1, int(len(freqs) * frac))].sum() / n)  # noqa: E731
    ranks = np.arange(1, len(freqs) + 1)
    repeated = freqs > 1
    alpha = float(-np.polyfit(np.log(ranks[repeated]), np.log(freqs[repeated]), 1)[0]) if repeated.sum() > 2 else 0.0
    nn = (nearest_previous_similarity(embeddings) if nearest is None else nearest)[1:]
    return {
        "requests": n, "unique_prompts": len(counts),
        "repeat_rate": float(1 - len(counts) / n),
        "top_1pct_share": top(0.01), "top_10pct_share": top(0.10), "zipf_alpha_repeated": alpha,
        "nn_similarity_percentiles": {str(q): float(np.percentile(nn, q)) for q in (10, 25, 50, 75, 90, 99)},
        "nn_similarity_histogram": np.histogram(nn, bins=20, range=(-0.2, 1.0))[0].tolist(),
    }


def pair_similarities(rows: Sequence[dict], embeddings: np.ndarray, seed: int = 0) -> Dict[str, np.ndarray]:
    """Similarity of consecutive prompt pairs by the same user, split by word overlap, and of random pairs.

    near-duplicate: distinct prompts sharing >= 70% of their words (Jaccard), e.g. an added style word;
    rewrite: 30-70% shared words (same subject, edited); unrelated: random pairs of the log.
    """
    words = [set(str(r["prompt"]).lower().split()) for r in rows]
    last_by_user: Dict[str, int] = {}
    groups: Dict[str, List[float]] = {"near_duplicate": [], "rewrite": [], "unrelated": []}
    for i, row in enumerate(rows):
        user = row.get("user")
        if user:
            j = last_by_user.get(user)
            if j is not None and rows[j]["prompt"] != row["prompt"]:
                jac = len(words[i] & words[j]) / max(1, len(words[i] | words[j]))
                group = "near_duplicate" if jac >= 0.7 else "rewrite" if jac >= 0.3 else None
                if group:
                    groups[group].append(float(embeddings[i] @ embeddings[j]))
            last_by_user[user] = i
    rng = random.Random(seed)
    for _ in range(min(20000, len(rows) * 2)):
        i, j = rng.randrange(len(rows)), rng.randrange(len(rows))
        if rows[i]["prompt"] != rows[j]["prompt"]:
            groups["unrelated"].append(float(embeddings[i] @ embeddings[j]))
    return {k: np.array(v, dtype=np.float32) for k, v in groups.items()}


# -- replay ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReplayResult:
    policy: str
    capacity_states: int
    admit_on_hit: bool
    requests: int
    exact_hits: int
    approximate_hits: int
    k_histogram: Dict[int, int]
    steps_saved_fraction: float
    evicted_states: int
    lookup_k: int = 1
    thresholds_label: str = ""
    unbounded: bool = False  # capacity_states holds every state of the log: nothing is ever evicted
    lookup_us_mean: float = 0.0  # mean wall time of LatentCache.lookup (search, candidates, store)
    token_eligible: int = 0  # with the token guard: lookups with a candidate within the thresholds
    token_capped: int = 0  # ... whose best K the token cap lowered (to 0 included)

    @property
    def hit_rate(self) -> float:
        return (self.exact_hits + self.approximate_hits) / self.requests


def request_seed(row: dict, i: int) -> int:
    """The log's seed, or a distinct one per request (no exact hits) when it has none."""
    return int(row["seed"]) if row.get("seed") is not None else 1_000_000 + i


def unbounded_capacity(rows: Sequence[dict], config: CacheConfig) -> int:
    """States a cache would need to never evict during a replay of ``rows`` (every cache step and
    the final latents of every request)."""
    return len(rows) * (len(config.cache_steps) + 1)


def replay(rows: Sequence[dict], embeddings: np.ndarray, config: CacheConfig, capacity_states: int,
           progress: bool = False, label: str = "", token_guard: Optional["TokenGuard"] = None,
           hits: Optional[List[Tuple[int, float]]] = None) -> ReplayResult:
    """Send every request of the log through a fresh cache holding at most ``capacity_states`` states.

    A state is a 1-element fp32 tensor (4 bytes), so the byte budget counts states.
    Every request runs at STEPS=50; the log's seed is used when present.

    Args:
        token_guard: The resume guard's token check (variant a): every lookup is capped by it.
        hits: When given, (K, similarity) of every approximate hit is appended to it.
    """
    config = dataclasses.replace(config, host_bytes=4 * capacity_states, device_bytes=0, disk_bytes=0,
                                 store_dtype="float32", use_gpu=False)
    cache = LatentCache(config, embeddings.shape[1])
    state = torch.zeros(1)
    saved = 0
    looking = 0.0
    hist: Dict[int, int] = collections.Counter()
    desc = f"{label + ' ' if label else ''}{config.eviction} {capacity_states} k={config.lookup_k}"
    if token_guard is not None:
        token_guard.reset()
    for i, row in enumerate(tqdm(rows, desc=desc, disable=not progress, file=sys.stderr, leave=False)):
        key = CacheKey(str(row["prompt"]), "", request_seed(row, i), STEPS, 7.5)
        k_cap = None if token_guard is None else \
            token_guard.request(i, key.prompt, config.thresholds, config.base_steps)
        began = time.perf_counter()
        result = cache.lookup(embeddings[i], key) if k_cap is None else cache.lookup(embeddings[i], key, k_cap=k_cap)
        looking += time.perf_counter() - began
        if token_guard is not None:
            token_guard.settle()
        if hits is not None and result.status == "approximate":
            hits.append((result.start_step, float(result.similarity)))
        hist[result.start_step] += 1
        saved += result.start_step
        if result.status != "exact":
            checkpoints = {k: state for k in result.save_steps}
            cache.admit(embeddings[i], key, checkpoints, final_latents=state, was_hit=result.status != "miss")
    c = cache.counters
    cache.close()
    return ReplayResult(config.eviction, capacity_states, config.admit_on_hit, len(rows), c["exact_hits"],
                        c["approximate_hits"], dict(sorted(hist.items())), saved / (STEPS * len(rows)),
                        c["evicted_states"], config.lookup_k, label,
                        capacity_states >= unbounded_capacity(rows, config), 1e6 * looking / len(rows),
                        token_guard.eligible if token_guard else 0, token_guard.capped if token_guard else 0)


# -- lookups and threshold tables compared -----------------------------------------------------

Thresholds = Tuple[Tuple[float, int], ...]


def parse_thresholds_option(text: str, index: int = 0) -> Tuple[str, Thresholds]:
    """``[LABEL=]SPEC``, SPEC being a JSON list of [similarity, K] pairs, "similarity:K,..." text,
    or a pipeline.json (or the folder holding one) whose "thresholds" key is such a list.

    Returns:
        The label (default: the file's path, or "T<index>") and the pairs, highest similarity first.

    Raises:
        ConfigError: Naming what is wrong.
    """
    label = ""
    match = re.match(r"^([\w.\- ]+)=(.+)$", text.strip())
    if match and not Path(text.strip()).exists():
        label, text = match.group(1).strip(), match.group(2)
    spec = text.strip()
    if spec.startswith("["):
        try:
            pairs = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--thresholds {text!r}: not a JSON list: {exc}") from exc
        label = label or f"T{index}"
    elif Path(spec).exists():
        path = Path(spec) / PIPELINE_FILE if Path(spec).is_dir() else Path(spec)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--thresholds {path}: cannot read it as JSON: {exc}") from exc
        pairs = data.get("thresholds") if isinstance(data, dict) else data
        if pairs is None:
            raise ConfigError(f"--thresholds {path}: no \"thresholds\" key")
        label = label or str(spec)
    elif ":" in spec:
        pairs = _parse_thresholds(spec)
        label = label or f"T{index}"
    else:
        raise ConfigError(f"--thresholds {text!r}: neither a JSON list, SIMILARITY:K pairs nor an existing file")
    try:
        table = tuple(sorted(((float(sim), int(k)) for sim, k in pairs), reverse=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--thresholds {text!r}: expected [similarity, K] pairs: {exc}") from exc
    if not table:
        raise ConfigError(f"--thresholds {text!r}: the table is empty")
    return label, table


def config_for_thresholds(config: CacheConfig, thresholds: Thresholds) -> CacheConfig:
    """``config`` with ``thresholds``, its cache_steps extended by every K the table names (a
    table may resume past the configured steps, e.g. K=30 of 50)."""
    steps = tuple(sorted(set(config.cache_steps) | {k for _, k in thresholds}))
    out = dataclasses.replace(config, thresholds=tuple(thresholds), cache_steps=steps)
    out.validate()
    return out


def replay_bound(rows: Sequence[dict], nearest: np.ndarray, config: CacheConfig) -> Dict[str, float]:
    """What no lookup can beat in an unbounded cache: a request is reachable when it repeats an
    earlier prompt and seed (an exact hit, 50 steps) or its nearest earlier prompt is within the
    thresholds (the K that similarity allows); the first request never is."""
    seen = set()
    hits = 0
    saved = 0
    for i, row in enumerate(rows):
        exact = (str(row["prompt"]), request_seed(row, i))
        if config.exact_hit and exact in seen:
            hits += 1
            saved += STEPS
        elif i:
            k = start_step_for(float(nearest[i]), config.thresholds, config.base_steps, STEPS)
            hits += k > 0
            saved += k
        seen.add(exact)
    return {"hit_rate": hits / len(rows), "steps_saved_fraction": saved / (STEPS * len(rows))}


def compare_lookups(rows: Sequence[dict], embeddings: np.ndarray, nearest: np.ndarray, config: CacheConfig,
                    tables: Sequence[Tuple[str, Thresholds]], lookup_ks: Sequence[int], sizes: Sequence[int],
                    progress: bool = True) -> Tuple[List[ReplayResult], Dict[str, Dict[str, object]]]:
    """Every threshold table x lookup_k x capacity (``sizes`` and unbounded), LCBFU.

    Returns:
        The replays, and per table its cache_steps and :func:`replay_bound`.
    """
    results: List[ReplayResult] = []
    tables_info: Dict[str, Dict[str, object]] = {}
    for label, thresholds in tables:
        table_config = config_for_thresholds(dataclasses.replace(config, eviction="lcbfu"), thresholds)
        tables_info[label] = {"thresholds": table_config.thresholds, "cache_steps": table_config.cache_steps,
                              "bound": replay_bound(rows, nearest, table_config)}
        capacities = sorted(set(sizes)) + [unbounded_capacity(rows, table_config)]
        for size in capacities:
            for k in lookup_ks:
                results.append(replay(rows, embeddings, dataclasses.replace(table_config, lookup_k=k), size,
                                      progress=progress, label=label))
    return results, tables_info


def comparison_table(results: Sequence[ReplayResult], tables_info: Dict[str, Dict[str, object]],
                     lookup_ks: Sequence[int]) -> str:
    """Markdown: one row per (thresholds, capacity), hit rate and steps saved per lookup_k side by side."""
    head = ["thresholds", "capacity (states)", "bound: hit rate / steps saved"]
    for k in lookup_ks:
        name = "top-1" if k == 1 else f"best of {k}"
        head += [f"{name}: hit rate", f"{name}: steps saved", f"{name}: lookup µs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_row: Dict[Tuple[str, int], Dict[int, ReplayResult]] = collections.defaultdict(dict)
    for r in results:
        by_row[(r.thresholds_label, r.capacity_states)][r.lookup_k] = r
    for (label, capacity), runs in by_row.items():
        bound = tables_info[label]["bound"]
        any_run = next(iter(runs.values()))
        cells = [label, "unbounded" if any_run.unbounded else str(capacity),
                 f"{bound['hit_rate']:.1%} / {bound['steps_saved_fraction']:.1%}"]
        for k in lookup_ks:
            r = runs.get(k)
            cells += ["" if r is None else f"{r.hit_rate:.1%}", "" if r is None else f"{r.steps_saved_fraction:.1%}",
                      "" if r is None else f"{r.lookup_us_mean:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the resume guard compared ---------------------------------------------------------------------

CALIBRATION_FILE = Path("export/weights/calibration.json")
GUARD_RECORDS = Path("perf/results/quality/tail_records.jsonl")
LATENT_CAVEAT = ("the latent estimate applies the downgrade rates measured on the shapes quality pairs "
                 "(held-out tail records) per resumed K and similarity band: it rests on the embedded shapes "
                 "model's calibration, not on the log's own prompts, which no UNet has run on here; the upper "
                 "bound is the guarded thresholds replayed unguarded")


def parse_token_caps(text: str) -> TokenCaps:
    """``COUNT:K,...`` (e.g. "0:40,1:10,2:5,3:0"; the largest count stands for every count above it)
    or the calibration's JSON ``{"caps": {"0": 40, ...}, "max_counted": 3}``.

    Raises:
        ConfigError: Naming what is wrong.
    """
    spec = text.strip()
    try:
        if spec.startswith("{"):
            data = json.loads(spec)
            caps = {int(c): int(k) for c, k in dict(data["caps"]).items()}
            max_counted = int(data.get("max_counted", max(caps) if caps else 0))
        else:
            caps = {int(c): int(k) for c, k in (part.split(":") for part in spec.split(",") if part.strip())}
            max_counted = max(caps) if caps else 0
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--guard-tokens {text!r}: expected COUNT:K pairs or {{\"caps\": ...}}: {exc}") from exc
    if not caps or any(c < 0 or k < 0 or k >= STEPS for c, k in caps.items()):
        raise ConfigError(f"--guard-tokens {text!r}: counts and K must be >= 0, K below {STEPS}")
    return TokenCaps(caps, max_counted)


def parse_bounds(text: str) -> Dict[int, float]:
    """``K:BOUND,...`` (e.g. "5:0.35,10:0.35") or a JSON object ``{"10": 0.4, ...}``.

    Raises:
        ConfigError: Naming what is wrong.
    """
    spec = text.strip()
    try:
        pairs = json.loads(spec).items() if spec.startswith("{") else \
            (part.split(":") for part in spec.split(",") if part.strip())
        bounds = {int(k): float(b) for k, b in pairs}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"--guard-bounds {text!r}: expected K:BOUND pairs: {exc}") from exc
    if not bounds:
        raise ConfigError(f"--guard-bounds {text!r}: no bounds")
    return bounds


def calibration_guard(path: Optional[Path]) -> Dict[str, object]:
    """The "guard" entry of a calibration file ({} when the file or the entry is missing)."""
    if path is None or not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return dict(data.get("guard") or {}) if isinstance(data, dict) else {}


def _default_target(guard: Mapping[str, object]) -> Optional[Mapping[str, object]]:
    """The calibration of the guard's default target (its key is the target as text, e.g. "0.02")."""
    targets = dict(guard.get("targets") or {})
    target = guard.get("default_target")
    if target is None:
        return None
    for key in (str(target), f"{float(target):g}"):
        if key in targets:
            return targets[key]
    return next((v for k, v in targets.items() if abs(float(k) - float(target)) < 1e-12), None)


@dataclasses.dataclass
class GuardInputs:
    """What the guard comparison replays with, each from an option or the calibration.

    Attributes:
        token_caps: Variant a's caps (None: the token rows are skipped).
        token_thresholds: The table the token caps were calibrated on, when the calibration names one.
        guarded: The thresholds table calibrated with the latent guard (variant b).
        policy: The latent guard: bounds per K, probe_k, fallback, unchecked_max_k.
        records: Held-out tail records (the latent estimate's downgrade rates).
        sources: Where each input came from.
        notes: Why a variant is skipped.
    """

    token_caps: Optional[TokenCaps] = None
    token_thresholds: Optional[Thresholds] = None
    guarded: Optional[Thresholds] = None
    policy: Optional[GuardPolicy] = None
    records: List[dict] = dataclasses.field(default_factory=list)
    sources: Dict[str, str] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def token(self) -> bool:
        return self.token_caps is not None

    @property
    def latent(self) -> bool:
        return self.guarded is not None and self.policy is not None and bool(self.records)

    def describe(self) -> Dict[str, object]:
        return {"token_caps": None if self.token_caps is None else
                {"caps": {str(c): k for c, k in sorted(self.token_caps.caps.items())},
                 "max_counted": self.token_caps.max_counted},
                "guarded_thresholds": self.guarded, "policy": None if self.policy is None else self.policy.as_dict(),
                "heldout_records": len(self.records), "sources": self.sources, "notes": self.notes}


def guard_inputs(calibration: Optional[Path], tokens: Optional[str] = None, guarded: Optional[str] = None,
                 bounds: Optional[str] = None, fallback: Optional[str] = None, records: Optional[Path] = None,
                 model_id: Optional[str] = None, spec_guard: Optional[Mapping[str, object]] = None,
                 probe_k: Optional[int] = None, unchecked_max_k: Optional[int] = None) -> GuardInputs:
    """The guard comparison's inputs: the options given, else the calibration file's "guard" entry
    (else the model repository's, ``spec_guard``), the tail records at ``records``.

    Raises:
        ConfigError: An option that does not parse.
    """
    out = GuardInputs()
    guard = calibration_guard(calibration)
    origin = str(calibration)
    if not guard and spec_guard:
        guard, origin = dict(spec_guard), "the model repository's pipeline.json"
    chosen = _default_target(guard) or {}
    token_entry = dict(guard.get("token") or {})
    caps_data = guard.get("token_caps") or token_entry.get("token_caps")
    if tokens:
        out.token_caps, out.sources["token_caps"] = parse_token_caps(tokens), "--guard-tokens"
    elif caps_data:
        out.token_caps, out.sources["token_caps"] = parse_token_caps(json.dumps(caps_data)), origin
        if token_entry.get("thresholds"):
            out.token_thresholds = parse_thresholds_option(json.dumps(token_entry["thresholds"]))[1]
    else:
        out.notes.append(f"token guard skipped: no --guard-tokens and no guard → token_caps in {calibration}")
    if guarded:
        out.guarded, out.sources["guarded_thresholds"] = parse_thresholds_option(guarded)[1], "--guarded-thresholds"
    elif chosen.get("thresholds"):
        out.guarded = parse_thresholds_option(json.dumps(chosen["thresholds"]))[1]
        out.sources["guarded_thresholds"] = f"{origin} (target {guard.get('default_target')})"
    calibrated = GuardPolicy.from_dict(chosen["guard"]) if chosen.get("guard") else None
    if bounds or calibrated is not None:
        default = calibrated or GuardPolicy()
        try:
            out.policy = GuardPolicy(parse_bounds(bounds) if bounds else dict(default.bounds),
                                     default.probe_k if probe_k is None else int(probe_k),
                                     default.fallback if fallback is None else str(fallback),
                                     default.unchecked_max_k if unchecked_max_k is None else int(unchecked_max_k))
        except ValueError as exc:
            raise ConfigError(f"--guard-*: {exc}") from exc
        out.sources["bounds"] = "--guard-bounds" if bounds else origin
    if records is not None and Path(records).exists():
        try:
            loaded = _load_tail_records(Path(records), model_id)
        except ValueError as exc:
            loaded = []
            out.notes.append(f"latent guard skipped: {exc}")
        # The held-out half, as the quality harness splits it (the odd-ranked pairs of each kind).
        from nirvana_quality.policies import split

        out.records = split(loaded)[1] if loaded else []
        if loaded and not out.records:
            out.notes.append(f"latent guard skipped: {records} holds no held-out records")
        out.sources["records"] = str(records)
    missing = [what for what, have in (("tail records (--guard-records)", bool(out.records) or
                                        (records is not None and Path(records).exists())),
                                       ("guarded thresholds (--guarded-thresholds)", out.guarded is not None),
                                       ("bounds per K (--guard-bounds)", out.policy is not None)) if not have]
    if missing:
        out.notes.append(f"latent guard skipped: no {', no '.join(missing)} (nor in the calibration file's "
                         f"guard → targets → default target, {calibration})")
    return out


def _load_tail_records(path: Path, model_id: Optional[str]) -> List[dict]:
    from nirvana_quality.tail import load_records

    return load_records(path, model_id)


class TokenGuard:
    """Variant a in a replay: ``k_cap`` for a request's lookup, from the novel tokens of its prompt
    against each candidate's (token ids kept per prompt, counts per pair), and how often the cap
    lowered what the thresholds alone would give."""

    def __init__(self, caps: TokenCaps, tokenizer: PromptTokenizer, prompts: Sequence[str],
                 embeddings: np.ndarray, batch_size: int = 256):
        self.caps = caps
        self._tokenizer = tokenizer
        self.special = tuple(int(t) for t in set(tokenizer([""]).input_ids[0].tolist()))
        self._ids: Dict[str, Tuple[int, ...]] = {}
        self._tokenize(list(dict.fromkeys(prompts)), batch_size)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self._unit = embeddings / np.maximum(norms, 1e-12)
        self._row = {}
        for i, p in enumerate(prompts):
            self._row.setdefault(p, i)
        self._caps: Dict[Tuple[str, str], int] = {}
        self.reset()

    def _tokenize(self, prompts: List[str], batch_size: int) -> None:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            tokens = self._tokenizer(batch)
            for prompt, ids, mask in zip(batch, tokens.input_ids, tokens.attention_mask):
                self._ids[prompt] = tuple(int(t) for t, m in zip(ids, mask) if m)

    def ids(self, prompt: str) -> Tuple[int, ...]:
        if prompt not in self._ids:
            self._tokenize([prompt], 1)
        return self._ids[prompt]

    def cap_for(self, new: str, cached: str) -> int:
        """The largest K (at 50 steps) a hit of ``new`` on ``cached`` may resume at."""
        pair = (new, cached)
        cap = self._caps.get(pair)
        if cap is None:
            count = len(novel_tokens(self.ids(new), self.ids(cached), self.special))
            cap = self._caps[pair] = int(self.caps.cap(count) or 0)
        return cap

    def reset(self) -> None:
        self.eligible = 0  # lookups where a candidate was within the thresholds
        self.capped = 0  # ... and the cap lowered the best K the thresholds would have given

    def request(self, index: int, prompt: str, thresholds: Thresholds, base_steps: int) -> Callable[[CacheKey], int]:
        """The ``k_cap`` of request ``index`` (call :meth:`settle` after its lookup)."""
        unit = self._unit[index]
        self._table_k = self._capped_k = 0

        def k_cap(candidate: CacheKey) -> int:
            cap = self.cap_for(prompt, candidate.prompt)
            row = self._row.get(candidate.prompt)
            if row is not None:
                k = start_step_for(float(self._unit[row] @ unit), thresholds, base_steps, base_steps)
                self._table_k = max(self._table_k, k)
                self._capped_k = max(self._capped_k, min(k, cap))
            return cap

        return k_cap

    def settle(self) -> None:
        if self._table_k > 0:
            self.eligible += 1
            self.capped += self._capped_k < self._table_k
        self._table_k = self._capped_k = 0


def _measured_step(record: Mapping, k: int) -> Optional[str]:
    """The record's measured K for a hit at ``k``: the largest at or below it, else the smallest."""
    measured = sorted(int(s) for s in record["k"])
    if not measured:
        return None
    below = [s for s in measured if s <= k]
    return str(below[-1] if below else measured[0])


def record_downgraded(record: Mapping, k: int, policy: GuardPolicy) -> bool:
    """Whether the latent check downgrades the record's hit at ``k`` (as the quality harness judges
    it, :mod:`nirvana_quality.policies`): the served check probes the entry's state at probe_k, so
    the record's divergence there decides against the bound for K; no bound for K, or no
    divergence measured, downgrades. A hit at or below ``unchecked_max_k`` is never checked."""
    if k <= policy.unchecked_max_k:
        return False
    bound = policy.bounds.get(k)
    probe = record["k"].get(str(policy.probe_k))
    divergence = None if probe is None or k <= policy.probe_k else probe.get("divergence")
    return bound is None or divergence is None or float(divergence) > bound


def downgrade_rates(records: Sequence[Mapping], policy: GuardPolicy, ks: Sequence[int],
                    edges: Optional[Sequence[float]] = None) -> Dict[Tuple[int, Optional[int]], Tuple[float, int]]:
    """(rate, records) of downgrades per (K, similarity band) over ``records``, and per (K, None)
    over all bands (for a band without records)."""
    from nirvana_quality.harness import BAND_EDGES, band_of

    edges = BAND_EDGES if edges is None else edges
    counts: Dict[Tuple[int, Optional[int]], List[int]] = collections.defaultdict(lambda: [0, 0])
    for record in records:
        band = band_of(float(record["similarity"]), edges)
        for k in ks:
            down = record_downgraded(record, k, policy)
            for cell in ((k, band), (k, None)):
                counts[cell][0] += down
                counts[cell][1] += 1
    return {cell: (down / n, n) for cell, (down, n) in counts.items() if n}


# UNet evaluations a checked hit's probe costs: one conditional row, the stored unconditional
# prediction standing in for the other (the log's requests all share the empty negative prompt).
PROBE_COST = 0.5


def hit_savings(k: int, rate: float, policy: GuardPolicy, probe_cost: float = PROBE_COST) -> float:
    """Expected UNet evaluations a hit at ``k`` saves under the latent check, downgraded with
    probability ``rate``. Unchecked (K <= unchecked_max_k): K. Checked: the probe costs
    ``probe_cost`` pass or fail; a pass then jumps to x_K (K - probe_cost); a downgrade to "probe"
    goes on from x_p with the probe's prediction as that step's (p + 1 - probe_cost), one to "noise"
    restarts from the request's own noise (-probe_cost)."""
    if k <= policy.unchecked_max_k:
        return float(k)
    down = policy.probe_k + 1 - probe_cost if policy.fallback == FALLBACK_PROBE else -probe_cost
    return (1 - rate) * (k - probe_cost) + rate * down


def latent_estimate(hits: Sequence[Tuple[int, float]], exact_hits: int, requests: int, records: Sequence[Mapping],
                    policy: GuardPolicy, edges: Optional[Sequence[float]] = None,
                    probe_cost: float = PROBE_COST) -> Dict[str, float]:
    """Variant b's expected effect on a replay: each approximate hit (K, similarity) is downgraded
    with the records' rate in (K, band of the similarity) (all bands' rate where its band has no
    record) and saves :func:`hit_savings`; a hit downgraded to noise is a miss. Deterministic
    expectations, no sampling.

    Returns:
        hit_rate, approximate_hits, exact_hits, steps_saved_fraction, downgraded (expected
        count), downgraded_share (of approximate hits), checked (hits above unchecked_max_k) and
        pooled_hits (hits whose band had no record).
    """
    from nirvana_quality.harness import BAND_EDGES, band_of

    edges = BAND_EDGES if edges is None else edges
    rates = downgrade_rates(records, policy, sorted({k for k, _ in hits}), edges)
    saved = float(STEPS * exact_hits)
    approximate = downgraded = 0.0
    pooled = checked = 0
    for k, similarity in hits:
        rate = 0.0
        if k > policy.unchecked_max_k:
            checked += 1
            cell = rates.get((k, band_of(float(similarity), edges)))
            if cell is None:
                cell, pooled = rates.get((k, None), (1.0, 0)), pooled + 1
            rate = cell[0]
        saved += hit_savings(k, rate, policy, probe_cost)
        downgraded += rate
        approximate += 1 - (rate if policy.fallback == FALLBACK_NOISE else 0.0)
    return {"hit_rate": (exact_hits + approximate) / requests, "approximate_hits": approximate,
            "exact_hits": exact_hits, "steps_saved_fraction": saved / (STEPS * requests),
            "downgraded": downgraded, "downgraded_share": downgraded / len(hits) if hits else 0.0,
            "checked": checked, "pooled_hits": pooled}


def compare_guards(rows: Sequence[dict], embeddings: np.ndarray, config: CacheConfig, inputs: GuardInputs,
                   tokenizer: Optional[PromptTokenizer] = None, progress: bool = True) -> List[Dict[str, object]]:
    """The resume guard's variants against the unguarded tables (LCBFU, unbounded cache, the
    configured lookup_k, 50 steps): the paper's table and the current one unguarded; the token
    guard (a) replayed fully on the paper's table and on the guarded thresholds; the latent guard
    (b): the guarded thresholds replayed unguarded (an upper bound) and :func:`latent_estimate` of it.

    Args:
        config: The configured cache (its thresholds are "current"; its cache_steps are extended
            by each table's K, as in :func:`compare_lookups`).
        tokenizer: The served model's tokenizer (needed for the token rows).

    Returns:
        One dict per row: label, thresholds, guard, hit_rate, approximate_hits, exact_hits,
        steps_saved_fraction, and token_capped_share or downgraded_share.
    """
    base = dataclasses.replace(config, eviction="lcbfu")
    replays: Dict[Tuple[Thresholds, bool], Tuple[ReplayResult, List[Tuple[int, float]]]] = {}
    guard = TokenGuard(inputs.token_caps, tokenizer, [str(r["prompt"]) for r in rows], embeddings) \
        if inputs.token and tokenizer is not None else None

    def run(label: str, table: Thresholds, token: bool) -> Tuple[ReplayResult, List[Tuple[int, float]]]:
        key = (tuple(table), token)
        if key not in replays:
            table_config = config_for_thresholds(base, table)
            hits: List[Tuple[int, float]] = []
            result = replay(rows, embeddings, table_config, unbounded_capacity(rows, table_config),
                            progress=progress, label=label, token_guard=guard if token else None, hits=hits)
            replays[key] = (result, hits)
        return replays[key]

    def row(label: str, table: Thresholds, guard_name: str, result: ReplayResult, **extra) -> Dict[str, object]:
        return {"label": label, "thresholds": [list(p) for p in table], "guard": guard_name,
                "hit_rate": result.hit_rate, "approximate_hits": result.approximate_hits,
                "exact_hits": result.exact_hits, "steps_saved_fraction": result.steps_saved_fraction,
                "requests": result.requests, **extra}

    paper, current = tuple(PAPER_THRESHOLDS), tuple(config.thresholds)
    out = [row("paper's table", paper, "none", run("paper", paper, False)[0]),
           row("current", current, "none", run("current", current, False)[0])]
    if guard is not None:
        second = inputs.guarded or inputs.token_thresholds or current
        name = "guarded thresholds" if inputs.guarded else "token-calibrated" if inputs.token_thresholds else "current"
        for label, table in (("paper's table", paper), (name, second)):
            result = run(f"token {label}", table, True)[0]
            out.append(row(label, table, "token (a), replayed", result,
                           token_capped_share=result.token_capped / result.token_eligible
                           if result.token_eligible else 0.0,
                           token_capped=result.token_capped, token_eligible=result.token_eligible))
    if inputs.latent:
        result, hits = run("guarded", inputs.guarded, False)
        out.append(row("guarded thresholds", inputs.guarded, "latent (b), upper bound", result))
        estimate = latent_estimate(hits, result.exact_hits, result.requests, inputs.records, inputs.policy)
        out.append({"label": "guarded thresholds", "thresholds": [list(p) for p in inputs.guarded],
                    "guard": "latent (b), estimate", "requests": result.requests,
                    **{k: estimate[k] for k in ("hit_rate", "approximate_hits", "exact_hits", "steps_saved_fraction",
                                                "downgraded_share", "checked", "pooled_hits")}})
    return out


def guard_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Markdown: one row per (table, guard)."""
    lines = ["| thresholds | guard | hit rate | approximate hits | exact hits | UNet steps saved | "
             "token-capped (of lookups within the table) / downgraded (of approximate hits) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "token_capped_share" in r:
            effect = f"capped {r['token_capped_share']:.1%} ({r['token_capped']}/{r['token_eligible']})"
        elif "downgraded_share" in r:
            effect = f"downgraded {r['downgraded_share']:.1%} (expected)"
        else:
            effect = ""
        approx = r["approximate_hits"]
        approx_text = f"{approx:.0f}" if isinstance(approx, float) else str(approx)
        lines.append(f"| {r['label']} `{json.dumps(r['thresholds'])}` | {r['guard']} | {r['hit_rate']:.1%} | "
                     f"{approx_text} | {r['exact_hits']} | {r['steps_saved_fraction']:.1%} | {effect} |")
    return "\n".join(lines)


# -- report ------------------------------------------------------------------------------------

def markdown_table(results: Sequence[ReplayResult]) -> str:
    lines = ["| policy | admit on hit | capacity (states) | hit rate | exact | approx | UNet steps saved | K histogram (K:count) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ks = " ".join(f"{k}:{v}" for k, v in r.k_histogram.items() if k)
        lines.append(f"| {r.policy} | {r.admit_on_hit} | {r.capacity_states} | {r.hit_rate:.1%} | {r.exact_hits} | "
                     f"{r.approximate_hits} | {r.steps_saved_fraction:.1%} | {ks} |")
    return "\n".join(lines)


def plot(results: Sequence[ReplayResult], character: Dict[str, object], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for policy in POLICIES:
        rs = sorted((r for r in results if r.policy == policy and r.admit_on_hit), key=lambda r: r.capacity_states)
        if rs:
            axes[0].plot([r.capacity_states for r in rs], [100 * r.steps_saved_fraction for r in rs], "o-", label=policy)
            axes[1].plot([r.capacity_states for r in rs], [100 * r.hit_rate for r in rs], "o-", label=policy)
    for ax, label in ((axes[0], "UNet steps saved (%)"), (axes[1], "hit rate (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity (noise states)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    hist = character["nn_similarity_histogram"]
    edges = np.linspace(-0.2, 1.0, len(hist) + 1)
    axes[2].bar(edges[:-1], hist, width=edges[1] - edges[0], align="edge")
    axes[2].set_xlabel("similarity to nearest earlier prompt")
    axes[2].set_ylabel("requests")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="JSON Lines prompt log (prompt, optional seed/user/timestamp)")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    parser.add_argument("--sizes", default="", help="cache capacities in states, comma-separated "
                        "(default: 1%%, 5%% and 25%% of the log's unique prompts x 5 states); 'none': no main "
                        "table, and the comparison in an unbounded cache only")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="eviction policies of the main table ('' skips it: comparisons only)")
    parser.add_argument("--lookup-k", default="", help="lookup_k values to compare, comma-separated "
                        "(default: 1 and the configured lookup_k)")
    parser.add_argument("--thresholds", action="append", default=[], metavar="[LABEL=]TABLE",
                        help="a threshold table to compare with the configured one ('current'): a JSON list "
                        "like '[[0.95,25],[0.91,20]]', 'SIM:K,...' text or a pipeline.json; repeatable")
    parser.add_argument("--no-compare", action="store_true", help="skip the lookup / thresholds comparison")
    guard = parser.add_argument_group("resume guard comparison (runs when its inputs exist)")
    guard.add_argument("--guard-calibration", type=Path, default=CALIBRATION_FILE,
                       help="calibration file whose \"guard\" entry gives the defaults below (default: %(default)s; "
                       "else the model repository's pipeline.json guard)")
    guard.add_argument("--guard-tokens", metavar="CAPS", help="token caps of variant a, novel-token count:largest K, "
                       "e.g. '0:40,1:10,2:5,3:0' (the largest count stands for more; default: guard → token_caps)")
    guard.add_argument("--guard-records", type=Path, default=GUARD_RECORDS,
                       help="tail records (JSON Lines) whose held-out ones give variant b's downgrade rates "
                       "(default: %(default)s)")
    guard.add_argument("--guarded-thresholds", metavar="TABLE", help="thresholds calibrated with the latent guard "
                       "(like --thresholds; default: guard → targets → default_target → thresholds)")
    guard.add_argument("--guard-bounds", metavar="K:BOUND,...", help="latent guard bound per K, e.g. "
                       "'5:0.35,10:0.35' (default: guard → targets → default_target → guard → bounds)")
    guard.add_argument("--guard-fallback", choices=(FALLBACK_PROBE, FALLBACK_NOISE), help="where a downgraded hit "
                       "goes on from: the probed state or its own noise (default: the calibration's, else noise)")
    guard.add_argument("--guard-probe-k", type=int, metavar="K", help="the step the latent check probes "
                       "(default: the calibration's, else nirvana.guard's)")
    guard.add_argument("--guard-unchecked-max-k", type=int, metavar="K", help="hits at or below this K are "
                       "served unchecked (default: the calibration's, else nirvana.guard's)")
    guard.add_argument("--no-guard", action="store_true", help="skip the resume guard comparison")
    parser.add_argument("--output", type=Path, default=Path("perf/results/simulate"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows = load_log(args.log, args.limit)
    prompts = [str(r["prompt"]) for r in rows]
    embedder = RepositoryEmbedder(args.model_repository)
    embeddings = embed_with_cache(embedder, prompts, args.output / "embeddings")
    configured = parse_parameters(CacheConfig, read_pbtxt_parameters(args.model_repository / "latent_cache" / "config.pbtxt"))
    config = configured.with_model_thresholds(embedder.spec)
    try:
        lookup_ks = list(dict.fromkeys(int(k) for k in args.lookup_k.split(",") if k.strip())) or \
            list(dict.fromkeys((1, config.lookup_k)))
        for k in lookup_ks:
            dataclasses.replace(config, lookup_k=k).validate()
        tables = [("current", config.thresholds)] + [parse_thresholds_option(t, i + 1)
                                                     for i, t in enumerate(args.thresholds)]
        # Each table keeps the configured cache_steps plus its own K (not those the model's table added).
        compare_config = dataclasses.replace(config, cache_steps=configured.cache_steps)
        for label, table in tables:
            config_for_thresholds(compare_config, table)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if len({label for label, _ in tables}) != len(tables):
        parser.error("--thresholds: two tables have the same label; name them with LABEL=")
    inputs = None
    if not args.no_guard:
        try:
            inputs = guard_inputs(args.guard_calibration, args.guard_tokens, args.guarded_thresholds,
                                  args.guard_bounds, args.guard_fallback, args.guard_records,
                                  embedder.spec.model_id, embedder.spec.guard, args.guard_probe_k,
                                  args.guard_unchecked_max_k)
            for table in (inputs.guarded, inputs.token_thresholds):
                if table is not None:
                    config_for_thresholds(compare_config, table)
        except (ConfigError, ValueError) as exc:
            parser.error(str(exc))

    nearest = nearest_previous_similarity(embeddings)
    character = characterize(prompts, embeddings, nearest)
    pairs = pair_similarities(rows, embeddings)
    unique = character["unique_prompts"]
    if args.sizes.strip() == "none":  # the comparison's unbounded cache only
        sizes = []
    else:
        sizes = [int(s) for s in args.sizes.split(",") if s] or \
            sorted({max(50, int(unique * f) * 5) for f in (0.01, 0.05, 0.25)})
    results = []
    policies = [p for p in args.policies.split(",") if p]
    for size in sizes if policies else []:
        for policy in policies:
            results.append(replay(rows, embeddings, dataclasses.replace(config, eviction=policy), size, progress=True))
        results.append(replay(rows, embeddings, dataclasses.replace(config, eviction="lcbfu", admit_on_hit=False), size))
    compared, tables_info = ([], {}) if args.no_compare else \
        compare_lookups(rows, embeddings, nearest, compare_config, tables, lookup_ks, sizes)
    guard_rows: List[Dict[str, object]] = []
    guard_started = time.perf_counter()
    if inputs is not None and (inputs.token or inputs.latent):
        guard_rows = compare_guards(rows, embeddings, compare_config, inputs, embedder.tokenizer)
    guard_seconds = time.perf_counter() - guard_started

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.log.stem + (f"-{args.limit}" if args.limit else "")
    report = {"log": str(args.log), "requests": len(rows), "thresholds": config.thresholds,
              "characterization": character,
              "pair_similarity": {k: {"pairs": int(len(v)), **{f"p{q}": float(np.percentile(v, q)) for q in (1, 10, 50, 90, 99, 99.9)}}
                                  for k, v in pairs.items() if len(v)},
              "lookup_k": config.lookup_k,
              "replays": [dict(dataclasses.asdict(r), hit_rate=r.hit_rate) for r in results],
              "comparison": {"lookup_k": lookup_ks, "tables": tables_info,
                             "replays": [dict(dataclasses.asdict(r), hit_rate=r.hit_rate) for r in compared]},
              "guard": {"inputs": None if inputs is None else inputs.describe(), "rows": guard_rows,
                        "lookup_k": config.lookup_k, "caveat": LATENT_CAVEAT if inputs and inputs.latent else ""}}
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    plot(results, character, args.output / f"{stem}.png", f"{args.log.name}: {len(rows)} requests")
    table = markdown_table(results)
    compare_text = comparison_table(compared, tables_info, lookup_ks) if compared else ""
    guard_text = guard_table(guard_rows) if guard_rows else ""
    guard_notes = ["guard comparison skipped: --no-guard"] if inputs is None else \
        (["guard comparison skipped: neither variant has its inputs"] if not guard_rows else []) + inputs.notes
    guard_head = (f"resume guard compared (LCBFU, unbounded cache, best of {config.lookup_k}, {STEPS} steps):")
    guard_lines = [guard_head, "", guard_text, ""] + ([f"note: {LATENT_CAVEAT}."] if inputs and inputs.latent else []) \
        if guard_rows else []
    guard_lines += [f"note: {n}" for n in guard_notes]
    (args.output / f"{stem}.md").write_text(table + "\n" + (f"\n{compare_text}\n" if compare_text else "") +
                                            ("\n" + "\n".join(guard_lines) + "\n" if guard_lines else ""))

    c = character
    print(f"\n{args.log.name}: {c['requests']} requests, {c['unique_prompts']} unique prompts, "
          f"repeat rate {c['repeat_rate']:.1%}, top 1% of prompts = {c['top_1pct_share']:.1%} of requests, "
          f"top 10% = {c['top_10pct_share']:.1%}, Zipf alpha (repeated prompts) {c['zipf_alpha_repeated']:.2f}")
    print("similarity to the nearest earlier prompt, percentiles: " +
          ", ".join(f"p{q} {v:.3f}" for q, v in c["nn_similarity_percentiles"].items()))
    for name, stats in report["pair_similarity"].items():
        print(f"pair similarity {name:<15} n={stats['pairs']:<6} " +
              " ".join(f"{k} {v:.3f}" for k, v in stats.items() if k != "pairs"))
    print(f"thresholds (similarity:K at 50 steps): {config.thresholds}; lookup_k {config.lookup_k}\n")
    print(table)
    if compare_text:
        print("\nlookups and thresholds compared (LCBFU; bound: the nearest earlier prompt within the table):")
        for label, info in tables_info.items():
            print(f"  {label}: {info['thresholds']}, cache_steps {info['cache_steps']}")
        print()
        print(compare_text)
    if guard_lines:
        print()
        if guard_rows:
            for what, where in inputs.sources.items():
                print(f"  {what}: {where}")
            print(f"  token caps {inputs.describe()['token_caps']}; latent guard "
                  f"{None if inputs.policy is None else inputs.policy.as_dict()}; "
                  f"{len(inputs.records)} held-out records ({guard_seconds:.0f}s)")
        print("\n".join(guard_lines))
    print(f"\nreport: {args.output}/{stem}.{{json,md,png}} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
