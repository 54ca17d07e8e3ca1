"""Tenants and snapshots against a real tritonserver (gRPC)."""

import pytest

from nirvana.tritonserver import TritonServer
from nirvana_client import Txt2ImgClient, Txt2ImgError
from nirvana_export.repository import repository_variant

pytestmark = pytest.mark.integration


def test_tenants_never_share_cache_entries(server):
    with Txt2ImgClient(server.grpc_url, "grpc") as client:
        prompt = "a snowy mountain cabin with warm lights"
        assert client.generate(prompt, seed=5, steps=10, tenant="alice").cache_status == "miss"
        assert client.generate(prompt, seed=5, steps=10, tenant="bob").cache_status == "miss"
        assert client.generate(prompt, seed=5, steps=10).cache_status == "miss"
        assert client.generate(prompt, seed=5, steps=10, tenant="alice").cache_status == "exact"
        with pytest.raises(Txt2ImgError, match="TENANT"):
            client.generate(prompt, tenant="../etc")


def test_cache_survives_a_restart_through_its_snapshot(repository, tmp_path, served_start_step):
    snapshots = tmp_path / "snapshots"
    variant = repository_variant(repository, tmp_path / "repo", {
        "latent_cache": {"snapshot_path": str(snapshots), "snapshot_interval_s": "0"}})
    prompts = ["a paper boat on a puddle", "a neon sign in the rain at night"]
    with TritonServer(variant) as server, Txt2ImgClient(server.grpc_url, "grpc") as client:
        before = [client.generate(p, seed=1, steps=10) for p in prompts]
        assert all(r.cache_status == "miss" for r in before)
    assert (snapshots / "CURRENT").exists()  # written at shutdown (finalize)
    with TritonServer(variant) as server, Txt2ImgClient(server.grpc_url, "grpc") as client:
        after = [client.generate(p, seed=1, steps=10) for p in prompts]
        assert [r.cache_status for r in after] == ["exact", "exact"]
        for a, b in zip(before, after):
            assert (a.image == b.image).all()
        assert client.generate(prompts[0], seed=2, steps=10).start_step == served_start_step(1.0, 10) > 0


def test_cache_can_be_bypassed_per_request(server):
    with Txt2ImgClient(server.grpc_url, "grpc") as client:
        prompt = "a field of sunflowers under a thunderstorm"
        off = client.generate(prompt, seed=8, steps=10, cache=False)
        assert (off.cache_status, off.start_step, off.admitted) == ("disabled", 0, 0)
        assert client.generate(prompt, seed=8, steps=10, cache=False).cache_status == "disabled"
        on = client.generate(prompt, seed=8, steps=10)
        assert on.cache_status == "miss"  # nothing was admitted while bypassed
        assert (on.image == off.image).all()


def test_a_client_asking_for_image_alone_still_fills_the_cache(server):
    import numpy as np
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    prompt = np.array([["a red lantern floating on a dark lake".encode()]], dtype=object)
    inputs = [http.InferInput("PROMPT", [1, 1], "BYTES"), http.InferInput("SEED", [1, 1], "INT64"),
              http.InferInput("STEPS", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(prompt)
    inputs[1].set_data_from_numpy(np.array([[3]], np.int64))
    inputs[2].set_data_from_numpy(np.array([[10]], np.int32))
    first = client.infer("txt2img", inputs, outputs=[http.InferRequestedOutput("IMAGE")])
    assert first.as_numpy("IMAGE").shape == (1, 64, 64, 3)
    second = client.infer("txt2img", inputs, outputs=[http.InferRequestedOutput("IMAGE"),
                                                      http.InferRequestedOutput("CACHE_STATUS")])
    assert second.as_numpy("CACHE_STATUS").reshape(-1)[0] == b"exact"
    client.close()
