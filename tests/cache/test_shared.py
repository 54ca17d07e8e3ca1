"""The shared tier against a real redis-server: two caches (replicas) in one process."""

import collections
import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import redis
import torch

from nirvana.cache import LatentCache
from nirvana.cache.policy import StateStats, lcbfu
from nirvana.cache.shared import ENTRY_OVERHEAD, STATE_OVERHEAD, SharedTier, serialize_state
from nirvana.cache.sync import SharedTierSync
from nirvana.config import CacheConfig
from tests.cache.test_engine import DIM, SHAPE, key, near, states, unit

pytestmark = pytest.mark.timeout(60)


class Replica:
    """A cache with its shared tier and follower thread, as one latent_cache model holds them."""

    def __init__(self, url, name, budget=1 << 30, host_bytes=1 << 30, eviction="lcbfu", maxlen=100_000):
        self.tier = SharedTier(url, "test:model", budget, policy=eviction, timeout_s=0.2, replica_id=name,
                               stream_maxlen=maxlen)
        self.cache = LatentCache(CacheConfig(host_bytes=host_bytes, eviction=eviction), DIM, shared=self.tier)
        self.lock = threading.Lock()
        self.sync = SharedTierSync(self.cache, self.tier, self.lock, block_ms=50, retry_s=0.2, stats_interval_s=0.2)
        self.sync.start()

    def lookup(self, embedding, k):
        with self.lock:
            return self.cache.lookup(embedding, k)

    def admit(self, embedding, k, checkpoints, final=None):
        with self.lock:
            return self.cache.admit(embedding, k, checkpoints, final)

    def close(self):
        self.sync.close()
        self.tier.close()


@pytest.fixture
def replicas(redis_server):
    made = []

    def make(name, **kwargs):
        made.append(Replica(redis_server.url, name, **kwargs))
        return made[-1]

    yield make
    for replica in made:
        replica.close()


def eventually(check, timeout=1.0):
    """Poll ``check`` until it is truthy; the issue's bound for replicas to agree is 1 s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.01)


def test_an_admission_on_one_replica_is_an_exact_and_an_approximate_hit_on_another(replicas):
    a, b = replicas("a"), replicas("b")
    v = unit(0)
    a.admit(v, key("red circle"), states(), final=torch.full(SHAPE, -1.5))
    exact = eventually(lambda: b.lookup(v, key("red circle")).status == "exact" and b.lookup(v, key("red circle")))
    assert exact and exact.start_step == 50
    assert torch.equal(exact.latents, torch.full(SHAPE, -1.5))  # fp32 final latents, bit for bit
    approximate = b.lookup(near(v, 0.97), key("a red circle"))
    assert (approximate.status, approximate.start_step) == ("approximate", 25)
    assert torch.all(approximate.latents == 25)
    assert b.tier.counters.fetches >= 2
    # B now holds a local copy: the next hit is served without Redis.
    fetches = b.tier.counters.fetches
    assert b.lookup(near(v, 0.97, seed=5), key("red circle!")).start_step == 25
    assert b.tier.counters.fetches == fetches


def test_global_eviction_is_lcbfu_over_every_replicas_states_within_the_budget(replicas, redis_server):
    state_cost = len(serialize_state(torch.zeros(SHAPE, dtype=torch.float16))) + STATE_OVERHEAD
    budget = 14 * state_cost
    a, b = replicas("a", budget=budget), replicas("b", budget=budget)
    embeddings = [np.eye(DIM, dtype=np.float32)[i] for i in range(5)]  # orthogonal: no cross matches
    for i, v in enumerate(embeddings):  # 5 entries x 5 states: room for about half
        (a if i % 2 else b).admit(v, key(f"p{i}"), states())
    client = redis.Redis.from_url(redis_server.url)
    assert int(client.get("test:model:bytes")) <= budget
    # The same order as nirvana.cache.policy.lcbfu (floor + K * (uses + 1), the floor being the
    # score of the last state evicted), over both replicas' admissions, each making room for
    # itself first; the bytes charged are the states' and their entries' (shared.py's overheads).
    alive, held, inflation, total = {}, collections.defaultdict(set), 0.0, 0
    entry_cost = {}
    for i, v in enumerate(embeddings):
        digest = key(f"p{i}").digest()
        entry_cost[digest] = len(json.dumps(dataclasses.asdict(key(f"p{i}")), sort_keys=True)) + v.nbytes + \
            ENTRY_OVERHEAD
        incoming = entry_cost[digest] + 5 * state_cost
        while total + incoming > budget and alive:
            member = min(alive, key=lambda m: (alive[m], m))
            inflation = max(inflation, alive.pop(member))
            _, victim, step = member.split(":")
            held[victim].discard(step)
            total -= state_cost + (0 if held[victim] else entry_cost[victim])
        total += incoming
        for step in (5, 10, 15, 20, 25):
            alive[f":{digest}:{step}"] = lcbfu(StateStats(step, inserted=0, last_used=0, floor=inflation))[0]
            held[digest].add(str(step))
    assert {m.decode() for m in client.zrange("test:model:scores", 0, -1)} == set(alive)
    assert int(client.get("test:model:bytes")) == total
    # Replicas stop offering what Redis dropped: a new replica (no local copies) resumes each
    # entry from its largest surviving step.
    fresh = replicas("c")
    for i, v in enumerate(embeddings):
        surviving = [int(m.rsplit(":", 1)[1]) for m in alive if m.startswith(f":{key(f'p{i}').digest()}:")]
        assert fresh.lookup(v, key(f"other{i}")).start_step == max(surviving, default=0)
    # Replicas that admitted states still hold local copies (their own tiers evict independently).
    assert eventually(lambda: all(b.lookup(v, key("p0-again")).start_step == 25 for v in embeddings[:1]))


def test_a_flush_through_one_replica_reaches_the_others_per_tenant(replicas):
    a, b = replicas("a"), replicas("b")
    v = unit(1)
    a.admit(v, key("x", tenant="acme"), states(), final=torch.zeros(SHAPE))
    a.admit(v, key("x", tenant="globex"), states(), final=torch.zeros(SHAPE))
    assert eventually(lambda: b.lookup(v, key("x", tenant="acme")).status == "exact")
    assert eventually(lambda: b.lookup(v, key("x", tenant="globex")).status == "exact")
    with a.lock:
        a.cache.flush("acme")
    assert eventually(lambda: b.lookup(v, key("x", tenant="acme")).status == "miss")
    assert b.lookup(v, key("x", tenant="globex")).status == "exact"
    assert a.lookup(v, key("x", tenant="acme")).status == "miss"


def test_redis_down_means_local_service_then_catch_up_and_republish(replicas, redis_server):
    a, b = replicas("a"), replicas("b")
    v, w = unit(2), unit(3)
    a.admit(v, key("before"), states(), final=torch.zeros(SHAPE))
    assert eventually(lambda: b.lookup(v, key("before")).status == "exact")
    redis_server.kill()
    # Nothing raises; A serves what it holds locally, B what it copied; admissions stay local.
    assert a.lookup(v, key("before")).status == "exact"
    a.admit(w, key("during"), states(), final=torch.ones(SHAPE))
    assert a.lookup(w, key("during")).status == "exact"
    assert b.lookup(w, key("during")).status == "miss"
    assert not a.tier.available and a.tier.counters.errors >= 1
    redis_server.start()  # the same directory: the AOF brings "before" back
    assert eventually(lambda: a.sync.synced and b.sync.synced, timeout=10)
    # A re-admitted what it admitted during the outage; B sees it.
    assert eventually(lambda: b.lookup(w, key("during")).status == "exact", timeout=2)
    fresh = replicas("c")
    assert fresh.lookup(v, key("before")).status == "exact"


def test_a_restarted_replica_catches_up_from_redis(replicas):
    a = replicas("a")
    v = unit(4)
    a.admit(v, key("kept"), states(), final=torch.full(SHAPE, 3.0))
    a.close()
    again = replicas("a")  # same name, empty local tiers
    assert again.sync.synced
    hit = again.lookup(v, key("kept"))
    assert hit.status == "exact" and torch.equal(hit.latents, torch.full(SHAPE, 3.0))
    assert again.lookup(near(v, 0.92), key("kept-ish")).start_step == 20


def test_uses_on_local_copies_count_in_the_global_order(replicas, redis_server):
    a = replicas("a")
    v = unit(5)
    a.admit(v, key("used"), states((25,)))
    a.admit(unit(6), key("unused"), states((25,)))
    for i in range(3):
        assert a.lookup(near(v, 0.97, seed=i), key(f"q{i}")).start_step == 25  # local copy
    client = redis.Redis.from_url(redis_server.url)
    tenant = ""
    digest = key("used").digest()
    entry = f"test:model:t:{tenant.encode().hex()}:e:{digest}"
    assert eventually(lambda: int(client.hget(entry, "u:25") or 0) == 3)
    scores = dict(client.zrange("test:model:scores", 0, -1, withscores=True))
    used = scores[f":{digest}:25".encode()]
    unused = scores[f":{key('unused').digest()}:25".encode()]
    assert used == 25 * 4 and unused == 25  # LCBFU: floor 0 + K * (uses + 1)


def test_a_replica_away_while_the_stream_was_trimmed_catches_up_on_return(replicas, redis_server):
    a = replicas("a", maxlen=1)
    b = replicas("b", maxlen=1)
    b.sync.close()  # B stops following: the stream is trimmed past it while it is away
    for i in range(300):
        a.admit(unit(100 + i), key(f"t{i}"), states((25,)), final=torch.full(SHAPE, float(i)))
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen("test:model:events") < 300  # the events B missed are gone
    b.sync = SharedTierSync(b.cache, b.tier, b.lock, block_ms=50, retry_s=0.2, stats_interval_s=0.2)
    assert b.sync.start()
    for i in (0, 150, 299):
        hit = b.lookup(unit(100 + i), key(f"t{i}"))
        assert hit.status == "exact" and torch.equal(hit.latents, torch.full(SHAPE, float(i)))


def test_cross_replica_stats(replicas):
    a, b = replicas("a"), replicas("b")
    a.sync.stats = lambda: {"lookups": {"miss": 2}, "steps_saved": 10}
    b.sync.stats = lambda: {"lookups": {"exact": 1}, "steps_saved": 50}
    assert eventually(lambda: set(a.tier.replica_stats()) == {"a", "b"}, timeout=2)
    usage = a.tier.usage()
    assert usage["aof_enabled"] is True


def test_an_admission_racing_another_replicas_flush_ends_as_redis_has_it(replicas):
    a, b = replicas("a"), replicas("b")
    v = unit(7)
    with a.lock:  # A's sync thread cannot apply B's flush before A admits
        with b.lock:
            b.cache.flush("t1")
        a.cache.admit(v, key("y", tenant="t1"), states(), torch.full(SHAPE, 2.0))
    # The stream says: flush t1, then put y. Applied in that order, A keeps y (as Redis does).
    time.sleep(0.3)
    assert a.lookup(v, key("y", tenant="t1")).status == "exact"
    assert eventually(lambda: b.lookup(v, key("y", tenant="t1")).status == "exact")


def test_redis_out_of_memory_fails_admissions_softly_without_taking_the_tier_down(tmp_path):
    from nirvana.redisserver import RedisServer

    with RedisServer(tmp_path / "small", extra_args=["--maxmemory", "3mb"]) as server:
        a = Replica(server.url, "a")  # shared_bytes 1 GiB: far above what this Redis can hold
        try:
            for i in range(400):
                a.admit(unit(1000 + i), key(f"m{i}"), states(), torch.zeros(SHAPE))  # never raises
            assert a.tier.counters.errors > 0 and "OutOfMemory" in a.tier.last_error
            assert a.tier.available and a.tier.counters.resyncs == 1  # no resync storm
            assert a.lookup(unit(1399), key("m399")).status == "exact"  # served locally
        finally:
            a.close()
