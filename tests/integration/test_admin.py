"""The restricted cache admin surface and per-tenant isolation, against a real tritonserver."""

import json
import re
import threading
import urllib.request

import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http

from nirvana import admin
from nirvana.tritonserver import TritonServer
from nirvana_client import Txt2ImgClient, Txt2ImgError
from nirvana_client.admin import CacheAdminClient
from nirvana_client.admin import main as admin_cli

from nirvana_export.repository import repository_variant
from tests.integration.processes import python_stubs

pytestmark = pytest.mark.integration

KEY = "test-admin-key-0123456789"
PROMPT = "a lighthouse on a cliff at dawn"


@pytest.fixture(scope="module")
def admin_server(repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("admin")
    variant = repository_variant(repository, root / "repo", {
        "latent_cache": {"snapshot_path": str(root / "snapshots"), "snapshot_interval_s": "0"}})
    with TritonServer(variant, admin_key=KEY, watchdog_interval_s=2) as server:
        server.snapshots = root / "snapshots"
        yield server


def url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("key", ["", "wrong-key-but-long-enough"])
def test_admin_commands_without_the_key_are_refused(admin_server, protocol, key):
    with CacheAdminClient(url(admin_server, protocol), protocol, key) as client:
        for command, tenant in (("stats", None), ("stats", "alice"), ("flush", None), ("snapshot", None)):
            with pytest.raises(Txt2ImgError, match=f"restricted, expecting header '{admin.ADMIN_HEADER}'"):
                client.run(command, tenant)
    with Txt2ImgClient(url(admin_server, protocol), protocol) as client:  # ordinary clients still served
        assert client.generate("a small admin probe", seed=1, steps=2).image.shape == (64, 64, 3)


def test_triton_restricts_its_own_admin_apis_to_the_key(admin_server):
    h = http.InferenceServerClient(admin_server.http_url)
    g = grpc.InferenceServerClient(admin_server.grpc_url)
    with pytest.raises(http.InferenceServerException, match="restricted"):
        h.unload_model("latent_cache")
    with pytest.raises(grpc.InferenceServerException, match="restricted"):
        g.unload_model("latent_cache")
    with pytest.raises(http.InferenceServerException, match="restricted"):
        h.update_log_settings({"log_verbose_level": 1})
    assert h.is_model_ready("latent_cache")
    index = h.get_model_repository_index(headers=admin.headers(KEY, "http"))
    assert {m["name"] for m in index} >= {"txt2img", "cache_admin", "latent_cache"}
    assert g.get_model_repository_index(headers=admin.headers(KEY, "grpc")).models


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_per_tenant_stats_and_flush(admin_server, protocol):
    prompt, alice, bob = PROMPT, f"alice-{protocol}", f"bob-{protocol}"
    with Txt2ImgClient(url(admin_server, protocol), protocol) as gen, \
            CacheAdminClient(url(admin_server, protocol), protocol, KEY) as client:
        first = [gen.generate(prompt, seed=3, steps=10, tenant=tenant) for tenant in (alice, bob)]
        assert [r.cache_status for r in first] == ["miss", "miss"]
        assert gen.generate(prompt, seed=3, steps=10, tenant=alice).cache_status == "exact"
        stats = client.stats(alice)
        assert (stats["tenant"], stats["entries"], stats["exact_hits"]) == (alice, 1, 1)
        assert stats["states"] == first[0].admitted and stats["tiers"]["host"]["used_bytes"] > 0
        whole = client.stats()
        assert {alice, bob} <= set(whole["tenants"]) and whole["entries"] >= 2
        assert whole["tiers"]["host"]["used_bytes"] <= whole["tiers"]["host"]["budget_bytes"]

        flushed = client.flush(alice)
        assert flushed["flushed_entries"] == 1 and flushed["tenant"] == alice
        assert client.stats(alice)["entries"] == 0
        assert client.stats(bob)["entries"] == 1
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_server.metrics_port}/metrics").read().decode()
        flushed = re.search(r"^nirvana_cache_flushed_states_total\{[^}]*\} (\S+)$", metrics, re.M)
        assert flushed and float(flushed.group(1)) >= first[0].admitted
        assert gen.generate(prompt, seed=3, steps=10, tenant=bob).cache_status == "exact"
        assert gen.generate(prompt, seed=3, steps=10, tenant=alice).cache_status == "miss"
        with pytest.raises(Txt2ImgError, match="COMMAND: 'purge' is not one of"):
            client.run("purge")
        with pytest.raises(Txt2ImgError, match="TENANT"):
            client.stats("../alice")


def test_flush_is_persisted_and_the_watchdog_reloads_latent_cache_with_the_key(admin_server):
    with Txt2ImgClient(admin_server.grpc_url, "grpc") as gen, \
            CacheAdminClient(admin_server.grpc_url, "grpc", KEY) as client:
        gen.generate("a copper kettle on a stove", seed=4, steps=10, tenant="carol")
        gen.generate("a copper kettle on a stove", seed=4, steps=10, tenant="dave")
        client.flush("carol")
        snap = client.snapshot()
        current = (admin_server.snapshots / "CURRENT").read_text().split()[0]
        assert snap["snapshot"].endswith(current) and snap["entries"] == client.stats()["entries"]
        before = client.stats()
        # Kill latent_cache's stub: the watchdog must reload it through the restricted
        # repository API, and the reloaded model restores the snapshot without the flushed tenant.
        for stub in python_stubs(admin_server, "latent_cache"):
            stub.kill()
        for _ in range(90):
            if admin_server.watchdog.reloads:
                break
            threading.Event().wait(1)
        assert admin_server.watchdog.reloads == ["latent_cache"]
        after = client.stats()
        assert after["entries"] == before["entries"] and after["states"] == before["states"]
        assert "carol" not in after["tenants"] and after["tenants"]["dave"]["entries"] == 1
        assert gen.generate("a copper kettle on a stove", seed=4, steps=10, tenant="dave").cache_status == "exact"
        assert gen.generate("a copper kettle on a stove", seed=4, steps=10, tenant="carol").cache_status == "miss"


def test_admin_cli(admin_server, tmp_path, capsys):
    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    assert admin_cli(["stats", "--url", admin_server.http_url, "--protocol", "http", "--key-file", str(key_file)]) == 0
    assert "tenants" in json.loads(capsys.readouterr().out)
    assert admin_cli(["stats", "--url", admin_server.grpc_url]) == 2  # no key
    assert "restricted" in capsys.readouterr().err


def test_a_server_without_a_key_has_the_admin_surface_off(server):
    with CacheAdminClient(server.grpc_url, "grpc", KEY) as client:
        with pytest.raises(Txt2ImgError, match="admin surface is off"):
            client.stats()
