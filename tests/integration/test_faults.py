"""Faults and observability against a real tritonserver: kill -9 under load, metrics."""

import os
import signal
import threading

import pytest

from nirvana.tritonserver import TritonServer
from nirvana_client import Txt2ImgClient, Txt2ImgError
from nirvana_client.admin import CacheAdminClient
from nirvana_export.repository import repository_variant
from nirvana_perf import metrics_text
from tests.integration.processes import python_stubs

pytestmark = pytest.mark.integration


def test_kill_9_under_load_then_restart_keeps_every_snapshotted_entry(repository, tmp_path):
    snapshots = tmp_path / "snapshots"
    variant = repository_variant(repository, tmp_path / "repo", {
        "latent_cache": {"snapshot_path": str(snapshots), "snapshot_interval_s": "0"}})
    prompts = ["a lighthouse on a cliff, watercolor", "a plate of sushi on a black table",
               "an astronaut floating above the earth", "a medieval castle in heavy fog"]
    key = "fault-test-admin-key-0123"
    server = TritonServer(variant, admin_key=key).start()
    try:
        with Txt2ImgClient(server.grpc_url, "grpc", timeout_s=60) as client:
            admitted = [client.generate(p, seed=1, steps=10) for p in prompts]
        assert all(r.cache_status == "miss" and r.admitted > 0 for r in admitted)
        with CacheAdminClient(server.grpc_url, "grpc", key) as admin:
            before = admin.stats()
        assert before["entries"] == len(prompts) and before["states"] == sum(r.admitted for r in admitted)
        outcomes = []

        def in_flight(i):
            with Txt2ImgClient(server.grpc_url, "grpc", timeout_s=60) as c:
                try:
                    c.generate(f"an unfinished request {i}", seed=i, steps=200)
                    outcomes.append("finished")
                except Exception as exc:  # noqa: BLE001 - the error is what we check
                    outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        threading.Event().wait(1.5)  # requests are in the UNet loop now
        os.killpg(os.getpgid(server.process.pid), signal.SIGKILL)
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "an in-flight request hung"
        assert outcomes and all(o != "finished" for o in outcomes), outcomes
    finally:
        server.stop()
    with TritonServer(variant, admin_key=key) as restarted, Txt2ImgClient(restarted.grpc_url, "grpc") as client:
        with CacheAdminClient(restarted.grpc_url, "grpc", key) as admin:
            after = admin.stats()
        assert (after["entries"], after["states"]) == (before["entries"], before["states"])
        again = [client.generate(p, seed=1, steps=10) for p in prompts]
        assert [r.cache_status for r in again] == ["exact"] * len(prompts)
        assert all((a.image == b.image).all() for a, b in zip(admitted, again))
        assert "restored" in restarted.log_tail(400)


def test_cache_metrics_on_the_metrics_port(server):
    with Txt2ImgClient(server.grpc_url, "grpc") as client:
        client.generate("a tiny robot watering a plant", seed=4, steps=4)
        client.generate("a tiny robot watering a plant", seed=4, steps=4)
        with pytest.raises(Txt2ImgError):
            client.generate("", steps=4)
    samples = metrics_text.scrape(server.metrics_port)
    assert metrics_text.total(samples, "nirvana_cache_lookups_total", result="exact") >= 1
    assert metrics_text.total(samples, "nirvana_unet_steps_total", kind="saved") >= 4
    host = metrics_text.total(samples, "nirvana_cache_bytes", tier="host")
    budget = metrics_text.total(samples, "nirvana_cache_budget_bytes", tier="host")
    assert 0 < host <= budget


def test_a_killed_stub_fails_its_request_and_the_watchdog_reloads_the_model(repository):
    # unet_loop answers from its step engine after execute returned. When its stub process dies,
    # Triton 2.51 neither answers the requests that stub held nor fails them (the response sender
    # died with the process): the client's own timeout ends them. Clients must set one (ours do).
    with TritonServer(repository, watchdog_interval_s=2) as server:
        with Txt2ImgClient(server.grpc_url, "grpc", timeout_s=60) as client:
            assert client.generate("a pear on a plate", seed=1, steps=2).image.shape == (64, 64, 3)
            outcomes = []

            def in_flight(n):
                try:
                    with Txt2ImgClient(server.grpc_url, "grpc", timeout_s=15) as short:
                        short.generate(f"a long request {n} that will lose its stub", seed=2, steps=200)
                    outcomes.append("finished")
                except Txt2ImgError as exc:
                    outcomes.append(str(exc))

            # Four 200-step requests share the step engine's ticks (8 guided rows a tick), so they
            # are still running when the stub dies, however fast the UNet.
            threads = [threading.Thread(target=in_flight, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            threading.Event().wait(1.0)
            stubs = python_stubs(server, "unet_loop")
            assert stubs
            for stub in stubs:
                stub.kill()  # SIGKILL; psutil checks the pid still is that stub
            for thread in threads:
                thread.join(timeout=60)
            assert not any(t.is_alive() for t in threads) and len(outcomes) == 4
            assert all(o != "finished" for o in outcomes), outcomes
            assert all("is not healthy" in o or "Deadline Exceeded" in o for o in outcomes), outcomes
            for _ in range(60):  # the watchdog probes every 2 s and reloads unet_loop
                if server.watchdog.reloads:
                    break
                threading.Event().wait(1)
            assert server.watchdog.reloads == ["unet_loop"]
            fresh = python_stubs(server, "unet_loop")  # the reload started a new stub in this server's tree
            assert fresh and not {p.pid for p in fresh} & {p.pid for p in stubs}
            assert client.generate("a pear on a plate", seed=1, steps=2).cache_status == "exact"
