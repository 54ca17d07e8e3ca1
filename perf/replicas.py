"""``nirvana-replicas-bench``: what sharing the cache through Redis is worth to two replicas.

A prompt log is split round-robin across two replicas (request i goes to replica i % 2), as a
load balancer without affinity would, and replayed three ways side by side:

* **one server**: every request through one cache (the figure to reach);
* **separate**: two replicas, each with its own cache (what scaling out without sharing gives);
* **shared**: two replicas whose caches share one real redis-server (the shared tier: Lua
  admission with global eviction, read-through fetches, the events stream tailed by each
  replica's sync thread).

**Replay** (the whole log): through the cache engine itself, like ``nirvana-simulate``: the
served model's own embeddings, its config.pbtxt and calibrated thresholds, STEPS=50, states of
the exported latent shape in the store's dtype. It reports hit rate and UNet steps saved per
configuration, the shared pair's steps saved as a fraction of one server's (target >= 95%), the
lookup cost the shared tier adds (p50/p99 of ``LatentCache.lookup`` against one server's, and of
the Redis fetches on their own), the admission cost, and the replication lag (an admission on
one replica until the other has indexed it). Requests are sent back to back (``--gap-ms`` 0): a
near-duplicate arriving at the other replica a millisecond later may find the first one not yet
indexed, so the shared figure is a lower bound of what paced traffic gets.

**Served** (``--served N``, a prefix of the log): the same three configurations with real
tritonservers (two, or one) and a real redis-server, requests sent one at a time round-robin;
hit rate and steps saved are read from the responses. Then what the shared tier costs a request:
up to 60 of those prompts on a server with the shared tier and one without, side by side, each
as a miss and again as an exact hit (p50/p99 per server).

Examples:
    nirvana-replicas-bench perf/data/diffusiondb_sample.jsonl
    nirvana-replicas-bench ../shared/workloads/sd_discord_dreambot_W1-dream-2.jsonl --limit 20000 --served 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nirvana.cache import CacheKey, LatentCache
from nirvana.cache.shared import SharedTier, key_prefix
from nirvana.cache.store import DTYPES
from nirvana.cache.sync import SharedTierSync
from nirvana.config import CacheConfig, parse_parameters, read_pbtxt_parameters
from nirvana.redisserver import RedisServer
from nirvana_perf.simulate import RepositoryEmbedder, embed_with_cache, load_log, request_seed

STEPS = 50
TARGET = 0.95  # the shared pair's steps saved, as a fraction of one server's


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


@dataclasses.dataclass
class ReplayOutcome:
    """One configuration's replay."""

    label: str
    replicas: int
    requests: int = 0
    exact_hits: int = 0
    approximate_hits: int = 0
    steps_saved: int = 0
    lookup_us: List[float] = dataclasses.field(default_factory=list)
    fetching_lookup_us: List[float] = dataclasses.field(default_factory=list)  # those that fetched from Redis
    admit_us: List[float] = dataclasses.field(default_factory=list)
    shared: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return (self.exact_hits + self.approximate_hits) / max(1, self.requests)

    @property
    def steps_saved_fraction(self) -> float:
        return self.steps_saved / max(1, STEPS * self.requests)

    def summary(self) -> Dict[str, object]:
        return {"label": self.label, "replicas": self.replicas, "requests": self.requests,
                "exact_hits": self.exact_hits, "approximate_hits": self.approximate_hits,
                "hit_rate": round(self.hit_rate, 4), "steps_saved_fraction": round(self.steps_saved_fraction, 4),
                "lookup_us_p50": round(percentile(self.lookup_us, 50), 1),
                "lookup_us_p99": round(percentile(self.lookup_us, 99), 1),
                "admit_us_p50": round(percentile(self.admit_us, 50), 1),
                "admit_us_p99": round(percentile(self.admit_us, 99), 1),
                **({"fetching_lookups": len(self.fetching_lookup_us),
                    "fetching_lookup_us_p50": round(percentile(self.fetching_lookup_us, 50), 1),
                    "fetching_lookup_us_p99": round(percentile(self.fetching_lookup_us, 99), 1)}
                   if self.fetching_lookup_us else {}), **self.shared}


class _Replica:
    def __init__(self, config: CacheConfig, dim: int, redis_url: Optional[str], name: str):
        self.lock = threading.Lock()
        self.tier = self.sync = None
        if redis_url:
            self.tier = SharedTier(redis_url, key_prefix(config.shared_prefix, "bench"), config.shared_bytes,
                                   policy=config.eviction, timeout_s=config.shared_timeout_ms / 1000.0,
                                   replica_id=name)
        self.cache = LatentCache(config, dim, shared=self.tier)
        if self.tier is not None:
            self.sync = SharedTierSync(self.cache, self.tier, self.lock)
            if not self.sync.start():
                raise RuntimeError(f"replica {name}: Redis at {redis_url} did not answer")

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.tier.close()
        self.cache.close()


def replay(rows: Sequence[dict], embeddings: np.ndarray, config: CacheConfig, latent_shape, replicas: int,
           redis_url: Optional[str] = None, label: str = "", gap_s: float = 0.0) -> ReplayOutcome:
    """Request i of ``rows`` goes to replica i % ``replicas``; every cache starts empty."""
    nodes = [_Replica(config, embeddings.shape[1], redis_url, f"replica-{r}") for r in range(replicas)]
    outcome = ReplayOutcome(label, replicas)
    state = torch.zeros(latent_shape, dtype=DTYPES[config.store_dtype])
    final = torch.zeros(latent_shape, dtype=torch.float32)
    try:
        for i, row in enumerate(tqdm(rows, desc=label, file=sys.stderr, leave=False)):
            node = nodes[i % replicas]
            key = CacheKey(str(row["prompt"]), "", request_seed(row, i), STEPS, 7.5)
            fetches = node.tier.counters.fetches if node.tier is not None else 0
            began = time.perf_counter()
            with node.lock:
                result = node.cache.lookup(embeddings[i], key)
            outcome.lookup_us.append(1e6 * (time.perf_counter() - began))
            if node.tier is not None and node.tier.counters.fetches > fetches:
                outcome.fetching_lookup_us.append(outcome.lookup_us[-1])
            outcome.requests += 1
            outcome.steps_saved += result.start_step
            outcome.exact_hits += result.status == "exact"
            outcome.approximate_hits += result.status == "approximate"
            if result.status != "exact":
                began = time.perf_counter()
                with node.lock:
                    node.cache.admit(embeddings[i], key, {k: state for k in result.save_steps}, final_latents=final,
                                     was_hit=result.status != "miss")
                outcome.admit_us.append(1e6 * (time.perf_counter() - began))
            if gap_s:
                time.sleep(gap_s)
        if redis_url:
            outcome.shared = shared_figures(nodes)
    finally:
        for node in nodes:
            node.close()
    return outcome


def shared_figures(nodes) -> Dict[str, object]:
    """Fetch cost, replication lag and errors over the shared pair's replicas."""
    fetch_ms = [1000 * s for node in nodes for s in node.tier.counters.fetch_seconds]
    lag = [lag for node in nodes for lag in node.sync.lag_ms]
    counters = [node.tier.counters for node in nodes]
    return {"fetches": sum(c.fetches for c in counters), "fetch_misses": sum(c.fetch_misses for c in counters),
            "fetch_ms_p50": round(percentile(fetch_ms, 50), 3), "fetch_ms_p99": round(percentile(fetch_ms, 99), 3),
            "lag_ms_p50": round(percentile(lag, 50), 2), "lag_ms_p99": round(percentile(lag, 99), 2),
            "errors": sum(c.errors for c in counters), "evicted_states_shared": sum(c.evicted_states for c in counters)}


def served(repository: Path, rows: Sequence[dict], steps: int, workdir: Path) -> List[Dict[str, object]]:
    """The three configurations over real tritonservers (and a real redis-server), round-robin."""
    from nirvana.tritonserver import TritonServer
    from nirvana_client import Txt2ImgClient
    from nirvana_export.repository import repository_variant

    out = []
    for label, replicas, shared in (("one server", 1, False), ("separate", 2, False), ("shared", 2, True)):
        redis = RedisServer(workdir / f"redis-{replicas}-{shared}", appendfsync="everysec").start() if shared else None
        servers, clients = [], []
        try:
            for r in range(replicas):
                params = {"redis_url": redis.url, "replica_id": f"replica-{r}"} if shared else {}
                variant = repository_variant(repository, workdir / f"repo-{label}-{r}".replace(" ", "-"),
                                             {"latent_cache": params})
                servers.append(TritonServer(variant).start())
                clients.append(Txt2ImgClient(servers[-1].grpc_url, "grpc", timeout_s=300))
            hits = saved = 0
            began = time.perf_counter()
            for i, row in enumerate(tqdm(rows, desc=f"served: {label}", file=sys.stderr, leave=False)):
                result = clients[i % replicas].generate(str(row["prompt"]), seed=request_seed(row, i) % (1 << 62),
                                                        steps=steps)
                hits += result.cache_status in ("exact", "approximate")
                saved += result.start_step
            out.append({"label": label, "replicas": replicas, "requests": len(rows),
                        "hit_rate": round(hits / len(rows), 4), "steps_saved_fraction": round(saved / (steps * len(rows)), 4),
                        "seconds": round(time.perf_counter() - began, 1)})
        finally:
            for client in clients:
                client.close()
            for server in servers:
                server.stop()
            if redis is not None:
                redis.stop()
    return out


def served_latency(repository: Path, rows: Sequence[dict], steps: int, workdir: Path) -> Dict[str, object]:
    """Per-request latency on one server with the shared tier and one without, side by side: each
    prompt sent to both (alternating which goes first), once as a miss and again as an exact hit.
    The difference is what the shared tier costs a request (its admission to Redis, a lookup's
    bookkeeping); the machine's noise falls on both."""
    from nirvana.tritonserver import TritonServer
    from nirvana_client import Txt2ImgClient
    from nirvana_export.repository import repository_variant

    latency: Dict[str, Dict[str, List[float]]] = {name: {"miss": [], "exact": []} for name in ("without", "shared")}
    with RedisServer(workdir / "redis-latency", appendfsync="everysec") as redis:
        variant = repository_variant(repository, workdir / "repo-latency-shared",
                                     {"latent_cache": {"redis_url": redis.url, "replica_id": "latency"}})
        with TritonServer(repository) as plain, TritonServer(variant) as shared:
            clients = {"without": Txt2ImgClient(plain.grpc_url, "grpc", timeout_s=300),
                       "shared": Txt2ImgClient(shared.grpc_url, "grpc", timeout_s=300)}
            try:
                prompts = list(dict.fromkeys(str(r["prompt"]) for r in rows))
                for i, prompt in enumerate(tqdm(prompts, desc="served latency", file=sys.stderr, leave=False)):
                    for name in (("without", "shared") if i % 2 else ("shared", "without")):
                        for kind in ("miss", "exact"):
                            began = time.perf_counter()
                            result = clients[name].generate(prompt, seed=i, steps=steps)
                            if result.cache_status == kind:  # a prompt already seen is no miss: left out
                                latency[name][kind].append(time.perf_counter() - began)
            finally:
                for client in clients.values():
                    client.close()
    return {name: {f"{kind}_ms_{q}": round(1000 * percentile(values, q), 1) for kind, values in kinds.items()
                   for q in (50, 99)} | {f"{kind}_requests": len(values) for kind, values in kinds.items()}
            for name, kinds in latency.items()}


def markdown(report: Dict[str, object]) -> str:
    lines = [f"Log: `{report['log']}`, {report['requests']} requests round-robin over 2 replicas, STEPS={STEPS}.", "",
             "| configuration | hit rate | UNet steps saved | vs one server | lookup p50 / p99 (us) | "
             "admission p50 / p99 (us) |", "|---|---|---|---|---|---|"]
    one = report["replay"][0]["steps_saved_fraction"]
    for r in report["replay"]:
        lines.append(f"| {r['label']} | {100 * r['hit_rate']:.1f}% | {100 * r['steps_saved_fraction']:.1f}% | "
                     f"{100 * r['steps_saved_fraction'] / max(one, 1e-9):.1f}% | {r['lookup_us_p50']:.0f} / "
                     f"{r['lookup_us_p99']:.0f} | {r['admit_us_p50']:.0f} / {r['admit_us_p99']:.0f} |")
    shared = report["replay"][-1]
    lines += ["", f"Shared pair / one server, steps saved: **{100 * report['shared_vs_one']:.1f}%** "
                  f"(target >= {100 * TARGET:.0f}%: {'met' if report['target_met'] else 'NOT met'}).",
              f"Shared tier: {shared.get('fetches', 0)} Redis fetches"
              + (f", p50 {shared['fetch_ms_p50']} ms, p99 {shared['fetch_ms_p99']} ms (lookups that fetched: p50 "
                 f"{shared['fetching_lookup_us_p50']} us, p99 {shared['fetching_lookup_us_p99']} us)"
                 if shared.get("fetching_lookups") else "")
              + f"; replication lag p50 {shared.get('lag_ms_p50')} ms, p99 {shared.get('lag_ms_p99')} ms; "
              f"{shared.get('errors', 0)} errors. Both replicas and their sync threads share this process (and "
              f"its GIL) here: a served replica has one."]
    if report.get("served"):
        lines += ["", f"Served (real tritonservers, first {report['served'][0]['requests']} requests, "
                      f"STEPS={report['served_steps']}):", "",
                  "| configuration | hit rate | UNet steps saved | wall time |", "|---|---|---|---|"]
        lines += [f"| {r['label']} | {100 * r['hit_rate']:.1f}% | {100 * r['steps_saved_fraction']:.1f}% | "
                  f"{r['seconds']:.0f} s |" for r in report["served"]]
    if report.get("served_latency"):
        lat = report["served_latency"]
        lines += ["", f"Request latency, one server with the shared tier vs one without, side by side "
                      f"(STEPS={report['served_steps']}; the same prompts, alternated):", "",
                  "| server | miss p50 / p99 (ms) | exact hit p50 / p99 (ms) | requests (miss, exact) |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {r['miss_ms_50']} / {r['miss_ms_99']} | {r['exact_ms_50']} / {r['exact_ms_99']} | "
                  f"{r['miss_requests']}, {r['exact_requests']} |" for name, r in lat.items()]
    return "\n".join(lines) + "\n"


def run(repository: Path, log: Path, limit: Optional[int] = None, served_requests: int = 0, served_steps: int = 50,
        output: Path = Path("perf/results/replicas"), host_bytes: Optional[int] = None, gap_ms: float = 0.0) -> Dict[str, object]:
    rows = load_log(log, limit)
    embedder = RepositoryEmbedder(repository)
    embeddings = embed_with_cache(embedder, [str(r["prompt"]) for r in rows], output / "embeddings")
    config = parse_parameters(CacheConfig, read_pbtxt_parameters(repository / "latent_cache" / "config.pbtxt"))
    config = dataclasses.replace(config.with_model_thresholds(embedder.spec), use_gpu=False, device_bytes=0,
                                 snapshot_path="", **({"host_bytes": host_bytes} if host_bytes else {}))
    shape = embedder.spec.latent_shape
    outcomes = [replay(rows, embeddings, config, shape, 1, label="one server", gap_s=gap_ms / 1000),
                replay(rows, embeddings, config, shape, 2, label="separate", gap_s=gap_ms / 1000)]
    with tempfile.TemporaryDirectory(prefix="nirvana-replicas-") as tmp:
        with RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis:
            outcomes.append(replay(rows, embeddings, config, shape, 2, redis_url=redis.url, label="shared",
                                   gap_s=gap_ms / 1000))
        report: Dict[str, object] = {"log": str(log), "requests": len(rows), "host_bytes": config.host_bytes,
                                     "gap_ms": gap_ms, "replay": [o.summary() for o in outcomes]}
        one, shared = outcomes[0].steps_saved_fraction, outcomes[-1].steps_saved_fraction
        report["shared_vs_one"] = shared / one if one else float("nan")
        report["separate_vs_one"] = outcomes[1].steps_saved_fraction / one if one else float("nan")
        report["target_met"] = bool(one and shared / one >= TARGET)
        if served_requests:
            report["served_steps"] = served_steps
            report["served"] = served(repository, rows[:served_requests], served_steps, Path(tmp))
            report["served_latency"] = served_latency(repository, rows[:min(served_requests, 60)], served_steps,
                                                      Path(tmp))
    output.mkdir(parents=True, exist_ok=True)
    (output / "replicas.json").write_text(json.dumps(report, indent=2))
    report["markdown"] = markdown(report)
    (output / "replicas.md").write_text(report["markdown"])
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-replicas-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="JSON Lines prompt log (prompt, optional seed)")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    parser.add_argument("--served", type=int, default=0, metavar="N",
                        help="also replay the first N requests through real tritonservers (0: skip)")
    parser.add_argument("--served-steps", type=int, default=STEPS, help="STEPS of the served requests")
    parser.add_argument("--host-bytes", type=int, help="each replica's host tier (default: config.pbtxt's)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between replayed requests")
    parser.add_argument("--output", type=Path, default=Path("perf/results/replicas"))
    args = parser.parse_args(argv)
    report = run(args.model_repository, args.log, args.limit, args.served, args.served_steps, args.output,
                 args.host_bytes, args.gap_ms)
    print(report["markdown"])
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
