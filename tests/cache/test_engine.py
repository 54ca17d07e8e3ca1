import numpy as np
import pytest
import torch

from nirvana.cache import CacheKey, LatentCache
from nirvana.config import CacheConfig

DIM = 16
SHAPE = (4, 8, 8)


def unit(seed, dim=DIM):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v, similarity, seed=99):
    """A unit vector with the given cosine similarity to unit vector v."""
    r = np.random.default_rng(seed).standard_normal(v.shape).astype(np.float32)
    r -= r.dot(v) * v
    r /= np.linalg.norm(r)
    return similarity * v + np.sqrt(1 - similarity**2) * r


def key(prompt="p", seed=1, steps=50, tenant=""):
    return CacheKey(prompt, "", seed, steps, 7.5, tenant=tenant)


def states(steps=(5, 10, 15, 20, 25), fill=None):
    return {k: torch.full(SHAPE, float(k if fill is None else fill)) for k in steps}


def test_miss_then_exact_then_approximate():
    cache = LatentCache(CacheConfig(), DIM)
    v = unit(0)
    assert cache.lookup(v, key()).status == "miss"
    assert cache.admit(v, key(), states(), final_latents=torch.full(SHAPE, -1.0)) == 6
    exact = cache.lookup(v, key())
    assert (exact.status, exact.start_step) == ("exact", 50)
    assert torch.all(exact.latents == -1)
    other_seed = cache.lookup(v, key(seed=2))
    assert (other_seed.status, other_seed.start_step) == ("approximate", 25)
    assert torch.all(other_seed.latents == 25)
    assert other_seed.save_steps == ()


@pytest.mark.parametrize("similarity, start", [(0.97, 25), (0.92, 20), (0.87, 15), (0.8, 10), (0.7, 5), (0.5, 0)])
def test_similarity_picks_k(similarity, start):
    cache = LatentCache(CacheConfig(), DIM)
    v = unit(0)
    cache.admit(v, key("a"), states())
    result = cache.lookup(near(v, similarity), key("b"))
    assert result.start_step == start
    if start:
        assert torch.all(result.latents == start)
        assert result.save_steps == tuple(k for k in (5, 10, 15, 20, 25) if k > start)
    else:
        assert result.status == "miss" and result.latents is None


def test_evicted_k_falls_back_to_largest_stored_below():
    cache = LatentCache(CacheConfig(), DIM)
    v = unit(0)
    cache.admit(v, key("a"), states((5, 15)))
    assert cache.lookup(near(v, 0.97), key("b")).start_step == 15


def test_namespaces_never_cross():
    cache = LatentCache(CacheConfig(), DIM)
    v = unit(0)
    cache.admit(v, key("a", tenant="alice"), states())
    assert cache.lookup(v, key("a", tenant="bob")).status == "miss"
    assert cache.lookup(v, key("a", steps=30, tenant="alice")).status == "miss"  # other schedule
    assert cache.lookup(v, key("a", tenant="alice")).status != "miss"


def test_host_budget_is_never_exceeded_and_evicted_states_never_returned():
    one_state = 4 * 8 * 8 * 2  # fp16
    cache = LatentCache(CacheConfig(host_bytes=one_state * 7, exact_hit=False), DIM)
    vectors = [unit(i) for i in range(5)]
    for i, v in enumerate(vectors):
        cache.admit(v, key(f"p{i}"), states(fill=i))
        assert cache.store.usage()["host"]["used_bytes"] <= one_state * 7
    assert cache.counters["evicted_states"] == 5 * 5 - 7
    for i, v in enumerate(vectors):
        result = cache.lookup(v, key(f"q{i}"))
        if result.latents is not None:
            assert torch.all(result.latents == i)  # never another prompt's state


def test_lcbfu_keeps_high_k_and_used_states():
    one_state = 4 * 8 * 8 * 2
    cache = LatentCache(CacheConfig(host_bytes=one_state * 3, exact_hit=False), DIM)
    v = unit(0)
    cache.admit(v, key("a"), states((5, 10, 25)))
    cache.admit(unit(1), key("b"), states((25,)))
    # The K=5 state saves the least work: it goes first.
    assert cache.lookup(near(v, 0.7), key("c")).status == "miss"
    assert cache.lookup(v, key("d")).start_step == 25


def test_lru_evicts_least_recent():
    one_state = 4 * 8 * 8 * 2
    cache = LatentCache(CacheConfig(host_bytes=one_state * 2, exact_hit=False, eviction="lru"), DIM)
    a, b, c = unit(0), unit(1), unit(2)
    cache.admit(a, key("a"), states((25,)))
    cache.admit(b, key("b"), states((25,)))
    cache.lookup(a, key("a2"))  # a is now more recent than b
    cache.admit(c, key("c"), states((25,)))
    assert cache.lookup(a, key("a3")).status == "approximate"
    assert cache.lookup(b, key("b3")).status == "miss"


def test_admit_on_hit_off_keeps_only_final():
    cache = LatentCache(CacheConfig(admit_on_hit=False), DIM)
    assert cache.admit(unit(0), key(), states(), final_latents=torch.zeros(SHAPE), was_hit=True) == 1


def test_readmission_updates_the_same_entry():
    cache = LatentCache(CacheConfig(), DIM)
    v = unit(0)
    cache.admit(v, key(), states((5,)))
    cache.admit(v, key(), states((25,)))
    assert len(cache) == 1
    assert len(cache.index) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_tier_serves_hits_from_gpu_memory():
    config = CacheConfig(device_bytes=4 * 8 * 8 * 2 * 5, host_bytes=1 << 20, exact_hit=False)
    cache = LatentCache(config, DIM, device=torch.device("cuda"))
    v = unit(0)
    cache.admit(v, key(), states(), final_latents=torch.zeros(SHAPE))
    assert cache.store.usage()["device"]["states"] == 5
    result = cache.lookup(v, key(seed=9))
    assert result.latents.is_cuda and result.start_step == 25


def test_flush_one_tenant_leaves_the_others():
    cache = LatentCache(CacheConfig(), DIM)
    v = unit(0)
    for tenant in ("alice", "bob"):
        cache.admit(v, key("a", tenant=tenant), states(), final_latents=torch.zeros(SHAPE))
    cache.lookup(v, key("a", tenant="alice"))
    assert cache.tenant_stats("alice")["exact_hits"] == 1
    assert cache.flush("alice") == 1
    assert cache.lookup(v, key("a", tenant="alice")).status == "miss"
    assert cache.lookup(v, key("a", tenant="bob")).status == "exact"
    alice, bob = cache.tenant_stats("alice"), cache.tenant_stats("bob")
    assert (alice["entries"], alice["states"], alice["tiers"]) == (0, 0, {})
    assert alice["lookups"] == 1  # counters restart at the flush
    assert (bob["entries"], bob["states"], bob["exact_hits"]) == (1, 6, 1)
    assert bob["tiers"]["host"]["states"] == 6
    assert bob["tiers"]["host"]["used_bytes"] == cache.store.usage()["host"]["used_bytes"]
    assert cache.all_tenant_stats() == {"alice": alice, "bob": bob}
    assert cache.counters["flushed_states"] == 6


def test_flush_all_empties_index_and_store():
    cache = LatentCache(CacheConfig(), DIM)
    for i, tenant in enumerate(("", "alice", "bob")):
        cache.admit(unit(i), key(str(i), tenant=tenant), states())
    assert cache.tenants() == ["", "alice", "bob"]
    assert cache.flush() == 3
    assert len(cache) == 0 and len(cache.store) == 0 and len(cache.index) == 0
    assert cache.store.usage()["host"]["used_bytes"] == 0
    assert cache.tenants() == []
