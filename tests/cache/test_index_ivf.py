"""IVF shards of the similarity index, checked against exact search.

The cache's own tests add a few hundred entries, far below ``AUTO_IVF_MIN``, so they never
search an IVF. Here ``ivf_min`` is small and shards hold thousands of vectors: once trained and
recall-checked, an IVF shard's best hit for a near-duplicate query (what the cache looks up) is
the exact best for at least ``RECALL_TARGET`` of queries, removed entries are never returned
(tombstoned, then compacted and retrained), and namespaces never see each other's entries.
"""

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nirvana.cache.index as index_module
from nirvana.cache.index import EmbeddingIndex, normalize

pytestmark = pytest.mark.timeout(120)

DIM = 48
IVF_MIN = 1000  # far below AUTO_IVF_MIN: shards of a few thousand vectors are IVF
K = 3


def clustered(n: int, rng: np.random.Generator, clusters: int = 24) -> np.ndarray:
    """Unit vectors around a few centers, like the embeddings of prompts on a few topics."""
    centers = rng.standard_normal((clusters, DIM))
    return normalize(centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, DIM)))


def near(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Near-duplicates of ``vectors`` (cosine ~0.99, as in the index's recall check), not the
    recall check's own queries (another random draw)."""
    noise = index_module.RECALL_NOISE * rng.standard_normal(vectors.shape) / np.sqrt(DIM)
    return normalize(vectors + noise.astype(np.float32))


def new_index(background_build: bool) -> EmbeddingIndex:
    return EmbeddingIndex(DIM, kind="ivf", use_gpu=False, ivf_min=IVF_MIN, background_build=background_build,
                          threads=1)


def agreement(index: EmbeddingIndex, namespace, live: dict, queries: np.ndarray) -> float:
    """Share of ``queries`` whose best hit is as similar as the exact best over ``live``
    ({entry id: vector}, the namespace's live entries; ties between duplicates count).

    Every hit, best or not, must be a live entry of ``namespace`` reported with its true cosine,
    in descending order, and never better than the exact best.
    """
    ids = list(live)
    exact_best = (queries @ np.stack([live[i] for i in ids]).T).max(axis=1)
    agreeing = 0
    for query, best in zip(queries, exact_best):
        hits = index.search(namespace, query, k=K)
        assert len(hits) == min(K, len(ids))
        for entry, similarity in hits:
            assert entry in live, f"entry {entry} is not a live entry of {namespace!r}"
            assert abs(similarity - float(query @ live[entry])) < 1e-4
        similarities = [s for _, s in hits]
        assert similarities == sorted(similarities, reverse=True)
        assert similarities[0] <= best + 1e-5
        agreeing += similarities[0] >= best - 1e-5
    return agreeing / len(queries)


def assert_ivf(index: EmbeddingIndex, namespace, size: int) -> None:
    """``namespace`` is searched by an IVF trained on ``size`` vectors that passed its recall check."""
    stats = index.shard_stats(namespace)
    assert stats["search"] == "ivf" and not stats["building"], stats
    assert isinstance(index._shards[namespace].index, faiss.IndexIVFFlat)
    assert stats["size"] == size and stats["nlist"] == int(4 * np.sqrt(size))
    assert stats["recall_at_1"] >= index_module.RECALL_TARGET
    assert index._shards[namespace].index.nprobe == stats["nprobe"] >= index_module.IVF_NPROBE


@pytest.mark.parametrize("background_build", [False, True], ids=["sync", "background"])
def test_ivf_best_hit_matches_exact_search_as_the_shard_grows_and_retrains(background_build):
    rng = np.random.default_rng(1)
    vectors = clustered(4500, rng)
    live = {}
    index = new_index(background_build)
    trained = []
    for start in range(0, len(vectors), 250):
        batch = range(start, start + 250)
        index.add_many("ns", list(batch), vectors[start:start + 250])
        live.update((i, vectors[i]) for i in batch)
        # A background build in flight: the shard keeps answering from its current index.
        assert agreement(index, "ns", live, near(vectors[rng.choice(len(live), 20)], rng)) >= 0.9
        if len(live) in (750, IVF_MIN, 2500, 4500):
            assert index.finish_builds(timeout=60)
            queries = near(vectors[rng.choice(len(live), 400, replace=False)], rng)
            if len(live) < IVF_MIN:
                assert index.shard_stats("ns")["search"] == "flat"
                assert agreement(index, "ns", live, queries) == 1.0
                continue
            size = {IVF_MIN: IVF_MIN, 2500: 2 * IVF_MIN, 4500: 4 * IVF_MIN}[len(live)]  # retrained on doubling
            assert_ivf(index, "ns", size)
            trained.append(size)
            assert agreement(index, "ns", live, queries) >= index_module.RECALL_TARGET
    assert trained == [IVF_MIN, 2 * IVF_MIN, 4 * IVF_MIN] and index.shard_stats("ns")["builds"] == 3
    assert index.stats()["min_recall_at_1"] >= index_module.RECALL_TARGET


@pytest.mark.parametrize("background_build", [False, True], ids=["sync", "background"])
def test_removed_entries_are_never_returned_by_an_ivf_shard(background_build):
    rng = np.random.default_rng(2)
    vectors = clustered(4000, rng)
    index = new_index(background_build)
    index.add_many("ns", list(range(len(vectors))), vectors, sync_build=True)
    assert_ivf(index, "ns", 4000)
    live = {i: vectors[i] for i in range(len(vectors))}
    order = rng.permutation(len(vectors))

    # 10% removed: tombstoned in the same IVF (a compaction is due at a quarter).
    ivf = index._shards["ns"].index
    for i in order[:400]:
        index.remove(int(i))
        del live[int(i)]
    assert index._shards["ns"].index is ivf and index._shards["ns"].dead == 400
    removed = vectors[order[:400]]
    queries = np.concatenate([removed, near(removed, rng), near(vectors[order[400:800]], rng)])
    assert agreement(index, "ns", live, queries) >= index_module.RECALL_TARGET

    # 30% removed: the shard is compacted and its IVF retrained on the live vectors.
    for i in order[400:1200]:
        index.remove(int(i))
        del live[int(i)]
    assert index.finish_builds(timeout=60)
    assert index._shards["ns"].dead < 16 + len(index._shards["ns"].ids) // 4
    assert index.shard_stats("ns")["vectors"] == len(live) == 2800
    assert index._shards["ns"].index is not ivf
    assert index.shard_stats("ns")["builds"] >= 2 and index.shard_stats("ns")["search"] == "ivf"
    removed = vectors[order[:1200]]
    queries = np.concatenate([removed[::2], near(removed[1::2], rng), near(vectors[order[1200:1800]], rng)])
    assert agreement(index, "ns", live, queries) >= index_module.RECALL_TARGET

    # A removed id can come back with another vector; the old one is gone with it.
    back = [int(i) for i in order[:50]]
    fresh = clustered(50, np.random.default_rng(3))
    index.add_many("ns", back, fresh)
    live.update(zip(back, fresh))
    assert agreement(index, "ns", live, np.concatenate([fresh, vectors[back]])) >= index_module.RECALL_TARGET

    # Below the threshold after a compaction: exact search again.
    for i in order[1200:3500]:
        index.remove(int(i))
        del live[int(i)]
    assert index.finish_builds(timeout=60)
    assert index.shard_stats("ns")["search"] == "flat"
    assert agreement(index, "ns", live, np.concatenate([vectors[order[1200:1400]], near(vectors[:200], rng)])) == 1.0
    assert len(index) == len(live)


def test_ivf_namespaces_never_see_each_other():
    """Two IVF shards holding the very same vectors under different ids, and a small exact one:
    each search answers from its own namespace only, and removals in one leave the others alone."""
    rng = np.random.default_rng(4)
    vectors = clustered(2500, rng)
    alice, bob, small = ("alice", 50), ("bob", 50), ("alice", 20)
    offset = {alice: 0, bob: 100_000, small: 200_000}
    index = new_index(background_build=False)  # trained at 1000 and 2000 vectors, not when a thread is done
    for namespace in (alice, bob):
        for start in range(0, len(vectors), 500):
            index.add_many(namespace, [offset[namespace] + i for i in range(start, start + 500)],
                           vectors[start:start + 500])
    index.add_many(small, [offset[small] + i for i in range(300)], vectors[:300])
    assert index.finish_builds(timeout=60)
    assert_ivf(index, alice, 2 * IVF_MIN)
    assert_ivf(index, bob, 2 * IVF_MIN)
    assert index.shard_stats(small)["search"] == "flat"
    stats = index.stats()
    assert (stats["shards"], stats["ivf_shards"], len(index)) == (3, 2, 5300)

    live = {ns: {offset[ns] + i: vectors[i] for i in range(n)}
            for ns, n in ((alice, len(vectors)), (bob, len(vectors)), (small, 300))}
    queries = near(vectors[rng.choice(len(vectors), 300, replace=False)], rng)
    for namespace in (alice, bob):
        assert agreement(index, namespace, live[namespace], queries) >= index_module.RECALL_TARGET
        found = sum(index.search(namespace, vectors[i], k=1)[0][0] == offset[namespace] + i for i in range(0, 2500, 5))
        assert found >= index_module.RECALL_TARGET * 500
    assert agreement(index, small, live[small], queries) == 1.0

    for i in rng.permutation(len(vectors))[:900]:  # bob's removals: compacted and retrained
        index.remove(offset[bob] + int(i))
        del live[bob][offset[bob] + int(i)]
    assert index.finish_builds(timeout=60)
    assert index.shard_stats(alice)["vectors"] == 2500 and index.shard_stats(bob)["vectors"] == 1600
    for namespace in (alice, bob):
        assert agreement(index, namespace, live[namespace], np.concatenate([vectors[::10], queries])) >= \
            index_module.RECALL_TARGET
    for entry in list(live[small]):  # an emptied namespace is gone, the others are not
        index.remove(entry)
    assert index.search(small, vectors[0]) == [] and index.shard_stats(small) is None
    assert index.search(("carol", 50), vectors[0]) == []
    assert index.stats()["shards"] == 2 and len(index) == 2500 + 1600


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(IVF_MIN, 3 * IVF_MIN),
       batch=st.integers(50, 1500), removed=st.floats(0.0, 0.9), background_build=st.booleans())
def test_ivf_shard_agrees_with_exact_search_whatever_was_added_and_removed(seed, size, batch, removed,
                                                                          background_build):
    rng = np.random.default_rng(seed)
    vectors = clustered(size, rng)
    index = new_index(background_build)
    for start in range(0, size, batch):
        index.add_many("ns", list(range(start, min(size, start + batch))), vectors[start:start + batch])
    live = {i: vectors[i] for i in range(size)}
    for i in rng.permutation(size)[:int(removed * size)]:
        index.remove(int(i))
        del live[int(i)]
    assert index.finish_builds(timeout=60)
    assert index.shard_stats("ns")["vectors"] == len(live)
    picks = rng.choice(size, 200, replace=False)
    queries = np.concatenate([vectors[picks], near(vectors[picks], rng)])  # removed ones among them
    share = agreement(index, "ns", live, queries)
    if index.shard_stats("ns")["search"] == "ivf":
        assert index.shard_stats("ns")["recall_at_1"] >= index_module.RECALL_TARGET
        assert share >= index_module.RECALL_TARGET
    else:
        assert len(live) < IVF_MIN and share == 1.0  # shrank back to exact search
