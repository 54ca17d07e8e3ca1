"""The index kinds: "auto" switches from exact to recall-checked IVF by size; faiss threads."""

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
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400)
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
    index = EmbeddingIndex(DIM, kind="auto", use_gpu=False, ivf_min=400)
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
    index = EmbeddingIndex(16, kind="auto", use_gpu=False, ivf_min=2000)
    index.add_many("ns", list(range(2000)), vectors)
    stats = index.shard_stats("ns")
    assert stats["first_recall_at_1"] < 0.9 and stats["nprobe"] > 2 and stats["recall_at_1"] >= 0.99


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
