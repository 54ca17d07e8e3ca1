"""Top-k lookups: a request resumes from the best of its ``lookup_k`` nearest entries.

The nearest entry may not hold the state its similarity allows: an entry admitted from a hit at
K holds only the steps after K, and evictions leave holes. A farther entry whose similarity
allows the same K may hold it. ``lookup_k=1`` is the nearest entry only.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

import nirvana.cache.index as index_module
from nirvana.cache import CacheKey, LatentCache
from nirvana.cache.index import EmbeddingIndex, normalize
from nirvana.config import MAX_LOOKUP_K, CacheConfig, ConfigError, parse_parameters

pytestmark = pytest.mark.timeout(60)

DIM = 16
SHAPE = (4, 8, 8)
ALL_STEPS = (5, 10, 15, 20, 25)
KINDS = ("flat", "hnsw", "ivf", "auto")


def unit(seed, dim=DIM):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v, similarity, seed):
    """A unit vector with the given cosine similarity to unit vector v."""
    r = np.random.default_rng(seed).standard_normal(v.shape).astype(np.float32)
    r -= r.dot(v) * v
    r /= np.linalg.norm(r)
    return (similarity * v + np.sqrt(1 - similarity**2) * r).astype(np.float32)


def key(prompt, seed=1, steps=50):
    return CacheKey(prompt, "", seed, steps, 7.5)


def states(steps, fill):
    return {k: torch.full(SHAPE, float(fill)) for k in steps}


def cache_of(kind="flat", lookup_k=8, monkeypatch=None, **config):
    """A cache with the paper's thresholds (0.95->25, 0.90->20, 0.85->15, ...); for "ivf" and "auto"
    its namespace is made an IVF shard first (400 synthetic entries, searched but never served,
    over a threshold lowered to 300)."""
    cache = LatentCache(CacheConfig(index=kind, lookup_k=lookup_k, use_gpu=False, **config), DIM)
    if kind in ("ivf", "auto"):
        monkeypatch.setattr(index_module, "IVF_MIN", 300)
        monkeypatch.setattr(index_module, "AUTO_IVF_MIN", 300)
        cache.fill_synthetic(400, steps=50, seed=7)
        assert cache.index.shard_stats(("", 50))["search"] == "ivf"
    return cache


def nearest_lacks_its_k(cache, nearest_steps):
    """The query, after admitting: "near" (similarity 0.93, allows K=20) holding ``nearest_steps``
    plus its final latents, and "far" (0.905, also allows K=20) holding every step. States are
    filled with 1 (near) and 2 (far) to tell them apart."""
    query = unit(0)
    cache.admit(near(query, 0.93, seed=1), key("near"), states(nearest_steps, 1),
                final_latents=torch.zeros(SHAPE), was_hit=True)
    cache.admit(near(query, 0.905, seed=2), key("far"), states(ALL_STEPS, 2), final_latents=torch.zeros(SHAPE))
    hits = cache.index.search(("", 50), query, k=2 + cache.synthetic_entries)
    real = [(cache._entries[e].key.prompt, s) for e, s in hits if not cache._entries[e].synthetic]
    assert [p for p, _ in real] == ["near", "far"], real
    return query


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_resumes_from_a_farther_entry_when_the_nearest_was_admitted_from_a_hit(kind, monkeypatch):
    # "near" was admitted from a hit at K=20: it holds 25 (and its final latents), nothing <= 20.
    top1 = cache_of(kind, lookup_k=1, monkeypatch=monkeypatch)
    query = nearest_lacks_its_k(top1, (25,))
    old = top1.lookup(query, key("q"))
    assert (old.status, old.start_step, old.latents) == ("miss", 0, None)
    assert old.similarity == pytest.approx(0.93, abs=1e-4)  # a miss reports the nearest similarity

    topk = cache_of(kind, lookup_k=8, monkeypatch=monkeypatch)
    query = nearest_lacks_its_k(topk, (25,))
    new = topk.lookup(query, key("q"))
    assert (new.status, new.start_step, new.matched_prompt) == ("approximate", 20, "far")
    assert torch.all(new.latents == 2)
    # The hit reports the similarity of the entry it resumes from, not the nearest one's.
    assert new.similarity == pytest.approx(0.905, abs=1e-4)
    assert new.save_steps == (25,)
    assert topk.counters["approximate_hits"] == 1 and top1.counters["misses"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_prefers_a_larger_usable_k_over_a_nearer_entry_with_a_hole(kind, monkeypatch):
    # "near" lost its 10..20 states to eviction: the nearest entry alone gives K=5.
    top1 = cache_of(kind, lookup_k=1, monkeypatch=monkeypatch)
    query = nearest_lacks_its_k(top1, (5, 25))
    old = top1.lookup(query, key("q"))
    assert (old.status, old.start_step, old.matched_prompt) == ("approximate", 5, "near")
    assert torch.all(old.latents == 1)

    topk = cache_of(kind, lookup_k=2, monkeypatch=monkeypatch)
    query = nearest_lacks_its_k(topk, (5, 25))
    new = topk.lookup(query, key("q"))
    assert (new.status, new.start_step, new.matched_prompt) == ("approximate", 20, "far")
    assert torch.all(new.latents == 2)


def test_equal_usable_k_goes_to_the_more_similar_entry():
    cache = cache_of(lookup_k=8)
    query = unit(0)
    cache.admit(near(query, 0.905, seed=2), key("farther"), states(ALL_STEPS, 2))
    cache.admit(near(query, 0.93, seed=1), key("nearer"), states(ALL_STEPS, 1))
    result = cache.lookup(query, key("q"))
    assert (result.start_step, result.matched_prompt) == (20, "nearer")
    assert result.similarity == pytest.approx(0.93, abs=1e-4)


def test_the_nearest_entry_still_wins_when_it_holds_its_k():
    cache = cache_of(lookup_k=8)
    query = unit(0)
    cache.admit(near(query, 0.97, seed=1), key("nearest"), states(ALL_STEPS, 1))
    cache.admit(near(query, 0.93, seed=2), key("other"), states(ALL_STEPS, 2))
    result = cache.lookup(query, key("q"))
    assert (result.start_step, result.matched_prompt) == (25, "nearest")


def test_a_state_the_store_lost_falls_back_to_the_next_best():
    cache = cache_of(lookup_k=8)
    query = nearest_lacks_its_k(cache, (5, 25))
    far_id = next(e.entry_id for e in cache._entries.values() if e.key.prompt == "far")
    cache.store.remove((far_id, 20))  # behind the cache's back, as a failing disk tier would
    result = cache.lookup(query, key("q"))
    assert (result.start_step, result.matched_prompt) == (15, "far")
    assert 20 not in cache._entries[far_id].steps  # forgotten, not tried again


def test_candidates_outside_the_thresholds_are_not_used():
    cache = cache_of(lookup_k=8)
    query = unit(0)
    cache.admit(near(query, 0.93, seed=1), key("near"), states((25,), 1), was_hit=True)
    cache.admit(near(query, 0.5, seed=2), key("unrelated"), states(ALL_STEPS, 2))
    result = cache.lookup(query, key("q"))
    assert result.status == "miss" and result.similarity == pytest.approx(0.93, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_lookup_k_larger_than_the_cache(kind, monkeypatch):
    cache = cache_of(kind, lookup_k=MAX_LOOKUP_K, monkeypatch=monkeypatch)
    query = nearest_lacks_its_k(cache, (25,))
    result = cache.lookup(query, key("q"))
    assert (result.start_step, result.matched_prompt) == (20, "far")
    empty = cache_of("flat", lookup_k=MAX_LOOKUP_K)
    assert empty.lookup(query, key("q")).status == "miss"


@pytest.mark.parametrize("kind", KINDS)
def test_search_with_k_beyond_the_shard_returns_live_entries_only(kind, monkeypatch):
    monkeypatch.setattr(index_module, "AUTO_IVF_MIN", 300)
    index = EmbeddingIndex(DIM, kind=kind, use_gpu=False, ivf_min=300, background_build=False)
    vectors = normalize(np.random.default_rng(0).standard_normal((3, DIM)))
    index.add_many("small", [10, 11, 12], vectors)
    hits = index.search("small", vectors[0], k=100)
    assert sorted(e for e, _ in hits) == [10, 11, 12] and hits[0][0] == 10
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)

    many = normalize(np.random.default_rng(1).standard_normal((400, DIM)))
    index.add_many("big", list(range(1000, 1400)), many)
    assert index.shard_stats("big")["search"] == ("ivf" if kind in ("ivf", "auto") else kind)
    hits = index.search("big", many[0], k=5000)  # faiss pads what it cannot find with -1 ids
    ids = [e for e, _ in hits]
    assert ids and len(ids) == len(set(ids)) and set(ids) <= set(range(1000, 1400))
    if kind == "flat":
        assert len(ids) == 400
    assert ids[0] == 1000


@pytest.mark.parametrize("kind", KINDS)
def test_search_widens_past_tombstones_among_the_nearest(kind, monkeypatch):
    monkeypatch.setattr(index_module, "AUTO_IVF_MIN", 300)
    rng = np.random.default_rng(2)
    query = unit(0)
    # 90 near-duplicates of the query, then removed: more tombstones than the first search's room.
    crowd = normalize(query + 0.05 * rng.standard_normal((90, DIM)))
    others = normalize(rng.standard_normal((310, DIM)))
    index = EmbeddingIndex(DIM, kind=kind, use_gpu=False, ivf_min=300, background_build=False)
    index.add_many("ns", list(range(90)), crowd)
    index.add_many("ns", list(range(100, 410)), others)
    for i in range(90):
        index.remove(i)
    shard = index._shards["ns"]
    assert shard.dead == 90  # below the compaction threshold (a quarter): still tombstoned
    if shard.ivf:
        # The probed lists hold only the removed crowd (k-means gave it most of the lists): what an
        # IVF reaches is tombstones and -1 padding, and neither comes out.
        assert all(100 <= e < 410 for e, _ in index.search("ns", query, k=5))
        shard.index.nprobe = shard.index.nlist  # every list: the widening is what is left to check
    hits = index.search("ns", query, k=5)
    ids = [e for e, _ in hits]
    assert len(ids) == 5 and all(100 <= e < 410 for e in ids)
    best = 100 + np.argsort(-(others @ query))[:5]
    if kind == "hnsw":  # approximate: most of the true top 5
        assert len(set(ids) & {int(e) for e in best}) >= 4
    else:
        assert ids == [int(e) for e in best]


def test_lookup_k_is_parsed_and_validated():
    parse = lambda **v: parse_parameters(CacheConfig, {"parameters": {k: {"string_value": s}  # noqa: E731
                                                                      for k, s in v.items()}})
    assert parse().lookup_k == CacheConfig().lookup_k >= 1
    assert parse(lookup_k="1").lookup_k == 1 and parse(lookup_k="16").lookup_k == 16
    for bad in ("0", "-3", str(MAX_LOOKUP_K + 1)):
        with pytest.raises(ConfigError, match="lookup_k must be within"):
            parse(lookup_k=bad)
    with pytest.raises(ConfigError, match="parameter 'lookup_k'"):
        parse(lookup_k="eight")
    with pytest.raises(ConfigError, match="lookup_k"):
        dataclasses.replace(CacheConfig(), lookup_k=0).validate()


def test_committed_latent_cache_config_sets_the_default_lookup_k(repository):
    from nirvana.config import read_pbtxt_parameters

    params = read_pbtxt_parameters(repository / "latent_cache" / "config.pbtxt")
    assert params["parameters"]["lookup_k"]["string_value"] == str(CacheConfig().lookup_k)


# -- nirvana-simulate's comparison -------------------------------------------------------------

def test_simulate_parses_threshold_tables(tmp_path):
    from nirvana_perf.simulate import parse_thresholds_option

    assert parse_thresholds_option("[[0.91, 20], [0.95, 25]]", 1) == ("T1", ((0.95, 25), (0.91, 20)))
    assert parse_thresholds_option("strict=0.97:25,0.93:20") == ("strict", ((0.97, 25), (0.93, 20)))
    spec = tmp_path / "pipeline.json"
    spec.write_text(json.dumps({"model_id": "m", "thresholds": [[0.9, 30], [0.8, 10]]}))
    assert parse_thresholds_option(f"calibrated={spec}") == ("calibrated", ((0.9, 30), (0.8, 10)))
    assert parse_thresholds_option(str(tmp_path)) == (str(tmp_path), ((0.9, 30), (0.8, 10)))
    for bad in ("[[0.9]]", "nothing", "[]", "x=[not json"):
        with pytest.raises(ConfigError):
            parse_thresholds_option(bad)


def test_simulate_extends_cache_steps_to_every_k_of_a_table():
    from nirvana_perf.simulate import config_for_thresholds

    config = config_for_thresholds(CacheConfig(), ((0.97, 40), (0.95, 30), (0.9, 20)))
    assert config.cache_steps == (5, 10, 15, 20, 25, 30, 40)
    assert config.thresholds == ((0.97, 40), (0.95, 30), (0.9, 20))
    with pytest.raises(ConfigError):
        config_for_thresholds(CacheConfig(), ((0.97, 50),))  # K must be below base_steps


def test_simulate_compares_top_1_with_top_k():
    from nirvana_perf.simulate import compare_lookups, comparison_table, nearest_previous_similarity

    # A chain of prompts drifting away from the first: each is 0.93 to the one before (K=20), and
    # the one two back is 0.905 or more. A request that hit the previous one at 20 holds only 25,
    # so the next request's nearest entry lacks its K; the one before still holds it.
    query = unit(0)
    vectors = [query]
    for i in range(1, 12):
        vectors.append(normalize(near(vectors[-1], 0.975, seed=i)))
    embeddings = np.stack(vectors).astype(np.float32)
    rows = [{"prompt": f"p{i}", "seed": i} for i in range(len(vectors))]
    nearest = nearest_previous_similarity(embeddings)
    table = ((0.98, 25), (0.95, 20), (0.9, 15))
    results, info = compare_lookups(rows, embeddings, nearest, CacheConfig(), [("chain", table)], [1, 8], [],
                                    progress=False)
    by_k = {r.lookup_k: r for r in results}
    assert set(by_k) == {1, 8} and all(r.unbounded for r in results)
    assert by_k[8].hit_rate > by_k[1].hit_rate
    assert by_k[8].steps_saved_fraction > by_k[1].steps_saved_fraction
    bound = info["chain"]["bound"]
    assert bound["hit_rate"] >= by_k[8].hit_rate and bound["steps_saved_fraction"] >= by_k[8].steps_saved_fraction
    text = comparison_table(results, info, [1, 8])
    assert "top-1: hit rate" in text and "best of 8: steps saved" in text and "| chain | unbounded |" in text
