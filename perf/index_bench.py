"""``nirvana-index-bench``: lookup latency and recall@1 of the similarity index kinds.

Builds exact (flat), HNSW and IVF indexes over N clustered unit vectors of the
text encoder's width (prompt embeddings cluster by topic) and queries them with
perturbed copies of stored vectors, like near-duplicate prompts. Prints p50/p99
single-query latency and recall@1 against exact search. faiss runs with ``--threads``
OpenMP threads (default 1, as the latent_cache model does: ``index_threads``).

Example:
    nirvana-index-bench --sizes 100000,1000000 --dim 384
    nirvana-index-bench --sizes 4000,16000,32000,64000 --threads 1   # where "auto" switches to IVF
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centers[rng.integers(0, clusters, stop - start)] + \
            0.6 * rng.standard_normal((stop - start, dim)).astype(np.float32)
    faiss.normalize_L2(out)
    return out


def timed_queries(index, queries: np.ndarray):
    latencies, found = [], []
    for q in queries:
        start = time.perf_counter()
        _, ids = index.search(q.reshape(1, -1), 1)
        latencies.append(time.perf_counter() - start)
        found.append(int(ids[0, 0]))
    lat = np.array(latencies) * 1e3
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), np.array(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-index-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=384, help="embedding width (all-MiniLM-L6-v2: 384)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1,
                        help="faiss OpenMP threads (0: faiss's default, one per core)")
    parser.add_argument("--output", type=Path, default=Path("perf/results/index_bench.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}")
    print(f"{'entries':>9} {'index':<22} {'build s':>8} {'p50 ms':>7} {'p99 ms':>7} {'recall@1':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        data = clustered(n, args.dim, max(100, n // 1000), rng)
        picks = rng.integers(0, n, args.queries)
        queries = data[picks] + 0.15 * rng.standard_normal((args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim)
        faiss.normalize_L2(queries)
        nlist = int(4 * np.sqrt(n))
        candidates = {
            "flat (exact)": lambda: faiss.IndexFlatIP(args.dim),
            "hnsw M=32 ef=64": lambda: faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT),
            f"ivf{nlist} nprobe=16": lambda: faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist,
                                                                 faiss.METRIC_INNER_PRODUCT),
        }
        truth = None
        for name, make in candidates.items():
            index = make()
            start = time.perf_counter()
            if not index.is_trained:
                index.train(data[rng.integers(0, n, min(n, 40 * nlist))])
            index.add(data)
            build = time.perf_counter() - start
            if isinstance(index, faiss.IndexHNSWFlat):
                index.hnsw.efSearch = 64
            if isinstance(index, faiss.IndexIVFFlat):
                index.nprobe = 16
            p50, p99, found = timed_queries(index, queries)
            if truth is None:
                truth = found
            recall = float(np.mean(found == truth))
            rows.append({"entries": n, "index": name, "build_s": build, "p50_ms": p50, "p99_ms": p99, "recall_at_1": recall})
            print(f"{n:>9} {name:<22} {build:>8.1f} {p50:>7.3f} {p99:>7.3f} {recall:>8.3f}", flush=True)
            del index
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
