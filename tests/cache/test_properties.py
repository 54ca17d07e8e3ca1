"""Property tests (hypothesis) for the index, the store tiers and the engine's policies."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nirvana.cache import CacheKey, LatentCache
from nirvana.cache.index import EmbeddingIndex, normalize
from nirvana.cache.store import DiskTier, LatentStore, MemoryTier
from nirvana.config import CacheConfig

DIM = 8

operations = st.lists(st.tuples(st.sampled_from(["add", "remove", "search"]), st.integers(0, 2),
                                st.integers(0, 10_000)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(ops=operations, kind=st.sampled_from(["flat", "ivf", "hnsw", "auto", "auto@16", "auto@16/sync"]))
def test_index_returns_only_live_entries_of_the_namespace(ops, kind):
    # auto@16: the auto kind switching to IVF at 16 vectors, so shards train, retrain and shrink back,
    # in background builds swapped in whenever they are ready (or in the add: /sync).
    index = EmbeddingIndex(DIM, kind=kind.split("@")[0], use_gpu=False, background_build="/sync" not in kind,
                           ivf_min=int(kind.split("@")[1].split("/")[0]) if "@" in kind else None)
    live = {}  # id -> (namespace, vector)
    next_id = 0
    for op, namespace, seed in ops:
        vector = normalize(np.random.default_rng(seed).standard_normal(DIM))
        if op == "add":
            index.add(namespace, next_id, vector)
            live[next_id] = (namespace, vector)
            next_id += 1
        elif op == "remove" and live:
            victim = sorted(live)[seed % len(live)]
            index.remove(victim)
            del live[victim]
        else:
            hits = index.search(namespace, vector, k=3)
            expected = {i for i, (ns, _) in live.items() if ns == namespace}
            assert {i for i, _ in hits} <= expected
            assert len(hits) == min(3, len(expected)) or kind in ("hnsw", "auto@16", "auto@16/sync")
            if kind in ("flat", "ivf", "auto") and expected:  # ivf and auto are exact below their threshold
                best = max(float(v @ vector) for i, (ns, v) in live.items() if ns == namespace)
                assert abs(hits[0][1] - best) < 1e-5
    assert len(index) == len(live)
    assert index.finish_builds(timeout=30)
    for namespace in range(3):  # once every build is in: each live vector is found, nothing else
        expected = {i for i, (ns, _) in live.items() if ns == namespace}
        found = {i for _, v in live.values() for i, _ in index.search(namespace, v, k=3)}
        assert found <= expected
    assert len(index) == len(live) and index.stats()["builds_running"] == 0


@settings(max_examples=60, deadline=None)
@given(puts=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 64), st.integers(0, 100)), max_size=80),
       budgets=st.tuples(st.integers(0, 600), st.integers(1, 600), st.integers(0, 2000)))
def test_store_tiers_never_exceed_their_budgets(tmp_path_factory, puts, budgets):
    tiers = [MemoryTier(budgets[0], torch.device("cpu")), MemoryTier(budgets[1], torch.device("cpu")),
             DiskTier(budgets[2], tmp_path_factory.mktemp("disk"))]
    store = LatentStore(tiers, torch.float32)
    expected = {}
    for key, size, score in puts:
        tensor = torch.full((size,), float(key * 1000 + size))
        dropped = store.put(key, tensor, (score,))
        expected[key] = tensor
        for gone in dropped:
            expected.pop(gone, None)
        for tier in store.tiers:
            assert tier.used_bytes <= tier.budget_bytes
    for key, tensor in expected.items():
        assert torch.equal(store.get(key), tensor)
    assert len(store) == len(expected)


requests = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["", "a", "b"]), st.integers(0, 3),
                              st.floats(0.5, 1.0)), min_size=1, max_size=60)


@settings(max_examples=50, deadline=None)
@given(reqs=requests, policy=st.sampled_from(["lcbfu", "lru", "lfu", "fifo"]), capacity=st.integers(1, 25),
       exact=st.booleans(), admit_on_hit=st.booleans())
def test_engine_never_crosses_tenants_or_returns_evicted_states(reqs, policy, capacity, exact, admit_on_hit):
    config = CacheConfig(eviction=policy, host_bytes=4 * capacity, store_dtype="float32", exact_hit=exact,
                         admit_on_hit=admit_on_hit, use_gpu=False)
    cache = LatentCache(config, DIM)
    owner = {}  # state value -> (tenant, prompt, step)
    for n, (topic, tenant, seed, mix) in enumerate(reqs):
        base = normalize(np.random.default_rng(topic).standard_normal(DIM))
        noise = normalize(np.random.default_rng(1000 + n).standard_normal(DIM))
        embedding = normalize(mix * base + (1 - mix) * noise)
        key = CacheKey(f"prompt {topic} {n % 3}", "", seed, 50, 7.5, tenant=tenant)
        result = cache.lookup(embedding, key)
        if result.latents is not None:
            value = float(result.latents.reshape(-1)[0])
            who = owner[value]
            assert who[0] == tenant  # never another tenant's state
            assert who[1] == result.matched_prompt
            assert who[2] == (-1 if result.status == "exact" else result.start_step)
        if result.status != "exact":
            states = {}
            for k in result.save_steps:
                value = float(len(owner))
                owner[value] = (tenant, key.prompt, k)
                states[k] = torch.tensor([value])
            value = float(len(owner))
            owner[value] = (tenant, key.prompt, -1)
            cache.admit(embedding, key, states, final_latents=torch.tensor([value]),
                        was_hit=result.status != "miss")
        assert cache.store.usage()["host"]["used_bytes"] <= 4 * capacity


def test_ivf_shard_trains_keeps_recall_and_survives_removals(monkeypatch):
    import nirvana.cache.index as index_module

    monkeypatch.setattr(index_module, "IVF_MIN", 500)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, DIM))
    vectors = normalize(centers[rng.integers(0, 20, 1200)] + 0.3 * rng.standard_normal((1200, DIM)))
    index = EmbeddingIndex(DIM, kind="ivf", use_gpu=False)  # trains in the background
    for i, v in enumerate(vectors):
        index.add("ns", i, v)
    assert index.finish_builds(timeout=60)
    assert isinstance(index._shards["ns"].index, index_module.faiss.IndexIVFFlat)
    for i in range(0, 1200, 3):
        index.remove(i)
    found = sum(index.search("ns", vectors[i], k=1)[0][0] == i for i in range(1, 1200, 3))
    assert found / 400 >= 0.95
    assert all(hit[0] % 3 for i in range(0, 1200, 7) for hit in index.search("ns", vectors[i], k=3))
