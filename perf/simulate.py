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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nirvana.cache import CacheKey, LatentCache
from nirvana.config import (PIPELINE_FILE, CacheConfig, ConfigError, PipelineSpec, _parse_thresholds,
                            parse_parameters, read_pbtxt_parameters)
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
           progress: bool = False, label: str = "") -> ReplayResult:
    """Send every request of the log through a fresh cache holding at most ``capacity_states`` states.

    A state is a 1-element fp32 tensor (4 bytes), so the byte budget counts states.
    Every request runs at STEPS=50; the log's seed is used when present.
    """
    config = dataclasses.replace(config, host_bytes=4 * capacity_states, device_bytes=0, disk_bytes=0,
                                 store_dtype="float32", use_gpu=False)
    cache = LatentCache(config, embeddings.shape[1])
    state = torch.zeros(1)
    saved = 0
    looking = 0.0
    hist: Dict[int, int] = collections.Counter()
    desc = f"{label + ' ' if label else ''}{config.eviction} {capacity_states} k={config.lookup_k}"
    for i, row in enumerate(tqdm(rows, desc=desc, disable=not progress, file=sys.stderr, leave=False)):
        key = CacheKey(str(row["prompt"]), "", request_seed(row, i), STEPS, 7.5)
        began = time.perf_counter()
        result = cache.lookup(embeddings[i], key)
        looking += time.perf_counter() - began
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
                        capacity_states >= unbounded_capacity(rows, config), 1e6 * looking / len(rows))


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

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.log.stem + (f"-{args.limit}" if args.limit else "")
    report = {"log": str(args.log), "requests": len(rows), "thresholds": config.thresholds,
              "characterization": character,
              "pair_similarity": {k: {"pairs": int(len(v)), **{f"p{q}": float(np.percentile(v, q)) for q in (1, 10, 50, 90, 99, 99.9)}}
                                  for k, v in pairs.items() if len(v)},
              "lookup_k": config.lookup_k,
              "replays": [dict(dataclasses.asdict(r), hit_rate=r.hit_rate) for r in results],
              "comparison": {"lookup_k": lookup_ks, "tables": tables_info,
                             "replays": [dict(dataclasses.asdict(r), hit_rate=r.hit_rate) for r in compared]}}
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    plot(results, character, args.output / f"{stem}.png", f"{args.log.name}: {len(rows)} requests")
    table = markdown_table(results)
    compare_text = comparison_table(compared, tables_info, lookup_ks) if compared else ""
    (args.output / f"{stem}.md").write_text(table + "\n" + (f"\n{compare_text}\n" if compare_text else ""))

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
    print(f"\nreport: {args.output}/{stem}.{{json,md,png}} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
