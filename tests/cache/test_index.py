"""The index kinds: "auto" switches from exact to recall-checked IVF by size; faiss threads."""

import threading
import time

import faiss
import numpy as np
import pytest
import torch

import nirvana.cache.index as index_module
from nirvana.cache import CacheKey, LatentCache
from nirvana.cache.index import EmbeddingIndex, normalize, recall_check
from nirvana.config import CacheConfig, ConfigError, parse_parameters

DIM = 32


def clustered(n, seed=0, dim=DIM, clusters=20):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    return normalize(centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim)))


def exact_best(vectors, ids, query):
    sims = vectors @ normalize(query)
    return ids[int(np.argmax(sims))], float(np.max(sims))


def test_auto_is_the_default_and_exact_below_the_threshold():
    assert CacheConfig().index == "auto" and CacheConfig().index_threads == 1
    vectors = clustered(399)
    index = EmbeddingIndex(DIM, use_gpu=False, ivf_min=400)
    assert index.kind == "auto"
    for i, v in enumerate(vectors):
        index.add("ns", i, v)
    assert isinstance(index._shards["ns"].index, faiss.IndexFlatIP)
    assert index.shard_stats("ns")["search"] == "flat" and index.stats()["ivf_shards"] == 0
    queries = clustered(50, seed=1)
    for q in queries:  # exact: the best hit is the brute-force best
        best_id, best_sim = exact_best(vectors, np.arange(len(vectors)), q)
        hit = index.search("ns", q, k=1)[0]
        assert hit[0] == best_id and abs(hit[1] - best_sim) < 1e-5


def test_auto_switches_to_a_recall_checked_ivf_above_the_threshold_and_back():
    vectors = clustered(1000)
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400, background_build=False)
    for i, v in enumerate(vectors[:400]):
        index.add("ns", i, v)
    stats = index.shard_stats("ns")
    assert isinstance(index._shards["ns"].index, faiss.IndexIVFFlat)
    assert stats["search"] == "ivf" and stats["size"] == 400 and stats["nlist"] == 80
    assert stats["recall_at_1"] >= index_module.RECALL_TARGET
    assert index._shards["ns"].index.nprobe == stats["nprobe"]
    for i, v in enumerate(vectors[400:], 400):  # retrained on doubling
        index.add("ns", i, v)
    assert index.shard_stats("ns")["size"] == 800
    whole = index.stats()
    assert whole["ivf_shards"] == 1 and whole["min_recall_at_1"] >= 0.99 and whole["ivf_min"] == 400
    found = sum(index.search("ns", v, k=1)[0][0] == i for i, v in enumerate(vectors))
    assert found >= 0.99 * len(vectors)
    for i in range(700):  # shrinks below the threshold: rebuilt exact
        index.remove(i)
    assert isinstance(index._shards["ns"].index, faiss.IndexFlatIP)
    assert index.shard_stats("ns")["search"] == "flat"


def test_bulk_add_trains_once_and_namespaces_stay_apart():
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400, background_build=False)
    vectors = clustered(900)
    index.add_many("big", list(range(900)), vectors)
    index.add_many("small", [1000, 1001], vectors[:2])
    assert index.shard_stats("big")["size"] == 900 and index.shard_stats("small")["search"] == "flat"
    assert {i for i, _ in index.search("small", vectors[0], k=4)} == {1000, 1001}
    with pytest.raises(KeyError):
        index.add_many("small", [5], vectors[:1])


def test_recall_check_raises_nprobe_until_recall_reaches_the_target(monkeypatch):
    # Unclustered vectors and far-off queries: one list of 178 rarely holds the nearest neighbour.
    monkeypatch.setattr(index_module, "RECALL_NOISE", 1.0)
    vectors = normalize(np.random.default_rng(0).standard_normal((2000, 16)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 178, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add(vectors)
    result = recall_check(ivf, vectors, target=0.99, start_nprobe=1)
    assert result["first_recall_at_1"] < 0.9  # nprobe 1 is not enough here
    assert result["nprobe"] > 2 and result["recall_at_1"] >= 0.99 and ivf.nprobe == result["nprobe"]
    capped = recall_check(ivf, vectors, target=0.99, start_nprobe=1, max_nprobe=2)
    assert capped["nprobe"] == 2 and capped["recall_at_1"] < 0.99  # the cap wins; stats show the shortfall
    # The same through a shard: it starts at IVF_NPROBE and keeps what the check found.
    monkeypatch.setattr(index_module, "IVF_NPROBE", 1)
    for background in (False, True):  # the check runs in the build, in the background or not
        index = EmbeddingIndex(16, kind="auto", use_gpu=False, ivf_min=2000, background_build=background)
        index.add_many("ns", list(range(2000)), vectors)
        assert index.finish_builds(timeout=60)
        stats = index.shard_stats("ns")
        assert stats["search"] == "ivf" and index._shards["ns"].index.nprobe == stats["nprobe"]
        assert stats["first_recall_at_1"] < 0.9 and stats["nprobe"] > 2 and stats["recall_at_1"] >= 0.99


class SlowBuild:
    """Replaces ``index_module.build_ivf``: each build waits for ``release`` (in its thread)."""

    def __init__(self, monkeypatch):
        self.original = index_module.build_ivf
        self.started, self.release = threading.Event(), threading.Event()
        self.threads, self.sizes = [], []
        monkeypatch.setattr(index_module, "build_ivf", self)

    def __call__(self, vectors, recall_target=None):
        self.threads.append((threading.current_thread().name, faiss.omp_get_max_threads()))
        self.sizes.append(len(vectors))
        self.started.set()
        assert self.release.wait(30)
        return self.original(vectors, recall_target)


@pytest.mark.timeout(60)
def test_a_background_build_leaves_add_search_and_remove_working_and_swaps_in_up_to_date(monkeypatch):
    slow = SlowBuild(monkeypatch)
    vectors = clustered(850)
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400)
    index.add_many("ns", list(range(399)), vectors[:399])
    began = time.perf_counter()
    index.add("ns", 399, vectors[399])  # crosses the threshold: the build starts and add returns
    assert time.perf_counter() - began < 5 and slow.started.wait(10)
    shard = index._shards["ns"]
    assert index.shard_stats("ns")["building"] and index.stats()["builds_running"] == 1
    assert slow.threads[0][0] == "nirvana-ivf-build" and slow.sizes == [400]

    # While it is blocked: adds (past the doubling, too), removals (enough to make compaction due)
    # and exact searches all go on against the flat index.
    slowest = 0.0
    for i in range(400, 800):
        began = time.perf_counter()
        index.add("ns", i, vectors[i])
        slowest = max(slowest, time.perf_counter() - began)
    assert slowest < 1.0
    removed = set(range(0, 150)) | set(range(400, 450))
    for i in sorted(removed):
        index.remove(i)
    live = np.array(sorted(set(range(800)) - removed))
    for q in clustered(30, seed=5):
        best_id, best_sim = exact_best(vectors[live], live, q)
        hit = index.search("ns", q, k=1)[0]
        assert hit[0] == best_id and abs(hit[1] - best_sim) < 1e-5
    assert isinstance(shard.index, faiss.IndexFlatIP) and shard.building and slow.sizes == [400]

    # Ready: swapped in by the next search, on this thread, with everything added since and
    # nothing removed since.
    slow.release.set()
    shard._build.done.wait(30)
    index.search("ns", vectors[500], k=1)
    assert isinstance(shard.index, faiss.IndexIVFFlat) and not shard.building and shard.builds == 1
    stats = index.shard_stats("ns")
    assert stats["search"] == "ivf" and stats["size"] == 400 and stats["last_build_s"] > 0
    assert stats["vectors"] == len(live) and len(index) == len(live)
    for i in live:  # every live vector is stored: searching it finds it
        hit = index.search("ns", vectors[i], k=1)[0]
        assert hit[0] == i and hit[1] > 0.9999
    for i in sorted(removed):
        assert not removed & {e for e, _ in index.search("ns", vectors[i], k=5)}
    # 400 + 350 positions: 50 more make it double, and the next build trains on a compacted copy
    # of the 650 live vectors (the 150 removed during the first build are still tombstones).
    assert index._shards["ns"].dead == 150 and len(shard.ids) == 750
    for i in range(800, 850):
        index.add("ns", i, vectors[i])
    assert shard.building
    assert index.finish_builds(timeout=30) and index.shard_stats("ns")["size"] == 650 and slow.sizes == [400, 650]
    assert shard.dead == 0 and index.stats()["builds_running"] == 0 and index.stats()["last_build_s"] > 0
    live = np.concatenate([live, np.arange(800, 850)])
    assert all(index.search("ns", vectors[i], k=1)[0][0] == i for i in live)


@pytest.mark.timeout(60)
def test_the_build_thread_uses_the_index_threads(monkeypatch):
    slow = SlowBuild(monkeypatch)
    slow.release.set()
    before = faiss.omp_get_max_threads()
    try:
        index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400, threads=1)
        index.add_many("ns", list(range(400)), clustered(400))
        assert index.finish_builds(timeout=30)
        assert slow.threads == [("nirvana-ivf-build", 1)]  # OpenMP's setting is per thread
    finally:
        faiss.omp_set_num_threads(before)


@pytest.mark.timeout(60)
def test_a_build_for_a_shard_that_empties_shrinks_or_closes_is_dropped(monkeypatch):
    slow = SlowBuild(monkeypatch)
    vectors = clustered(500)
    # Emptied: the shard goes, and a new one under the same namespace never sees the result.
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400)
    index.add_many("ns", list(range(400)), vectors[:400])
    assert slow.started.wait(10)
    build = index._shards["ns"]._build
    for i in range(400):
        index.remove(i)
    assert "ns" not in index.namespaces()
    index.add("ns", 1000, vectors[0])
    slow.release.set()
    assert build.done.wait(30) and build.index is None and build.vectors is None
    assert index.search("ns", vectors[0], k=2) == [(1000, pytest.approx(1.0, abs=1e-5))]
    assert index.shard_stats("ns")["search"] == "flat" and index._shards["ns"].builds == 0

    # Shrunk below the threshold while building: exact now, the build dropped.
    slow.release.clear()
    index.add_many("big", list(range(2000, 2400)), vectors[:400])
    shard = index._shards["big"]
    build = shard._build
    for i in range(2000, 2150):
        index.remove(i)
    assert shard._build is None and index.shard_stats("big")["search"] == "flat"
    slow.release.set()
    assert build.done.wait(30)
    assert index.search("big", vectors[200], k=1)[0][0] == 2200 and index.shard_stats("big")["search"] == "flat"

    # Closed: nothing is left to swap into, and the index refuses further use.
    slow.release.clear()
    index.add_many("other", list(range(3000, 3400)), vectors[:400])
    build = index._shards["other"]._build
    index.close()
    slow.release.set()
    assert build.done.wait(30) and build.index is None
    with pytest.raises(RuntimeError):
        index.search("other", vectors[0])


@pytest.mark.timeout(60)
def test_a_failed_build_keeps_the_index_and_waits_for_the_doubling(monkeypatch):
    calls = []

    def broken(vectors, recall_target=None):
        calls.append(len(vectors))
        raise RuntimeError("no memory")

    monkeypatch.setattr(index_module, "build_ivf", broken)
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400)
    vectors = clustered(700)
    index.add_many("ns", list(range(400)), vectors[:400])
    assert index.finish_builds(timeout=10)
    for i in range(400, 700):
        index.add("ns", i, vectors[i])
    stats = index.shard_stats("ns")
    assert stats["search"] == "flat" and "no memory" in stats["last_build_error"] and calls == [400]
    assert index.search("ns", vectors[650], k=1)[0][0] == 650


def test_fill_synthetic_reports_the_index_it_leaves(monkeypatch):
    monkeypatch.setattr(index_module, "AUTO_IVF_MIN", 400)
    cache = LatentCache(CacheConfig(), DIM)
    assert cache.index.background_build  # serving default
    report = cache.fill_synthetic(600, steps=10)
    assert report["search"]["search"] == "ivf" and not report["search"]["building"]
    assert report["search"]["size"] == 600 and report["index_seconds"] >= report["search"]["last_build_s"]


def test_flat_ivf_hnsw_still_work():
    vectors = clustered(300)
    for kind in ("flat", "ivf", "hnsw"):
        index = EmbeddingIndex(DIM, kind=kind, use_gpu=False)
        for i, v in enumerate(vectors):
            index.add(("t", 50), i, v)
        assert index.search(("t", 50), vectors[7], k=1)[0][0] == 7
        assert index.stats()["ivf_shards"] == 0  # ivf is exact below IVF_MIN
    with pytest.raises(ValueError):
        EmbeddingIndex(DIM, kind="lsh")


def test_index_threads_set_faiss_threads():
    before = faiss.omp_get_max_threads()
    try:
        LatentCache(CacheConfig(index_threads=1), DIM)
        assert faiss.omp_get_max_threads() == 1
        assert EmbeddingIndex(DIM, use_gpu=False).stats()["threads"] == 1  # 0 leaves the pool as it is
    finally:
        faiss.omp_set_num_threads(before)


def test_config_parses_and_checks_the_new_parameters():
    config = parse_parameters(CacheConfig, {"parameters": {"index": {"string_value": "auto"},
                                                           "index_threads": {"string_value": "2"},
                                                           "synthetic_entries": {"string_value": "1000"}}})
    assert (config.index, config.index_threads, config.synthetic_entries) == ("auto", 2, 1000)
    for bad in ({"index": "lsh"}, {"index_threads": "-1"}, {"synthetic_entries": "-5"},
                {"synthetic_entries": "10", "snapshot_path": "/tmp/x"}):
        with pytest.raises(ConfigError):
            parse_parameters(CacheConfig, {"parameters": {k: {"string_value": v} for k, v in bad.items()}})


def test_fill_synthetic_is_searched_but_never_served():
    cache = LatentCache(CacheConfig(), DIM)
    real = normalize(np.random.default_rng(3).standard_normal(DIM))
    cache.admit(real, CacheKey("real", "", 1, 10, 7.5), {1: torch.zeros(4, 2, 2)})
    report = cache.fill_synthetic(500, steps=10, seed=1)
    assert report["entries"] == 500 and report["state_step"] == 1 and len(cache) == 501
    stats = cache.stats()
    assert stats["synthetic_entries"] == 500 and stats["index"]["largest_shard"] == 501
    synthetic = next(e for e in cache._entries.values() if e.synthetic)
    # A query equal to a synthetic embedding: searched, skipped, a miss.
    miss = cache.lookup(synthetic.embedding, CacheKey("q", "", 2, 10, 7.5))
    assert miss.status == "miss" and miss.similarity < 0.99
    hit = cache.lookup(real, CacheKey("other", "", 2, 10, 7.5))
    assert hit.status == "approximate" and hit.matched_prompt == "real"
    assert cache.fill_synthetic(100, steps=20)["entries"] == 100  # another namespace
    assert cache.flush() == 601 and len(cache.index) == 0 and cache.stats()["synthetic_entries"] == 0


def test_fill_synthetic_respects_the_store_budget():
    # Room for 100 two-byte states: the rest is pushed out before it is indexed.
    cache = LatentCache(CacheConfig(host_bytes=200), DIM)
    report = cache.fill_synthetic(300, steps=10)
    assert report["entries"] == len(cache) == len(cache.index) == 100
    assert cache.store.usage()["host"]["used_bytes"] <= 200


def test_synthetic_entries_parameter_fills_at_construction():
    cache = LatentCache(CacheConfig(synthetic_entries=50, synthetic_steps=10), DIM)
    assert len(cache) == 50 and cache.fill_report["steps"] == 10
    assert cache.index.shard_stats(("", 10))["vectors"] == 50
