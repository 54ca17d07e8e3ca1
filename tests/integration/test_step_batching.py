"""Step-level batching in unet_loop, against a real tritonserver.

The acceptance of "requests join the running batch at the next UNet call": ordering, exact hits
under load, overload, deadlines, solo == concurrent outputs, coalescing, and the three ways in
(HTTP, unary gRPC, perf_analyzer without streaming).
"""

import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nirvana.tritonserver import TritonServer
from nirvana_client import Txt2ImgClient, Txt2ImgError
from nirvana_export.repository import repository_variant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def scrape(server) -> dict:
    """{(metric name, sorted labels): value} from the server's metrics port."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(values: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def settled(server, before: dict, name: str, at_least: float, **labels) -> dict:
    """A scrape taken once ``name`` grew by ``at_least`` since ``before`` and the batch is empty
    (the engine publishes after ticks, at most every 0.25 s, and when it goes idle)."""
    deadline = time.monotonic() + 10
    while True:
        after = scrape(server)
        grown = metric(after, name, **labels) - metric(before, name, **labels) >= at_least
        if (grown and metric(after, "nirvana_unet_rows", state="active") == 0) or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def run_concurrently(calls):
    """Run callables in threads; returns their results (or exceptions) and finish times."""
    out = [None] * len(calls)
    finished = [None] * len(calls)

    def worker(i, call):
        try:
            out[i] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[i] = exc
        finished[i] = time.monotonic()

    threads = []
    for i, (delay, call) in enumerate(calls):
        if delay:
            time.sleep(delay)
        thread = threading.Thread(target=worker, args=(i, call))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(240)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out, finished


def generate(server, protocol="grpc", **kwargs):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with Txt2ImgClient(url, protocol, timeout_s=240) as client:
        return client.generate(**kwargs)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_short_request_sent_after_a_long_one_returns_first(server, protocol):
    long_kwargs = dict(prompt=f"a long generation over {protocol}", seed=1, steps=200, cache=False)
    short_kwargs = dict(prompt=f"a short generation over {protocol}", seed=2, steps=10, cache=False)
    (long_result, short_result), finished = run_concurrently([
        (0, lambda: generate(server, protocol, **long_kwargs)),
        (0.1, lambda: generate(server, protocol, **short_kwargs))])
    assert not isinstance(long_result, Exception) and not isinstance(short_result, Exception)
    assert finished[1] < finished[0], "the 10-step request waited for the 200-step one"
    assert short_result.latency_s < long_result.latency_s


def test_an_exact_hit_under_load_takes_under_a_tenth_of_a_miss(server):
    first = generate(server, prompt="a bright red tram in the snow at night", seed=5, steps=100)
    assert first.cache_status == "miss"
    load = [(0, lambda i=i: generate(server, prompt=f"busy miss number {i}, oil on canvas", seed=i, steps=100))
            for i in range(4)]
    probe = [(1.0, lambda: generate(server, prompt="a bright red tram in the snow at night", seed=5, steps=100))]
    results, _ = run_concurrently(load + probe)
    misses, hit = results[:4], results[4]
    assert not any(isinstance(r, Exception) for r in results), results
    assert hit.cache_status == "exact"
    np.testing.assert_array_equal(hit.image, first.image)
    miss_latency = float(np.median([m.latency_s for m in misses]))
    assert hit.latency_s < 0.1 * miss_latency, (hit.latency_s, miss_latency)


def test_concurrent_outputs_equal_solo_outputs(server):
    requests = [dict(prompt=f"solo versus batch {i}", seed=40 + i, steps=[30, 12, 20][i], cache=False)
                for i in range(3)]
    solo = [generate(server, **r).image for r in requests]
    results, _ = run_concurrently([(0.15 * i, lambda r=r: generate(server, **r)) for i, r in enumerate(requests)])
    for alone, together in zip(solo, results):
        assert not isinstance(together, Exception)
        # Rows join at different ticks, so the UNet batch differs from the solo run; onnxruntime's
        # CPU kernels agree to ~1e-6 across batch sizes, at most one uint8 level after decoding.
        assert np.abs(alone.astype(int) - together.image.astype(int)).max() <= 1


def test_two_identical_requests_in_flight_run_the_unet_once(server):
    # 200 steps: the first is still running when the second arrives 0.2 s later, however fast the UNet.
    request = dict(prompt="two identical requests at once", seed=77, steps=200, cache=False)
    before = scrape(server)
    (a, b), _ = run_concurrently([(0, lambda: generate(server, **request)), (0.2, lambda: generate(server, **request))])
    after = settled(server, before, "nirvana_unet_tick_rows_total", 200)
    assert not isinstance(a, Exception) and not isinstance(b, Exception)
    assert [a.coalesced, b.coalesced] == [False, True]
    np.testing.assert_array_equal(a.image, b.image)
    rows = metric(after, "nirvana_unet_tick_rows_total") - metric(before, "nirvana_unet_tick_rows_total")
    assert rows == 200  # one row for 200 steps, not two
    assert metric(after, "nirvana_unet_coalesced_rows_total") - metric(before, "nirvana_unet_coalesced_rows_total") == 1


def test_an_expired_deadline_is_an_error_and_its_rows_leave_the_batch(server):
    before = scrape(server)
    started = time.monotonic()
    with pytest.raises(Txt2ImgError, match="TIMEOUT_MS"):
        generate(server, prompt="a request that runs out of time", seed=3, steps=200, cache=False, timeout_ms=400)
    assert time.monotonic() - started < 20
    after = settled(server, before, "nirvana_unet_requests_total", 1, outcome="expired")
    assert metric(after, "nirvana_unet_rows", state="active") == 0
    expired = metric(after, "nirvana_unet_requests_total", outcome="expired") - \
        metric(before, "nirvana_unet_requests_total", outcome="expired")
    assert expired == 1
    ticks = metric(after, "nirvana_unet_tick_rows_total") - metric(before, "nirvana_unet_tick_rows_total")
    assert ticks < 200  # it left long before its 200 steps
    assert generate(server, prompt="served after the timeout", seed=4, steps=2).image.shape == (64, 64, 3)


def test_bad_timeout_is_rejected_naming_the_field(server):
    with pytest.raises(Txt2ImgError, match="TIMEOUT_MS: 0 is out of range"):
        generate(server, prompt="a cat", steps=2, timeout_ms=0)


@pytest.fixture(scope="module")
def small_server(repository, tmp_path_factory):
    """A server whose UNet loop holds 1 active row and 1 pending row."""
    variant = repository_variant(repository, tmp_path_factory.mktemp("small") / "repo",
                                 {"unet_loop": {"max_active_rows": "1", "max_pending_rows": "1"}})
    with TritonServer(variant) as running:
        yield running


def test_overload_is_answered_unavailable_not_a_hang(small_server):
    calls = [(0.05 * i, lambda i=i: generate(small_server, "http" if i % 2 else "grpc",
                                             prompt=f"overload {i}", seed=i, steps=60, cache=False))
             for i in range(4)]
    results, _ = run_concurrently(calls)
    refused = [r for r in results if isinstance(r, Txt2ImgError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and served, results
    assert all("at capacity" in str(r) and "max_pending_rows=1" in str(r) for r in refused)
    values = settled(small_server, {}, "nirvana_unet_requests_total", len(refused), outcome="rejected")
    assert metric(values, "nirvana_unet_requests_total", outcome="rejected") == len(refused)
    assert generate(small_server, prompt="after the overload", seed=1, steps=2).image.shape == (64, 64, 3)


def perf_analyzer_env(tmp_path: Path) -> dict:
    """perf_analyzer links libb64 and libcudart.so.12: point it at the copies nvidia-pytriton bundles."""
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    links = tmp_path / "palibs"
    links.mkdir()
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(libs.glob(pattern))
        if not found:
            pytest.skip(f"{pattern} is not bundled with nvidia-pytriton here")
        (links / name).symlink_to(found[0])
    return dict(os.environ, LD_LIBRARY_PATH=f"{links}:{os.environ.get('LD_LIBRARY_PATH', '')}")


def test_perf_analyzer_without_streaming(server, tmp_path):
    data = {"data": [{"PROMPT": {"content": [f"perf analyzer prompt {i}"], "shape": [1]},
                      "STEPS": {"content": [8], "shape": [1]}} for i in range(8)]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    binary = Path(sys.executable).parent / "perf_analyzer"
    proc = subprocess.run([str(binary), "-m", "txt2img", "-u", server.grpc_url, "-i", "grpc",
                           "--input-data", str(tmp_path / "data.json"), "--concurrency-range", "4:4",
                           "--measurement-mode", "count_windows", "--measurement-request-count", "12",
                           "--max-trials", "3", "--stability-percentage", "1000"],
                          env=perf_analyzer_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Concurrency: 4, throughput:" in proc.stdout
