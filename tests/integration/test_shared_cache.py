"""Two tritonservers sharing one latent cache through one real redis-server, all on loopback.

Every wait for the other replica is a single check after 1 s (never a poll that could let the
replica admit the prompt itself): 1 s is the bound the shared tier promises.
"""

import os
import signal
import threading
import time

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nirvana.redisserver import RedisServer
from nirvana.tritonserver import TritonServer
from nirvana_client import Txt2ImgClient, Txt2ImgError
from nirvana_client.admin import CacheAdminClient
from nirvana_export.repository import repository_variant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KEY = "test-admin-key-shared-0123456789"
STEPS = 10
PROPAGATION_S = 1.0


class Pair:
    """Replicas "a" and "b" of one deployment, and their Redis."""

    def __init__(self, repository, root):
        self.redis = RedisServer(root / "redis").start()
        self.variants = {name: repository_variant(repository, root / f"repo-{name}", {"latent_cache": {
            "redis_url": self.redis.url, "replica_id": name}}) for name in ("a", "b")}
        self.servers = {}
        for name in ("a", "b"):
            self.start(name)

    def start(self, name):
        self.servers[name] = TritonServer(self.variants[name], admin_key=KEY).start()
        return self.servers[name]

    def kill(self, name):
        """SIGKILL the replica's whole process group (server and Python-backend stubs)."""
        server = self.servers[name]
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(30)

    def client(self, name):
        return Txt2ImgClient(self.servers[name].grpc_url, "grpc", timeout_s=120)

    def admin(self, name):
        return CacheAdminClient(self.servers[name].grpc_url, "grpc", KEY)

    def heal(self):
        """Both replicas up and synced with a running Redis (what every test starts from)."""
        if not self.redis.ping():
            self.redis.start()
        for name, server in self.servers.items():
            if server.process.poll() is not None:
                self.start(name)
        deadline = time.monotonic() + 30
        while not all(self.admin(n).stats()["shared"].get("synced") for n in self.servers):
            assert time.monotonic() < deadline, "replicas did not resync with Redis"
            time.sleep(0.2)

    def close(self):
        for server in self.servers.values():
            server.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def pair(repository, tmp_path_factory):
    made = Pair(repository, tmp_path_factory.mktemp("shared"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def replicas(pair):
    pair.heal()
    return pair


def test_a_prompt_generated_on_one_replica_is_a_hit_on_the_other_within_a_second(replicas, served_start_step):
    with replicas.client("a") as a, replicas.client("b") as b:
        first = a.generate("a red circle on a black background", seed=21, steps=STEPS)
        assert first.cache_status == "miss" and first.admitted > 0
        time.sleep(PROPAGATION_S)
        exact = b.generate("a red circle on a black background", seed=21, steps=STEPS)
        assert exact.cache_status == "exact"
        assert (exact.image == first.image).all()  # the same fp32 final latents, through Redis
        similar = b.generate("a red circle on black background", seed=22, steps=STEPS)
        assert similar.cache_status == "approximate"
        assert similar.matched_prompt == "a red circle on a black background"
        assert similar.start_step == served_start_step(similar.similarity, STEPS) > 0


def test_a_flush_through_one_replica_reaches_the_other(replicas):
    with replicas.client("a") as a, replicas.client("b") as b:
        for tenant in ("acme", "globex"):
            a.generate("a blue square on a white background", seed=3, steps=STEPS, tenant=tenant)
        time.sleep(PROPAGATION_S)
        assert b.generate("a blue square on a white background", seed=3, steps=STEPS, tenant="acme").cache_status \
            == "exact"
        with replicas.admin("a") as admin:
            assert admin.flush("acme")["flushed_entries"] >= 1
        time.sleep(PROPAGATION_S)
        assert b.generate("a blue square on a white background", seed=3, steps=STEPS,
                          tenant="acme").cache_status == "miss"
        assert b.generate("a blue square on a white background", seed=3, steps=STEPS,
                          tenant="globex").cache_status == "exact"


def test_stats_through_either_replica_cover_both(replicas):
    with replicas.client("a") as a, replicas.client("b") as b:
        a.generate("a green triangle", seed=5, steps=STEPS, tenant="stats")
        b.generate("a green triangle", seed=6, steps=STEPS, tenant="stats")
    time.sleep(2.5)  # replicas publish their counters every 2 s
    with replicas.admin("b") as admin:
        shared = admin.stats()["shared"]
    assert set(shared["replicas"]) >= {"a", "b"}
    assert shared["up"] and shared["usage"]["aof_enabled"] and shared["usage"]["used_bytes"] > 0
    assert shared["totals"]["steps_run"] == sum(r["steps_run"] for r in shared["replicas"].values())


def shared_tier_metrics(server):
    """The latent_cache's nirvana_shared_tier_* samples on the server's metrics port, by name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("nirvana_shared_tier_") and "result" not in sample.labels}


class Load:
    """Closed-loop clients on some replicas: each request a miss, a hit or a rewording."""

    PROMPTS = ["a {} circle", "two {} squares on a striped background", "a small {} triangle in the top left",
               "a large outlined {} square"]
    COLOURS = ["red", "green", "blue", "yellow", "white"]

    def __init__(self, pair, names, tenant, per_replica=2):
        self.pair, self.names, self.tenant = pair, names, tenant
        self.results, self.failures = [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(name, i), daemon=True)
                        for name in names for i in range(per_replica)]

    def run(self, name, worker):
        with self.pair.client(name) as client:
            i = 0
            while not self.stop.is_set():
                prompt = self.PROMPTS[i % 4].format(self.COLOURS[(i // 4 + worker) % 5])
                try:
                    result = client.generate(prompt, seed=i % 3, steps=STEPS, tenant=self.tenant)
                    self.results.append((name, prompt, i % 3, result, time.monotonic()))
                except (Txt2ImgError, OSError) as exc:
                    self.failures.append((name, prompt, repr(exc), time.monotonic()))
                i += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(150)


def test_redis_killed_under_load_fails_no_request_and_its_entries_come_back(replicas):
    with replicas.client("a") as a:
        before = a.generate("a yellow circle on a striped background", seed=9, steps=STEPS, tenant="redis-kill")
    time.sleep(PROPAGATION_S)
    with Load(replicas, ("a", "b"), "redis-kill-load") as load:
        time.sleep(3)
        replicas.redis.kill()
        killed_at = time.monotonic()
        time.sleep(4)
        down = shared_tier_metrics(replicas.servers["a"])
        replicas.redis.start()  # the same directory: its AOF
        time.sleep(4)
    assert load.failures == []
    during = [r for r in load.results if r[4] > killed_at]
    assert len(during) >= 4  # both replicas kept answering while Redis was down
    replicas.heal()  # waits for both replicas to resync
    with replicas.client("b") as b:  # B never fetched it: this exact hit comes from the restarted Redis
        again = b.generate("a yellow circle on a striped background", seed=9, steps=STEPS, tenant="redis-kill")
    assert again.cache_status == "exact" and (again.image == before.image).all()
    with replicas.admin("a") as admin:
        shared = admin.stats()["shared"]
    assert shared["errors"] >= 1 and shared["reconnects"] >= 1
    assert down["nirvana_shared_tier_up"] == 0 and down["nirvana_shared_tier_errors_total"] >= 1
    with replicas.client("a") as a:
        a.generate("a yellow circle", seed=1, steps=STEPS, tenant="redis-kill")  # metrics update per request
    assert shared_tier_metrics(replicas.servers["a"])["nirvana_shared_tier_up"] == 1


def test_a_replica_killed_under_load_loses_nothing_it_acknowledged(replicas):
    with Load(replicas, ("a", "b"), "replica-kill") as load:
        time.sleep(4)
        replicas.kill("b")
        killed_at = time.monotonic()
        time.sleep(3)
    from_a = [r for r in load.results if r[0] == "a"]
    assert [f for f in load.failures if f[0] == "a"] == []
    assert any(r[4] > killed_at for r in from_a)  # A kept serving
    acknowledged = {(r[1], r[2]) for r in load.results if r[0] == "b" and r[3].admitted > 0}
    assert acknowledged
    time.sleep(PROPAGATION_S)
    with replicas.client("a") as a:
        for prompt, seed in sorted(acknowledged)[:4]:
            assert a.generate(prompt, seed=seed, steps=STEPS, tenant="replica-kill").cache_status == "exact"
    replicas.start("b")  # empty local tiers: it catches up from Redis before it is ready
    with replicas.client("b") as b:
        for prompt, seed in sorted(acknowledged)[-4:]:
            assert b.generate(prompt, seed=seed, steps=STEPS, tenant="replica-kill").cache_status == "exact"
