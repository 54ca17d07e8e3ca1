"""The latent cache's own cost as it grows, measured inside a real tritonserver under load.

For each size N, a fresh server starts on a copy of the repository whose latent_cache has
``synthetic_entries=N`` (benchmark only: N random clustered embeddings with 2-byte states, in
the namespace the load's requests search, never served; see ``LatentCache.fill_synthetic``).
A closed loop of requests with prompts from a log (cache on) then puts it under load,
and Triton's statistics give latent_cache's compute time per txt2img request (it runs twice
per request: lookup and admission) and its fraction of a miss's latency. Also reported: how
long the fill took (from the cache's own stats, through ``cache_admin``), how the index
searches at that size (exact, or IVF with its recall-checked nprobe), the time spent in
lookups alone (the ``nirvana_cache_lookup_seconds_total`` metric) and the latent_cache
process's resident memory.

Example:
    python -m nirvana_perf.cache_cost --sizes 1000,10000,100000 --steps 10 --requests 36
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from nirvana.tritonserver import TritonServer
from nirvana_export.repository import repository_variant
from nirvana_perf import metrics_text
from nirvana_perf.simulate import load_log

DEFAULT_LOG = Path("perf/data/diffusiondb_sample.jsonl")
BYTES_PER_ENTRY = 8 << 10  # measured ~7.1-7.6 KB per synthetic entry (vectors x3, Python objects); for the RAM check
MODELS = ("tokenizer", "text_encoder", "latent_cache", "unet_loop", "vae_decoder", "txt2img")
WARMUP = 4  # requests (cache bypassed) before the measured replay, so onnxruntime sessions are warm


def _stub_rss(server: TritonServer, model: str) -> Optional[int]:
    """Resident bytes of the Python-backend stub serving ``model`` (a descendant of this server)."""
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            argv = process.cmdline()
            if argv and argv[0].endswith("triton_python_backend_stub") and any(f"/{model}/" in a for a in argv):
                return process.memory_info().rss
        except psutil.Error:  # exited since it was listed
            continue
    return None


def _lookup_seconds(metrics_port: int) -> float:
    return metrics_text.total(metrics_text.scrape(metrics_port), "nirvana_cache_lookup_seconds_total")


def model_statistics(url: str) -> Dict[str, Dict[str, float]]:
    """Triton's cumulative statistics per pipeline model: successful requests, compute and queue seconds."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    stats = {}
    try:
        for model in MODELS:
            s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
            inf = s.get("inference_stats", {})
            stats[model] = {"requests": int(inf.get("success", {}).get("count", 0)),
                            "compute_s": int(inf.get("compute_infer", {}).get("ns", 0)) / 1e9,
                            "queue_s": int(inf.get("queue", {}).get("ns", 0)) / 1e9}
    finally:
        client.close()
    return stats


def _available_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


async def closed_loop(url: str, rows: Sequence[dict], steps: int, concurrency: int, cache: bool = True,
                      first_seed: int = 0) -> List[Dict[str, object]]:
    """Send ``rows``' prompts through txt2img with ``concurrency`` requests in flight (gRPC, asyncio).

    Returns one {"status", "latency_s", "error"} per request (status: the CACHE_STATUS, or "error").
    """
    import numpy as np
    import tritonclient.grpc.aio as grpc

    from nirvana_client.client import infer_inputs

    client = grpc.InferenceServerClient(url)
    queue: asyncio.Queue = asyncio.Queue()
    for i, row in enumerate(rows):
        queue.put_nowait((first_seed + i, str(row["prompt"])))
    out: List[Dict[str, object]] = []

    async def worker():
        while not queue.empty():
            seed, prompt = queue.get_nowait()
            inputs = infer_inputs(grpc, {"PROMPT": np.array([[prompt.encode()]], dtype=object),
                                         "SEED": np.array([[seed]], np.int64), "STEPS": np.array([[steps]], np.int32),
                                         "CACHE": np.array([[cache]], dtype=bool)})
            sent = time.perf_counter()
            try:
                # Ask for IMAGE too: Triton skips ensemble steps (admission) whose outputs nobody requested.
                result = await client.infer("txt2img", inputs, outputs=[
                    grpc.InferRequestedOutput(n) for n in ("IMAGE", "CACHE_STATUS", "ADMITTED")])
                status = result.as_numpy("CACHE_STATUS").reshape(-1)[0].decode()
                out.append({"status": status, "latency_s": time.perf_counter() - sent, "error": ""})
            except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                out.append({"status": "error", "latency_s": time.perf_counter() - sent, "error": str(exc)[:300]})

    try:
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    finally:
        await client.close()
    for sample in out:
        sample["wall_s"] = wall
    return out


def _summary(samples: List[Dict[str, object]]) -> Dict[str, object]:
    import numpy as np

    ok = [s for s in samples if s["status"] != "error"]
    by_status = {}
    for status in sorted({s["status"] for s in ok}):
        lat = [s["latency_s"] for s in ok if s["status"] == status]
        by_status[status] = {"n": len(lat), "p50": float(np.percentile(lat, 50))}
    wall = samples[0]["wall_s"] if samples else 0.0
    return {"requests": len(samples), "errors": len(samples) - len(ok),
            "error_messages": sorted({s["error"] for s in samples if s["error"]})[:5],
            "status_counts": {k: v["n"] for k, v in by_status.items()}, "latency_by_status_s": by_status,
            "latency_p50_s": float(np.percentile([s["latency_s"] for s in ok], 50)) if ok else None,
            "throughput_rps": len(ok) / wall if wall else 0.0}


class MemoryGuard:
    """Kills ``server`` (its process group) when the machine's available memory falls below
    ``min_available_bytes``, so a big fill cannot push other work into the OOM killer."""

    def __init__(self, server: TritonServer, min_available_bytes: int, interval_s: float = 0.5):
        import threading

        self.server, self.floor, self.interval_s = server, min_available_bytes, interval_s
        self.tripped = ""
        self.lowest: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import os
        import signal

        while not self._stop.wait(self.interval_s):
            available = _available_bytes()
            if available is None or self.server.process is None:
                continue
            self.lowest = available if self.lowest is None else min(self.lowest, available)
            if available < self.floor and self.server.process.poll() is None:
                self.tripped = (f"aborted: available memory fell to {available / 2**30:.1f} GiB "
                                f"(floor {self.floor / 2**30:.1f} GiB)")
                try:
                    os.killpg(self.server.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def measure(repository: Path, size: int, log: Path, steps: int, requests: int, concurrency: int,
            output: Path, start_timeout_s: float, min_available_bytes: int = 3 << 30) -> Dict[str, object]:
    """One size: start a filled server, warm it up, replay under load, read the statistics."""
    from nirvana_client.admin import CacheAdminClient

    key = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="nirvana-cache-cost-") as tmp:
        variant = repository_variant(repository, Path(tmp) / "repo", {"latent_cache": {
            "synthetic_entries": str(size), "synthetic_steps": str(steps)}})
        server = TritonServer(variant, admin_key=key, log_file=output / f"server_{size}.log")
        guard = MemoryGuard(server, min_available_bytes)
        began = time.perf_counter()
        try:
            try:
                server.start(timeout=start_timeout_s)
            except RuntimeError as exc:
                if guard.tripped:
                    raise RuntimeError(guard.tripped) from exc
                raise
            ready_s = time.perf_counter() - began
            with CacheAdminClient(server.grpc_url, "grpc", key) as admin:
                loaded = admin.stats()
            rss_loaded = _stub_rss(server, "latent_cache")
            rows = load_log(log, requests + WARMUP)
            # Warm-up (cache bypassed, so nothing is admitted): onnxruntime's first runs are slow.
            asyncio.run(closed_loop(server.grpc_url, rows[requests:], steps, 2, cache=False, first_seed=10**6))
            before, lookups_before = model_statistics(server.grpc_url), _lookup_seconds(server.metrics_port)
            load = _summary(asyncio.run(closed_loop(server.grpc_url, rows[:requests], steps, concurrency)))
            after, lookups_after = model_statistics(server.grpc_url), _lookup_seconds(server.metrics_port)
            with CacheAdminClient(server.grpc_url, "grpc", key) as admin:
                final = admin.stats()
            rss_after = _stub_rss(server, "latent_cache")
        finally:
            guard.stop()
            server.__exit__(None, None, None)  # stop it and remove its work folder
    delta = {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}
    served = max(1, delta["txt2img"]["requests"])
    calls = max(1, delta["latent_cache"]["requests"])
    miss = load["latency_by_status_s"].get("miss", {}).get("p50") or load["latency_p50_s"]
    cache_s = delta["latent_cache"]["compute_s"] / served
    lookup_calls = max(1, sum(load["status_counts"].values()))
    index = loaded.get("index", {})
    return {
        "size": size, "entries_loaded": loaded.get("entries"), "fill": loaded.get("synthetic_fill", {}),
        "server_ready_s": ready_s, "index": index,
        "search": (loaded.get("synthetic_fill") or {}).get("search"),
        "requests": served, "errors": load["errors"], "error_messages": load["error_messages"],
        "status_counts": load["status_counts"],
        "latent_cache_calls": delta["latent_cache"]["requests"],
        "latent_cache_compute_per_request_s": cache_s,
        "latent_cache_compute_per_call_s": delta["latent_cache"]["compute_s"] / calls,
        "latent_cache_queue_per_request_s": delta["latent_cache"]["queue_s"] / served,
        "lookup_s_per_lookup": (lookups_after - lookups_before) / lookup_calls,
        "miss_p50_s": miss, "fraction_of_miss": cache_s / miss if miss else None,
        "lowest_available_bytes": guard.lowest, "latency_p50_s": load["latency_p50_s"],
        "throughput_rps": load["throughput_rps"],
        "per_model_compute_per_request_s": {m: delta[m]["compute_s"] / served for m in delta if m != "txt2img"},
        "latent_cache_rss_loaded_bytes": rss_loaded, "latent_cache_rss_after_bytes": rss_after,
        "entries_after": final.get("entries"),
    }


def run(repository: Path, sizes: Sequence[int] = (1_000, 10_000, 100_000), log: Path = DEFAULT_LOG, *,
        steps: int = 10, requests: int = 36, concurrency: int = 4, output: Path = Path("perf/results/cache_cost"),
        start_timeout_s: Optional[float] = None, min_available_bytes: int = 3 << 30) -> Dict[str, object]:
    """Measure the cache's cost at each size in ``sizes`` (a fresh server per size).

    Args:
        repository: An exported model repository (copied; its configs are left alone).
        log: Prompt log (JSON Lines) the load replays; its first ``requests`` + 4 rows are used.
        steps: STEPS of every request (small keeps a run short; the synthetic entries go into the
            namespace of this step count, so every lookup searches them).
        concurrency: Requests in flight (closed loop).
        start_timeout_s: Server start limit (default 300 s + 0.5 ms per synthetic entry).
        min_available_bytes: A size whose server lets the machine's available memory fall below
            this is aborted (reported as such), so a big fill cannot get other work OOM-killed.

    Returns:
        {"sizes": [per-size results, or {"size", "skipped": reason}], settings...}
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {"log": str(log), "steps": steps, "requests": requests, "concurrency": concurrency,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sizes": []}
    for size in sizes:
        available = _available_bytes()
        needed = size * BYTES_PER_ENTRY * 3 // 2  # the fill's transient copies on top of what stays
        if available is not None and needed > available - (2 << 30):
            report["sizes"].append({"size": size, "skipped": f"needs ~{needed / 2**30:.1f} GiB for the fill, "
                                                             f"{available / 2**30:.1f} GiB available"})
            print(f"cache_cost: {size} entries skipped: {report['sizes'][-1]['skipped']}", flush=True)
            continue
        print(f"cache_cost: {size} synthetic entries ...", flush=True)
        timeout = start_timeout_s or 300 + 0.0005 * size
        try:
            result = measure(Path(repository), size, Path(log), steps, requests, concurrency, output, timeout,
                             min_available_bytes)
        except Exception as exc:  # noqa: BLE001 - one size failing (time, memory) must not lose the others
            result = {"size": size, "skipped": f"failed: {type(exc).__name__}: {str(exc)[:500]}"}
        report["sizes"].append(result)
        (output / "cache_cost.json").write_text(json.dumps(report, indent=1))
    return report


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def markdown(report: Dict[str, object]) -> str:
    """The report as a Markdown table, with the memory per entry between the smallest and largest size."""
    lines = [f"latent_cache cost by cache size ({report['requests']} requests of `{report['log']}` per size, "
             f"{report['steps']} steps, closed loop at concurrency {report['concurrency']}; synthetic entries "
             "in the requests' namespace; compute from Triton's statistics, latent_cache runs twice per request)",
             "", "| entries | fill s (index s) | search | latent_cache ms/request | ms/call | lookup ms | "
                 "miss p50 s | fraction of a miss | latent_cache RSS MB | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    done = [r for r in report["sizes"] if "skipped" not in r]
    for r in report["sizes"]:
        if "skipped" in r:
            lines.append(f"| {r['size']:,} | skipped: {r['skipped']} |||||||||")
            continue
        fill, search = r.get("fill") or {}, r.get("search") or {}
        kind = search.get("search", "flat")
        if kind == "ivf":
            kind = f"IVF{search['nlist']} nprobe {search['nprobe']} (recall@1 {search['recall_at_1']:.3f}, " \
                   f"trained in {search['train_s']:.1f}s)"
        rss = r.get("latent_cache_rss_loaded_bytes")
        frac = r.get("fraction_of_miss")
        lines.append(
            f"| {r['size']:,} | {fill.get('seconds', 0):.1f} ({fill.get('index_seconds', 0):.1f}) | {kind} | "
            f"{_ms(r['latent_cache_compute_per_request_s'])} | {_ms(r['latent_cache_compute_per_call_s'])} | "
            f"{_ms(r['lookup_s_per_lookup'])} | {r['miss_p50_s']:.3f} | {'-' if frac is None else f'{frac:.2%}'} | "
            f"{'-' if rss is None else f'{rss / 2**20:.0f}'} | {r['errors']} |")
    sized = [r for r in done if r.get("latent_cache_rss_loaded_bytes")]
    if len(sized) >= 2 and sized[-1]["size"] > sized[0]["size"]:
        a, b = sized[0], sized[-1]
        per = (b["latent_cache_rss_loaded_bytes"] - a["latent_cache_rss_loaded_bytes"]) / (b["size"] - a["size"])
        lines += ["", f"Resident memory per synthetic entry ({a['size']:,} -> {b['size']:,}): {per / 1024:.1f} KiB "
                      "(embedding kept by the entry, the shard's CPU copy and faiss's copy, 3 x 1.5 KiB at 384-d, "
                      "plus bookkeeping; a real entry adds its states)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--sizes", default="1000,10000,100000", help="synthetic entries per run, comma-separated")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("perf/results/cache_cost"))
    parser.add_argument("--min-available-gib", type=float, default=3.0,
                        help="abort a size whose server leaves less memory available than this")
    args = parser.parse_args(argv)
    report = run(args.model_repository, [int(s) for s in args.sizes.split(",") if s.strip()], args.log,
                 steps=args.steps, requests=args.requests, concurrency=args.concurrency, output=args.output,
                 min_available_bytes=int(args.min_available_gib * 2**30))
    text = markdown(report)
    (args.output / "cache_cost.md").write_text(text)
    print(text)
    failed = [r for r in report["sizes"] if str(r.get("skipped", "")).startswith("failed") or r.get("errors")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
