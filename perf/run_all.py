"""``make perf``: one report from a fresh server: micro-benchmarks, cache on/off replay, perf_analyzer.

Steps, all against one tritonserver started here on free local ports:

1. Ensemble overhead: the same requests through the ``txt2img`` ensemble and as a
   client-driven chain of direct model calls (cache bypassed, so both do the same work).
2. Replay of a real prompt log with the cache off and on, alternated (``nirvana-replay --compare``).
3. Cache cost: latent_cache compute time per request (lookup + admission, from Triton's
   statistics) as a fraction of a miss.
4. perf_analyzer: a concurrency sweep on the ensemble with prompts from the same log;
   its CSV (with per-composing-model columns) goes into the report.
5. Soak, on a second server whose latent store has small host and disk budgets (so states are
   evicted through both tiers all along): perf_analyzer at concurrency 8 for ``--soak-seconds``
   (60; ``make soak`` runs 600 alone with ``--soak-only``). Passes with zero failed requests,
   every tier within its byte budget and resident memory flat after warm-up.

Everything lands in perf/results/ (report.md, JSON, CSV, PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from nirvana.tritonserver import TritonServer
from nirvana_client.client import infer_inputs
from nirvana_export.repository import repository_variant
from nirvana_perf import replay
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


def perf_analyzer(url: str, log: Path, limit: int, steps: int, concurrency: str, output: Path,
                  extra: List[str] = (), timeout_s: float = 900) -> Dict[str, object]:
    binary = Path(sys.executable).parent / "perf_analyzer"
    rows = load_log(log, limit)
    data = {"data": [{"PROMPT": {"content": [str(r["prompt"])], "shape": [1]},
                      "STEPS": {"content": [steps], "shape": [1]}} for r in rows]}
    data_path = output / "perf_analyzer_input.json"
    data_path.write_text(json.dumps(data))
    csv_path = output / "perf_analyzer.csv"
    cudart = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    env = dict(os.environ, LD_LIBRARY_PATH=f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    cmd = [str(binary), "-m", "txt2img", "-u", url, "-i", "grpc", "--input-data", str(data_path),
           "--concurrency-range", concurrency, "--measurement-interval", "10000", "--max-trials", "4",
           "--stability-percentage", "50", "-f", str(csv_path), "--verbose-csv", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    (output / "perf_analyzer.log").write_text(proc.stdout + proc.stderr)
    composing = composing_csv(proc.stdout)
    (output / "perf_analyzer_composing.csv").write_text(composing)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "csv": str(csv_path),
            "csv_text": csv_path.read_text() if csv_path.exists() else "", "composing_csv": composing,
            "summary": [line for line in proc.stdout.splitlines() if line.startswith("Concurrency:")],
            "errors": [line for line in (proc.stdout + proc.stderr).splitlines()
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
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    tiers: Dict[str, Dict[str, float]] = {}
    for name, tier, value in re.findall(r'^(nirvana_cache_(?:budget_)?bytes)\{[^}]*tier="(\w+)"[^}]*\} (\S+)$', text, re.M):
        tiers.setdefault(tier, {})["budget" if "budget" in name else "used"] = float(value)
    evictions = {tier: float(value) for tier, value in
                 re.findall(r'^nirvana_cache_evictions_total\{[^}]*tier="(\w+)"[^}]*\} (\S+)$', text, re.M)}
    return tiers, evictions


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


def soak(repository: Path, log: Path, seconds: int, concurrency: int, steps: int, output: Path,
         host_bytes: int, disk_bytes: int) -> Dict[str, object]:
    """perf_analyzer at a fixed concurrency for ``seconds`` on a server with small tier budgets,
    sampling the server's memory meanwhile."""
    import threading

    with tempfile.TemporaryDirectory(prefix="nirvana-soak-") as tmp:
        variant = repository_variant(repository, Path(tmp) / "repo", {"latent_cache": {
            "host_bytes": str(host_bytes), "disk_bytes": str(disk_bytes), "disk_path": str(Path(tmp) / "disk")}})
        with TritonServer(variant) as server:
            samples: List[tuple] = []
            stop = threading.Event()

            def sample():
                start = time.monotonic()
                while not stop.wait(5):
                    samples.append((time.monotonic() - start, process_tree_rss(server.process.pid)))

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            soak_dir = output / "soak"
            soak_dir.mkdir(parents=True, exist_ok=True)
            before = model_statistics(server.grpc_url)
            result = perf_analyzer(server.grpc_url, log, 200, steps, f"{concurrency}:{concurrency}", soak_dir,
                                   # three windows of seconds/3 that always count as stable: a fixed-length run
                                   extra=["--measurement-interval", str(seconds * 1000 // 3), "--max-trials", "3",
                                          "--stability-percentage", "1000"], timeout_s=seconds * 2 + 600)
            stop.set()
            thread.join()
            after = model_statistics(server.grpc_url)
            tiers, evictions = cache_metrics(server.metrics_port)
    failed = {m: after[m]["failures"] - before[m]["failures"] for m in after}
    return {"seconds": seconds, "concurrency": concurrency, "steps": steps, "returncode": result["returncode"],
            "summary": result["summary"], "errors": result["errors"],
            "served": after["txt2img"]["requests"] - before["txt2img"]["requests"],
            "failed_requests": failed, "host_bytes": host_bytes, "disk_bytes": disk_bytes, "evictions": evictions,
            **memory_growth(samples, warmup_s=min(60, seconds / 4)),
            "rss_samples_mb": [(round(t), round(r / 2**20)) for t, r in samples],
            "tiers": tiers, "tiers_within_budget": all(v.get("used", 0) <= v.get("budget", 0) for v in tiers.values())}


def soak_passed(k: Dict[str, object]) -> bool:
    return (k["returncode"] == 0 and not any(k["failed_requests"].values()) and k["tiers_within_budget"]
            and k["memory_flat"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--log", type=Path, default=Path("perf/data/diffusiondb_sample.jsonl"))
    parser.add_argument("--limit", type=int, default=120, help="requests replayed from the log")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pa-concurrency", default="1:2", help="perf_analyzer --concurrency-range")
    parser.add_argument("--soak-seconds", type=int, default=60, help="perf_analyzer soak length (0: skip)")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--soak-host-bytes", type=int, default=64 << 10,
                        help="host tier budget of the soak server (small, so states are evicted all along)")
    parser.add_argument("--soak-disk-bytes", type=int, default=256 << 10, help="disk tier budget of the soak server")
    parser.add_argument("--soak-only", action="store_true", help="run the soak alone (`make soak`)")
    parser.add_argument("--output", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                                            f"{platform.platform()}", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.soak_only:
        report.update(benchmarks(args))
    if args.soak_seconds:
        print(f"soak: perf_analyzer at concurrency {args.soak_concurrency} for {args.soak_seconds}s "
              f"(host tier {args.soak_host_bytes} B, disk tier {args.soak_disk_bytes} B) ...", flush=True)
        report["soak"] = soak(args.model_repository, args.log, args.soak_seconds, args.soak_concurrency, args.steps,
                              args.output, args.soak_host_bytes, args.soak_disk_bytes)
    name = "soak" if args.soak_only else "report"
    (args.output / f"{name}.json").write_text(json.dumps(report, indent=1))
    text = render_soak(report["soak"]) if args.soak_only else render(report)
    (args.output / f"{name}.md").write_text(text)
    print(text)
    ok = ("perf_analyzer" not in report or report["perf_analyzer"]["returncode"] == 0) and \
        ("soak" not in report or soak_passed(report["soak"]))
    return 0 if ok else 1


def benchmarks(args: argparse.Namespace) -> Dict[str, object]:
    """Steps 1-4 of the module docstring, on one server over the committed repository."""
    report: Dict[str, object] = {}
    with TritonServer(args.model_repository) as server:
        print(f"server up: gRPC {server.grpc_url}", flush=True)
        print("1/4 ensemble overhead ...", flush=True)
        prompts = [str(r["prompt"]) for r in load_log(Path("perf/data/diffusiondb_sample.jsonl"), 6)]
        report["ensemble_overhead"] = ensemble_overhead(server.grpc_url, prompts, args.steps)
        before = model_statistics(server.grpc_url)
        print(f"2/4 replay {args.log} ({args.limit} requests, cache off/on alternated) ...", flush=True)
        rargs = argparse.Namespace(log=args.log, url=server.grpc_url, limit=args.limit, steps=args.steps,
                                   concurrency=args.concurrency, rate=0.0, compare=True, chunk=20,
                                   output=args.output / "replay")
        rep = asyncio.run(replay.run(rargs))
        rargs.output.mkdir(parents=True, exist_ok=True)
        (rargs.output / "replay.json").write_text(json.dumps(rep, indent=1))
        replay.plot(rep, rargs.output / "replay.png")
        report["replay"] = {k: v for k, v in rep.items() if k != "samples"}
        report["replay_markdown"] = replay.markdown(rep)
        after = model_statistics(server.grpc_url)
        print("3/4 cache cost ...", flush=True)
        delta = {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}
        served = max(1, delta["txt2img"]["requests"])
        miss = rep["modes"]["on"]["latency_by_status_s"].get("miss", {}).get("p50") or \
            rep["modes"]["off"]["latency_s"]["p50"]
        cache_s = delta["latent_cache"]["compute_s"] / served
        report["per_model_compute_per_request_s"] = {m: delta[m]["compute_s"] / served for m in MODELS}
        report["cache_cost"] = {"latent_cache_compute_per_request_s": cache_s, "miss_p50_s": miss,
                                "fraction_of_miss": cache_s / miss if miss else None}
        print("4/4 perf_analyzer ...", flush=True)
        report["perf_analyzer"] = perf_analyzer(server.grpc_url, args.log, 50, args.steps, args.pa_concurrency,
                                                args.output)
    return report


def render(report: Dict[str, object]) -> str:
    e, c = report["ensemble_overhead"], report["cache_cost"]
    lines = [f"# Performance report ({report['started']})", "", f"Machine: {report['machine']}", "",
             "## Replay, cache off vs on", "", report["replay_markdown"],
             "## Cost of the pipeline pieces", "",
             f"- Ensemble vs client-driven chain of direct model calls ({e['steps']} steps, cache bypassed, "
             f"p50 of {e['requests']}): ensemble {e['ensemble_p50_s']:.3f}s, direct chain "
             f"{e['direct_chain_p50_s']:.3f}s, difference {e['ensemble_minus_direct_s'] * 1e3:+.1f} ms per request.",
             f"- latent_cache compute (lookup + admission) per request: {c['latent_cache_compute_per_request_s'] * 1e3:.2f} ms"
             f" = {c['fraction_of_miss']:.2%} of a miss (p50 {c['miss_p50_s']:.3f}s).",
             "- Compute per request by model (replay, Triton statistics): " +
             ", ".join(f"{m} {s * 1e3:.1f} ms" for m, s in report["per_model_compute_per_request_s"].items()),
             "", "## perf_analyzer", "", f"`{report['perf_analyzer']['command']}`", ""]
    lines += [f"    {line}" for line in report["perf_analyzer"]["summary"]]
    lines += ["", "CSV (perf_analyzer.csv):", "", "```", report["perf_analyzer"]["csv_text"].strip(), "```", "",
              "Composing models (perf_analyzer_composing.csv, microseconds):", "", "```",
              report["perf_analyzer"].get("composing_csv", "").strip(), "```", "",
              "Plots: replay/replay.png (latency CDF by cache result, K histogram, throughput)."]
    if "soak" in report:
        lines += ["", render_soak(report["soak"])]
    return "\n".join(lines) + "\n"


def render_soak(k: Dict[str, object]) -> str:
    growth = k["rss_growth_mb"]
    memory = (f"{k['rss_after_warmup_first_mb']:.0f} MB -> {k['rss_last_mb']:.0f} MB ({growth:+.0f} MB, "
              f"flat: {k['memory_flat']}; samples every 5 s: {k['rss_samples_mb']})" if growth is not None
              else "no samples")
    lines = [f"## Soak: perf_analyzer at concurrency {k['concurrency']} for {k['seconds']}s ({k['steps']} steps)", "",
             f"- result: {'PASS' if soak_passed(k) else 'FAIL'}",
             f"- perf_analyzer exit code {k['returncode']}; " + "; ".join(k["summary"]),
             f"- requests served {k['served']}; failed requests per model (Triton statistics): {k['failed_requests']}",
             f"- errors reported: {k['errors'] or 'none'}",
             f"- server + stubs resident memory after warm-up: {memory}",
             f"- store tiers within budget: {k['tiers_within_budget']} ({k['tiers']}); budgets host {k['host_bytes']} B, "
             f"disk {k['disk_bytes']} B; evictions per tier {k['evictions']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
