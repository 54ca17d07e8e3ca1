"""``make perf``: one report from fresh servers: micro-benchmarks, warm-cache replay, perf_analyzer, soak.

Steps, against tritonservers started here on free local ports:

1. Ensemble overhead: the same requests through the ``txt2img`` ensemble and as a
   client-driven chain of direct model calls (cache bypassed, so both do the same work).
2. perf_analyzer: a concurrency sweep on the ensemble with prompts from the same log;
   its CSV (with per-composing-model columns) goes into the report. Windows are sized by
   request count (``--pa-requests``), not time, so a slow or shared machine cannot leave a
   window empty.
3. Warm-cache replay (``nirvana-replay --warmup``), one server per ``unet_loop`` batching mode
   (``--batching step,execute``; each from a repository variant, each with a fresh cache): the
   same warm-up prefix admitted unmeasured, then a window per level (``--levels``: closed loop
   at each concurrency, ``open``: Poisson at ``--open-rate-factor`` x the cache-off capacity),
   cache off and on alternated in chunks on both servers; exact-hit probes at concurrency 8.
   Reports R, UNet steps saved s, E = (1 - 1/R) / s and p50/p99 per cache result.
4. Cache cost: latent_cache compute time per cache-on request over the measured windows (lookup +
   admission, from Triton's statistics) as a fraction of a miss, per batching mode.
5. Soak, on a server whose latent store has small host and disk budgets (so states are
   evicted through both tiers all along): perf_analyzer at concurrency 8 for about
   ``--soak-seconds`` (60; ``make soak`` runs 600 alone with ``--soak-only``). Its three windows
   are sized by request count from a throughput measured first on the same server. Passes with
   zero failed requests, every tier within its byte budget and resident memory flat after warm-up.

6. Replicas (``nirvana-replicas-bench``): the log split round-robin across two replicas, with
   one shared cache (a real redis-server) vs separate caches vs one server: hit rate, UNet steps
   saved, the lookup and admission cost the shared tier adds, replication lag; then the first
   ``--replicas-served`` requests through real tritonservers the same three ways.

Everything lands in perf/results/ (report.md, JSON, CSV, PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nirvana.tritonserver import TritonServer
from nirvana_client.client import infer_inputs
from nirvana_export.repository import repository_variant
from nirvana_perf import cache_cost, metrics_text, persist_latency, replay
from nirvana_perf import replicas as replicas_bench
from nirvana_perf.simulate import load_log

MODELS = ("tokenizer", "text_encoder", "latent_cache", "unet_loop", "vae_decoder")


def direct_chain(client, grpc, prompt: str, seed: int, steps: int) -> float:
    """The pipeline driven by the client, one direct model call per ensemble step."""
    start = time.perf_counter()
    request = {"PROMPT": np.array([[prompt.encode()]], dtype=object), "SEED": np.array([[seed]], np.int64),
               "STEPS": np.array([[steps]], np.int32)}
    tok = client.infer("tokenizer", infer_inputs(grpc, request))
    common = {"PROMPT": request["PROMPT"], "SEED": tok.as_numpy("RESOLVED_SEED"),
              "STEPS": tok.as_numpy("RESOLVED_STEPS"), "GUIDANCE_SCALE": tok.as_numpy("RESOLVED_GUIDANCE_SCALE"),
              "CACHE": np.array([[False]])}
    cond = client.infer("text_encoder", infer_inputs(grpc, {"INPUT_IDS": tok.as_numpy("INPUT_IDS"),
                                                            "ATTENTION_MASK": tok.as_numpy("ATTENTION_MASK")}))
    uncond = client.infer("text_encoder", infer_inputs(grpc, {
        "INPUT_IDS": tok.as_numpy("NEGATIVE_INPUT_IDS"), "ATTENTION_MASK": tok.as_numpy("NEGATIVE_ATTENTION_MASK")}))
    embedding = cond.as_numpy("POOLED_EMBEDDING")
    look = client.infer("latent_cache", infer_inputs(grpc, {"POOLED_EMBEDDING": embedding, **common}),
                        outputs=[grpc.InferRequestedOutput(n) for n in ("LATENTS", "START_STEP_OUT", "SAVE_STEPS")])
    loop = client.infer("unet_loop", infer_inputs(grpc, {
        "HIDDEN_STATES": cond.as_numpy("HIDDEN_STATES"), "NEGATIVE_HIDDEN_STATES": uncond.as_numpy("HIDDEN_STATES"),
        "LATENTS": look.as_numpy("LATENTS"), "START_STEP": look.as_numpy("START_STEP_OUT"),
        "STEPS": common["STEPS"], "GUIDANCE_SCALE": common["GUIDANCE_SCALE"], "SAVE_STEPS": look.as_numpy("SAVE_STEPS")}))
    client.infer("vae_decoder", infer_inputs(grpc, {"LATENTS": loop.as_numpy("FINAL_LATENTS")}))
    client.infer("latent_cache", infer_inputs(grpc, {
        "POOLED_EMBEDDING": embedding, **common, "START_STEP": look.as_numpy("START_STEP_OUT"),
        "CHECKPOINTS": loop.as_numpy("CHECKPOINTS"), "CHECKPOINT_STEPS": loop.as_numpy("CHECKPOINT_STEPS"),
        "FINAL_LATENTS": loop.as_numpy("FINAL_LATENTS")}), outputs=[grpc.InferRequestedOutput("ADMITTED")])
    return time.perf_counter() - start


def ensemble_overhead(url: str, prompts: List[str], steps: int) -> Dict[str, float]:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    ensemble, direct = [], []
    for i, prompt in enumerate(prompts):
        inputs = infer_inputs(grpc, {"PROMPT": np.array([[prompt.encode()]], dtype=object),
                                     "SEED": np.array([[i]], np.int64), "STEPS": np.array([[steps]], np.int32),
                                     "CACHE": np.array([[False]])})
        t0 = time.perf_counter()
        client.infer("txt2img", inputs)
        ensemble.append(time.perf_counter() - t0)
        direct.append(direct_chain(client, grpc, prompt, i, steps))
    client.close()
    e, d = float(np.median(ensemble[1:])), float(np.median(direct[1:]))  # first of each is a warm-up
    return {"steps": steps, "requests": len(prompts) - 1, "ensemble_p50_s": e, "direct_chain_p50_s": d,
            "ensemble_minus_direct_s": e - d}


def model_statistics(url: str) -> Dict[str, Dict[str, float]]:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    stats = {}
    for model in MODELS + ("txt2img",):
        s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        inf = s.get("inference_stats", {})
        stats[model] = {
            "requests": int(inf.get("success", {}).get("count", 0)),
            "failures": int(inf.get("fail", {}).get("count", 0)),
            "executions": int(s.get("execution_count", 0)),
            "compute_s": int(inf.get("compute_infer", {}).get("ns", 0)) / 1e9,
            "queue_s": int(inf.get("queue", {}).get("ns", 0)) / 1e9,
        }
    client.close()
    return stats


def perf_analyzer_env(workdir: Path) -> Dict[str, str]:
    """perf_analyzer's environment: libcudart.so.12 from the nvidia-cuda-runtime wheel, and as a
    fallback (no apt libb64, no wheel) symlinks to the copies bundled in nvidia_pytriton.libs."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    paths = [purelib / "nvidia" / "cuda_runtime" / "lib"]
    bundled = purelib / "nvidia_pytriton.libs"
    links = Path(workdir) / ".perf_analyzer_libs"
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(bundled.glob(pattern))
        if found:
            links.mkdir(parents=True, exist_ok=True)
            link = links / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(found[0])
    paths.append(links)  # last: a system libb64 or the pip cudart wins
    return dict(os.environ, LD_LIBRARY_PATH=":".join([*map(str, paths), os.environ.get("LD_LIBRARY_PATH", "")]))


def perf_analyzer(url: str, log: Path, limit: int, steps: int, concurrency: str, output: Path,
                  requests_per_window: int = 12, trials: int = 3, timeout_s: float = 1800) -> Dict[str, object]:
    """perf_analyzer over ``concurrency`` with windows of at least ``requests_per_window`` requests
    each: ``trials`` windows that always count as stable (a noisy shared machine would fail any
    stability threshold; the windows' own figures are printed)."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    rows = load_log(log, limit)
    data = {"data": [{"PROMPT": {"content": [str(r["prompt"])], "shape": [1]},
                      "STEPS": {"content": [steps], "shape": [1]}} for r in rows]}
    output.mkdir(parents=True, exist_ok=True)
    data_path = output / "perf_analyzer_input.json"
    data_path.write_text(json.dumps(data))
    csv_path = output / "perf_analyzer.csv"
    env = perf_analyzer_env(output)
    cmd = [str(binary), "-m", "txt2img", "-u", url, "-i", "grpc", "--input-data", str(data_path),
           "--concurrency-range", concurrency, "--measurement-mode", "count_windows",
           "--measurement-request-count", str(max(1, requests_per_window)), "--measurement-interval", "1000",
           "--max-trials", str(trials), "--stability-percentage", "1000", "-f", str(csv_path), "--verbose-csv"]
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        stdout, stderr, returncode = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = f"perf_analyzer killed after {timeout_s:.0f}s"
        returncode = 124
    (output / "perf_analyzer.log").write_text(stdout + stderr)
    composing = composing_csv(stdout)
    (output / "perf_analyzer_composing.csv").write_text(composing)
    return {"command": " ".join(cmd), "returncode": returncode, "csv": str(csv_path),
            "wall_s": time.perf_counter() - began, "requests_per_window": requests_per_window,
            "csv_text": csv_path.read_text() if csv_path.exists() else "", "composing_csv": composing,
            "summary": [line for line in stdout.splitlines() if line.startswith("Concurrency:")],
            "errors": [line for line in (stdout + stderr).splitlines()
                       if "error" in line.lower() or "failed" in line.lower()][:20]}


def composing_csv(stdout: str) -> str:
    """perf_analyzer's per-composing-model block, per concurrency level, as CSV (microseconds)."""
    import re

    rows = ["concurrency,model,avg_latency_us,queue_us,compute_input_us,compute_infer_us,compute_output_us"]
    concurrency, model = None, None
    for line in stdout.splitlines():
        if m := re.match(r"Request concurrency: (\d+)", line.strip()):
            concurrency = m.group(1)
        elif m := re.match(r"(\w+), version: ", line.strip()):
            model = m.group(1)
        elif (m := re.search(r"Avg request latency: (\d+) usec \(overhead \d+ usec \+ queue (\d+) usec \+ compute "
                             r"input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec", line)) and model:
            rows.append(",".join([concurrency or "", model, *m.groups()]))
            model = None
    return "\n".join(rows) + "\n"


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (the server and its Python-backend stubs)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cache_metrics(metrics_port: int) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """From one scrape of the metrics port: bytes used and budget per tier, and evictions per tier."""
    samples = metrics_text.scrape(metrics_port)
    tiers: Dict[str, Dict[str, float]] = {}
    for name, key in (("nirvana_cache_bytes", "used"), ("nirvana_cache_budget_bytes", "budget")):
        for tier, value in metrics_text.by_label(samples, name, "tier").items():
            tiers.setdefault(tier, {})[key] = value
    return tiers, metrics_text.by_label(samples, "nirvana_cache_evictions_total", "tier")


def memory_growth(samples: List[tuple], warmup_s: float) -> Dict[str, object]:
    """Resident memory after warm-up: median of its first and last fifth, and whether it is flat
    (grew by at most 64 MB or 3%, whichever is larger)."""
    warm = [rss for t, rss in samples if t >= warmup_s]
    if len(warm) < 2:
        return {"rss_after_warmup_first_mb": None, "rss_last_mb": None, "rss_growth_mb": None, "memory_flat": False}
    fifth = max(1, len(warm) // 5)
    first, last = float(np.median(warm[:fifth])) / 2**20, float(np.median(warm[-fifth:])) / 2**20
    return {"rss_after_warmup_first_mb": first, "rss_last_mb": last, "rss_growth_mb": last - first,
            "memory_flat": last - first <= max(64.0, 0.03 * first)}


def measured_throughput(url: str, log: Path, concurrency: int, steps: int, requests: int) -> Dict[str, float]:
    """Requests per second of a short closed loop at ``concurrency`` (cache on, prompts from ``log``)."""
    import tritonclient.grpc.aio as grpc
    from tqdm import tqdm

    rows = load_log(log, requests)
    items = replay.items_of(rows, range(len(rows)))

    async def go():
        client = grpc.InferenceServerClient(url)
        try:
            outputs = await replay.served_outputs(client)
            with tqdm(total=len(items), desc="soak calibration", unit="req", file=sys.stderr) as bar:
                began = time.perf_counter()
                got = await replay.closed_loop(client, grpc, items, steps, "on", concurrency, bar, outputs)
                return got, time.perf_counter() - began
        finally:
            await client.close()

    got, wall = asyncio.run(go())
    ok = sum(1 for s in got if s.status != "error")
    return {"requests": len(got), "ok": ok, "wall_s": wall, "throughput_rps": ok / wall if wall else 0.0}


def soak(repository: Path, log: Path, seconds: int, concurrency: int, steps: int, output: Path,
         host_bytes: int, disk_bytes: int) -> Dict[str, object]:
    """perf_analyzer at a fixed concurrency for about ``seconds`` on a server with small tier budgets,
    sampling the server's memory meanwhile. The three windows are sized by request count from the
    throughput of a short closed loop at the same concurrency (counted in the soak's time), so a
    slow or shared machine makes the soak take longer instead of leaving a window empty."""
    import threading

    with tempfile.TemporaryDirectory(prefix="nirvana-soak-") as tmp:
        variant = repository_variant(repository, Path(tmp) / "repo", {"latent_cache": {
            "host_bytes": str(host_bytes), "disk_bytes": str(disk_bytes), "disk_path": str(Path(tmp) / "disk")}})
        with TritonServer(variant) as server:
            samples: List[tuple] = []
            stop = threading.Event()
            began = time.monotonic()

            def sample():
                while not stop.wait(5):
                    samples.append((time.monotonic() - began, process_tree_rss(server.process.pid)))

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            soak_dir = output / "soak"
            soak_dir.mkdir(parents=True, exist_ok=True)
            before = model_statistics(server.grpc_url)
            calibration = measured_throughput(server.grpc_url, log, concurrency, steps, 2 * concurrency)
            remaining = max(seconds - calibration["wall_s"], seconds / 3)
            per_window = max(concurrency, math.ceil(calibration["throughput_rps"] * remaining / 3))
            result = perf_analyzer(server.grpc_url, log, 200, steps, f"{concurrency}:{concurrency}", soak_dir,
                                   requests_per_window=per_window, trials=3,
                                   # generous: a machine 5x slower than calibrated still finishes
                                   timeout_s=5 * remaining + 600)
            stop.set()
            thread.join()
            wall = time.monotonic() - began
            after = model_statistics(server.grpc_url)
            tiers, evictions = cache_metrics(server.metrics_port)
    failed = {m: after[m]["failures"] - before[m]["failures"] for m in after}
    return {"seconds": seconds, "wall_s": wall, "concurrency": concurrency, "steps": steps,
            "calibration": calibration, "requests_per_window": per_window, "returncode": result["returncode"],
            "summary": result["summary"], "errors": result["errors"],
            "served": after["txt2img"]["requests"] - before["txt2img"]["requests"],
            "failed_requests": failed, "host_bytes": host_bytes, "disk_bytes": disk_bytes, "evictions": evictions,
            **memory_growth(samples, warmup_s=min(60, wall / 4)),
            "rss_samples_mb": [(round(t), round(r / 2**20)) for t, r in samples],
            "tiers": tiers, "tiers_within_budget": all(v.get("used", 0) <= v.get("budget", 0) for v in tiers.values())}


def soak_passed(k: Dict[str, object]) -> bool:
    return (k["returncode"] == 0 and not any(k["failed_requests"].values()) and k["tiers_within_budget"]
            and k["memory_flat"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--log", type=Path, default=Path("perf/data/diffusiondb_sample.jsonl"))
    parser.add_argument("--limit", type=int, default=0,
                        help="most rows read from the log (default: warm-up + window x levels)")
    parser.add_argument("--steps", type=int, default=50)
    replay.add_warm_replay_arguments(parser, warmup_default=300)
    parser.add_argument("--batching", default="step,execute", help="unet_loop batching modes compared side by side")
    parser.add_argument("--chunk", type=int, default=0,
                        help="warm replay: requests per cache off/on chunk (0: 6 x concurrency, at least 20)")
    parser.add_argument("--open-rate", type=float, default=0.0, help="open loop rate in req/s (overrides the factor)")
    parser.add_argument("--warmup-concurrency", type=int, default=8)
    parser.add_argument("--pa-concurrency", default="1:2", help="perf_analyzer --concurrency-range")
    parser.add_argument("--pa-requests", type=int, default=12, help="perf_analyzer sweep: requests per window")
    parser.add_argument("--skip", default="",
                        help="comma-separated steps to skip: overhead, perf_analyzer, replay, cache_sizes, persistence, "
                             "quality, replicas")
    parser.add_argument("--replicas-limit", type=int, default=20_000,
                        help="replicas step: requests of the log replayed through the cache engines")
    parser.add_argument("--replicas-served", type=int, default=200,
                        help="replicas step: requests replayed through real tritonservers (0: skip that part)")
    parser.add_argument("--quality-per-band", type=int, default=30,
                        help="quality step: prompt pairs per similarity band (nirvana-quality --per-band)")
    parser.add_argument("--quality-baseline", type=int, default=500,
                        help="quality step: held-out captions for the no-cache adherence")
    parser.add_argument("--persist-states", type=int, default=10_000,
                        help="persistence step: states in the cache while it is persisted (perf/persist_latency.py)")
    parser.add_argument("--cache-sizes", default="1000,10000,100000,1000000",
                        help="cache cost by size: synthetic entries per server (perf/cache_cost.py; a size the "
                             "machine's memory cannot hold is skipped and reported)")
    parser.add_argument("--soak-seconds", type=int, default=60, help="perf_analyzer soak length (0: skip)")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--soak-host-bytes", type=int, default=64 << 10,
                        help="host tier budget of the soak server (small, so states are evicted all along)")
    parser.add_argument("--soak-disk-bytes", type=int, default=256 << 10, help="disk tier budget of the soak server")
    parser.add_argument("--soak-only", action="store_true", help="run the soak alone (`make soak`)")
    parser.add_argument("--output", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, kill PID) unwinds like Ctrl-C, so the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.output.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                                            f"{platform.platform()}", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "code": code_version(), "command": " ".join(sys.argv)}
    if not args.soak_only:
        report.update(benchmarks(args))
    if args.soak_seconds:
        print(f"soak: perf_analyzer at concurrency {args.soak_concurrency} for about {args.soak_seconds}s "
              f"(host tier {args.soak_host_bytes} B, disk tier {args.soak_disk_bytes} B) ...", flush=True)
        with step_errors(report, "soak"):
            report["soak"] = soak(args.model_repository, args.log, args.soak_seconds, args.soak_concurrency,
                                  args.steps, args.output, args.soak_host_bytes, args.soak_disk_bytes)
    name = "soak" if args.soak_only else "report"
    (args.output / f"{name}.json").write_text(json.dumps(report, indent=1))
    text = render_soak(report["soak"]) if args.soak_only and "soak" in report else render(report)
    (args.output / f"{name}.md").write_text(text)
    print(text)
    failures = failed_checks(report)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def failed_checks(report: Dict[str, object]) -> List[str]:
    """What makes ``make perf`` exit 1: perf_analyzer failing, a failed soak, replay errors. Slowness is not one."""
    out = [f"{step}: {error}" for step, error in report.get("errors", {}).items()]
    if "perf_analyzer" in report and report["perf_analyzer"]["returncode"] != 0:
        out.append(f"perf_analyzer exited {report['perf_analyzer']['returncode']}: {report['perf_analyzer']['errors'][:3]}")
    if "soak" in report and not soak_passed(report["soak"]):
        out.append("soak (see its section of the report)")
    if "replicas" in report and not report["replicas"]["target_met"]:
        out.append(f"replicas: the shared pair saved {100 * report['replicas']['shared_vs_one']:.1f}% of one server's "
                   f"UNet steps (target {100 * replicas_bench.TARGET:.0f}%)")
    for label, cfg in (report.get("warm_replay") or {}).get("configs", {}).items():
        errors = sum(lv[m]["errors"] for lv in cfg.values() for m in ("off", "on"))
        if errors:
            out.append(f"warm replay, batching={label}: {errors} failed requests")
    return out


@contextlib.contextmanager
def step_errors(report: Dict[str, object], step: str):
    """Record a step's exception in ``report["errors"]`` and go on, so the report is still written."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported, and make perf exits 1
        import traceback

        traceback.print_exc()
        report.setdefault("errors", {})[step] = f"{type(exc).__name__}: {str(exc)[-2000:]}"


def code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def benchmarks(args: argparse.Namespace) -> Dict[str, object]:
    """Steps 1-4 of the module docstring."""
    report: Dict[str, object] = {}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not {"overhead", "perf_analyzer"} <= skip:
        with step_errors(report, "server over the committed repository"), TritonServer(args.model_repository) as server:
            print(f"server up (committed repository): gRPC {server.grpc_url}", flush=True)
            if "overhead" not in skip:
                print("1/4 ensemble overhead ...", flush=True)
                prompts = [str(r["prompt"]) for r in load_log(Path("perf/data/diffusiondb_sample.jsonl"), 6)]
                with step_errors(report, "ensemble overhead"):
                    report["ensemble_overhead"] = ensemble_overhead(server.grpc_url, prompts, args.steps)
            if "perf_analyzer" not in skip:
                print(f"2/4 perf_analyzer (concurrency {args.pa_concurrency}, {args.pa_requests} requests per "
                      f"window) ...", flush=True)
                report["perf_analyzer"] = perf_analyzer(server.grpc_url, args.log, 50, args.steps, args.pa_concurrency,
                                                        args.output, requests_per_window=args.pa_requests)
    if "replay" not in skip:
        with step_errors(report, "warm replay"):
            report.update(warm_replay_step(args))
    sizes = [int(x) for x in args.cache_sizes.split(",") if x.strip()]
    if "cache_sizes" not in skip and sizes:
        print(f"cache cost by size: {sizes} synthetic entries, one server each ...", flush=True)
        with step_errors(report, "cache cost by size"):
            by_size = cache_cost.run(args.model_repository, sizes, args.log, output=args.output / "cache_cost")
            report["cache_cost_by_size"] = by_size
            report["cache_cost_by_size_markdown"] = cache_cost.markdown(by_size)
    if "persistence" not in skip:
        print(f"persistence: request latency while a cache of {args.persist_states} states is persisted ...", flush=True)
        with step_errors(report, "persistence latency"):
            report["persist_latency"] = persist_latency.run(args.model_repository, states=args.persist_states,
                                                            output=args.output / "persist_latency")
    if "replicas" not in skip:
        print("replicas: round-robin over two replicas, shared cache vs separate vs one server ...", flush=True)
        with step_errors(report, "replicas"):
            report["replicas"] = replicas_bench.run(args.model_repository, args.log, args.replicas_limit,
                                                    args.replicas_served, args.steps, args.output / "replicas")
    if "quality" not in skip:
        print("quality of approximate hits per K and similarity band (nirvana-quality) ...", flush=True)
        with step_errors(report, "quality"):
            from nirvana_quality import cli as quality_cli

            out = args.output / "quality"
            code = quality_cli.main(["--repository", str(args.model_repository), "--per-band",
                                     str(args.quality_per_band), "--baseline", str(args.quality_baseline),
                                     "--steps", str(args.steps), "--output", str(out)])
            if code:
                raise RuntimeError(f"nirvana-quality exited {code}")
            report["quality_markdown"] = (out / "quality.md").read_text()
    return report


def warm_replay_step(args: argparse.Namespace) -> Dict[str, object]:
    """Steps 3 and 4: one server per batching mode, all up at once, driven chunk by chunk in turn."""
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    options = replay.warm_replay_options(args)
    levels = options["levels"]
    rows = load_log(args.log, args.limit or args.warmup + args.window * len(levels))
    print(f"3/4 warm replay of {args.log}: warm-up {args.warmup}, window {args.window} per level, levels "
          f"{','.join(levels)}, batching {','.join(modes)} ...", flush=True)
    out: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="nirvana-perf-") as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for mode in modes:
            variant = repository_variant(args.model_repository, Path(tmp) / f"repo-{mode}",
                                         {"unet_loop": {"batching": mode}})
            servers[mode] = stack.enter_context(TritonServer(variant))
            print(f"server up (unet_loop batching={mode}): gRPC {servers[mode].grpc_url}", flush=True)
        stats: Dict[str, Dict[str, Dict[str, float]]] = {}

        def after_warmup():
            for mode, server in servers.items():
                stats[mode] = model_statistics(server.grpc_url)

        rep = asyncio.run(replay.warm_replay(
            {mode: server.grpc_url for mode, server in servers.items()}, rows, steps=args.steps, chunk=args.chunk,
            open_rate=args.open_rate, warmup_concurrency=args.warmup_concurrency, after_warmup=after_warmup,
            **options))
        rep["log"] = str(args.log)
        print("4/4 cache cost ...", flush=True)
        costs = {}
        for mode, server in servers.items():
            after = model_statistics(server.grpc_url)
            delta = {m: {k: after[m][k] - stats[mode][m][k] for k in after[m]} for m in after}
            cfg = rep["configs"].get(mode, {})
            on_requests = max(1, sum(lv["on"]["requests"] for lv in cfg.values()))
            served = max(1, delta["txt2img"]["requests"])
            closed = [lv for lv in cfg if lv != replay.OPEN]
            top = cfg[max(closed, key=int)] if closed else next(iter(cfg.values()), None)
            miss = (top or {}).get("miss_p50_s") or ((top or {}).get("off", {}).get("latency_s", {}).get("p50"))
            cache_s = delta["latent_cache"]["compute_s"] / on_requests
            costs[mode] = {"latent_cache_compute_per_cache_on_request_s": cache_s, "miss_p50_s": miss,
                           "fraction_of_miss": cache_s / miss if miss else None,
                           "per_model_compute_per_request_s": {m: delta[m]["compute_s"] / served for m in MODELS},
                           "text_encoder_compute_per_request_s": delta["text_encoder"]["compute_s"] / served}
    replay_dir = args.output / "replay"
    replay_dir.mkdir(parents=True, exist_ok=True)
    (replay_dir / "warm_replay.json").write_text(json.dumps(rep, indent=1))
    replay.warm_plot(rep, replay_dir / "warm_replay.png")
    out["warm_replay"] = {k: v for k, v in rep.items() if k != "samples"}
    out["warm_replay_markdown"] = replay.warm_markdown(rep)
    out["cache_cost"] = costs
    return out


def render(report: Dict[str, object]) -> str:
    lines = [f"# Performance report ({report['started']})", "", f"Machine: {report['machine']}",
             f"Code: {report.get('code', 'unknown')}", ""]
    if "warm_replay_markdown" in report:
        lines += ["## Warm-cache replay, cache off vs on, by unet_loop batching mode", "",
                  report["warm_replay_markdown"], "Plots: replay/warm_replay.png (latency CDF by cache result at the "
                  "highest closed level, R per level); samples in replay/warm_replay.json.", ""]
    lines += ["## Cost of the pipeline pieces", ""]
    if "ensemble_overhead" in report:
        e = report["ensemble_overhead"]
        lines.append(f"- Ensemble vs client-driven chain of direct model calls ({e['steps']} steps, cache bypassed, "
                     f"p50 of {e['requests']}): ensemble {e['ensemble_p50_s']:.3f}s, direct chain "
                     f"{e['direct_chain_p50_s']:.3f}s, difference {e['ensemble_minus_direct_s'] * 1e3:+.1f} ms per request.")
    for mode, c in report.get("cache_cost", {}).items():
        frac = f" = {c['fraction_of_miss']:.2%} of a miss (p50 {c['miss_p50_s']:.3f}s)" if c["fraction_of_miss"] else ""
        lines += [f"- batching={mode}: latent_cache compute (lookup + admission) per cache-on request over the measured "
                  f"windows: {c['latent_cache_compute_per_cache_on_request_s'] * 1e3:.2f} ms{frac} (an upper bound: "
                  f"cache-off requests' bypass time is counted too).",
                  f"  Compute per request by model (Triton statistics; with step batching unet_loop answers after "
                  f"`execute` returns, so its figure is not its real time): " +
                  ", ".join(f"{m} {s * 1e3:.1f} ms" for m, s in c["per_model_compute_per_request_s"].items())]
    if "cache_cost_by_size_markdown" in report:
        lines += ["", "## Cache cost by cache size (synthetic entries, a server each, under load)", "",
                  report["cache_cost_by_size_markdown"]]
    if "persist_latency" in report:
        lines += ["", "## Request latency while the cache is persisted", "", report["persist_latency"]["markdown"]]
    if "replicas" in report:
        lines += ["", "## Two replicas: shared cache (Redis) vs separate caches vs one server", "",
                  report["replicas"]["markdown"]]
    if "quality_markdown" in report:
        lines += ["", "## Quality of approximate hits (quality/: tables, plot, image grids)", "",
                  report["quality_markdown"].split("\n", 1)[1].replace("\n## ", "\n### ")]
    if "perf_analyzer" in report:
        pa = report["perf_analyzer"]
        lines += ["", "## perf_analyzer", "", f"`{pa['command']}`", "",
                  f"Windows of at least {pa['requests_per_window']} requests each (count windows, always "
                  f"counted stable), {pa['wall_s']:.0f}s in all.", ""]
        lines += [f"    {line}" for line in pa["summary"]]
        lines += ["", "CSV (perf_analyzer.csv):", "", "```", pa["csv_text"].strip(), "```", "",
                  "Composing models (perf_analyzer_composing.csv, microseconds):", "", "```",
                  pa.get("composing_csv", "").strip(), "```"]
        if pa["returncode"]:
            lines += ["", f"perf_analyzer exited {pa['returncode']}: {pa['errors']}"]
    if "soak" in report:
        lines += ["", render_soak(report["soak"])]
    if report.get("errors"):
        lines += ["", "## Steps that failed", ""] + [f"- {step}: `{error}`" for step, error in report["errors"].items()]
    return "\n".join(lines) + "\n"


def render_soak(k: Dict[str, object]) -> str:
    growth = k["rss_growth_mb"]
    memory = (f"{k['rss_after_warmup_first_mb']:.0f} MB -> {k['rss_last_mb']:.0f} MB ({growth:+.0f} MB, "
              f"flat: {k['memory_flat']}; samples every 5 s: {k['rss_samples_mb']})" if growth is not None
              else "no samples")
    cal = k.get("calibration") or {}
    lines = [f"## Soak: perf_analyzer at concurrency {k['concurrency']} for about {k['seconds']}s ({k['steps']} steps)", "",
             f"- result: {'PASS' if soak_passed(k) else 'FAIL'}",
             f"- ran {k.get('wall_s', 0):.0f}s: a calibration closed loop of {cal.get('requests', 0)} requests "
             f"({cal.get('throughput_rps', 0):.2f} req/s in {cal.get('wall_s', 0):.0f}s), then three perf_analyzer "
             f"windows of at least {k.get('requests_per_window')} requests each",
             f"- perf_analyzer exit code {k['returncode']}; " + "; ".join(k["summary"]),
             f"- requests served {k['served']}; failed requests per model (Triton statistics): {k['failed_requests']}",
             f"- errors reported: {k['errors'] or 'none'}",
             f"- server + stubs resident memory after warm-up: {memory}",
             f"- store tiers within budget: {k['tiers_within_budget']} ({k['tiers']}); budgets host {k['host_bytes']} B, "
             f"disk {k['disk_bytes']} B; evictions per tier {k['evictions']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
