"""Restore into any configuration (hypothesis): whatever the new budgets, tiers, policy, index
kind or cache steps, a restore never raises, reports exactly what the cache holds afterwards,
and every state it brings back is the one that was written."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nirvana.cache import CacheKey, LatentCache
from nirvana.cache.engine import FINAL
from nirvana.cache.persistence import CachePersistence
from nirvana.config import CacheConfig

pytestmark = pytest.mark.timeout(600)

DIM = 8
SHAPE = (4, 2, 2)
STATE_BYTES = 4 * 2 * 2 * 2  # one fp16 state

requests = st.lists(st.tuples(st.sampled_from(["admit", "lookup"]), st.integers(0, 15), st.integers(0, 3),
                              st.sampled_from([10, 50])), min_size=1, max_size=40)

configs = st.fixed_dictionaries({
    "host_states": st.integers(1, 80),  # host budget in fp16 states
    "disk_states": st.sampled_from([0, 0, 8, 40]),  # a disk tier added (or not)
    "eviction": st.sampled_from(["lcbfu", "lru", "lfu", "fifo"]),
    "index": st.sampled_from(["flat", "auto", "ivf", "hnsw"]),
    "cache_steps": st.sampled_from([(5, 10, 15, 20, 25), (10, 20), (5, 25), (15,)]),
    "exact_hit": st.booleans(),
    "store_dtype": st.sampled_from(["float16", "float32", "bfloat16"]),
})


def thresholds_for(steps):
    return tuple((0.95 - 0.1 * i, k) for i, k in enumerate(sorted(steps, reverse=True)))


def build(options, disk_path):
    return CacheConfig(host_bytes=options["host_states"] * STATE_BYTES,
                       disk_bytes=options["disk_states"] * STATE_BYTES * 2,
                       disk_path=str(disk_path) if options["disk_states"] else "",
                       eviction=options["eviction"], index=options["index"], cache_steps=options["cache_steps"],
                       thresholds=thresholds_for(options["cache_steps"]), exact_hit=options["exact_hit"],
                       store_dtype=options["store_dtype"], use_gpu=False)


def run(cache, ops):
    for op, prompt, seed, steps in ops:
        vector = np.random.default_rng(prompt).standard_normal(DIM).astype(np.float32)
        key = CacheKey(f"p{prompt}", "", seed, steps, 7.5, tenant="t" if prompt % 3 == 0 else "")
        if op == "lookup":
            cache.lookup(vector, key)
            continue
        checkpoints = {k: torch.full(SHAPE, float(prompt * 1000 + seed * 100 + k)) for k in cache.save_steps(steps)}
        cache.admit(vector, key, checkpoints, final_latents=torch.full(SHAPE, -float(prompt * 10 + seed)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=requests, before=configs, after=configs, with_journal=st.booleans())
def test_restore_into_any_configuration(tmp_path_factory, ops, before, after, with_journal):
    root = tmp_path_factory.mktemp("persist")
    writer = LatentCache(build(before, tmp_path_factory.mktemp("disk")), DIM)
    persistence = CachePersistence(writer, root, threading.Lock(), appendfsync="always", interval_s=-1)
    persistence.start()
    half = len(ops) // 2 if with_journal else len(ops)
    run(writer, ops[:half])
    persistence.compact()
    run(writer, ops[half:])  # only in the journal
    persistence.sync()
    written = {(r.key.digest(), s.step): s.tensor.clone() for r in writer.export_entries() for s in r.states}
    persistence.close(final_snapshot=False)  # a crash: no final snapshot

    reader = LatentCache(build(after, tmp_path_factory.mktemp("disk")), DIM)
    report = CachePersistence(reader, root, threading.Lock(), interval_s=-1).restore()

    assert report["problems"] == []
    restored = reader.export_entries()
    assert report["entries"] == len(reader) == len(restored)
    assert report["states"] == len(reader.store) == sum(len(r.states) for r in restored)
    budget = sum(u["budget_bytes"] for u in reader.store.usage().values())
    assert sum(u["used_bytes"] for u in reader.store.usage().values()) <= budget
    new_dtype = reader.store.dtype
    for record in restored:
        for state in record.states:
            original = written[(record.key.digest(), state.step)]  # nothing is invented
            want = original.float() if state.step == FINAL else original.to(new_dtype)
            assert torch.equal(state.tensor.to(want.dtype), want)
            assert state.step == FINAL or state.step in reader.save_steps(record.key.steps)
            assert state.step != FINAL or reader.config.exact_hit
    # Whatever was restored is served: exact hits for final latents, at most the cached K otherwise.
    for record in restored:
        result = reader.lookup(record.embedding, record.key)
        steps = {s.step for s in record.states}
        if FINAL in steps:
            assert result.status == "exact"
