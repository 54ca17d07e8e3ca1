"""``nirvana-replay``: replay a prompt log against a running server and report what the cache did.

Closed loop (``--concurrency N``: N requests in flight) or open loop (``--rate R``:
Poisson arrivals at R requests/s), over gRPC with asyncio. With ``--compare`` the
log is cut into chunks and every chunk is sent twice, once with the cache
bypassed (CACHE=false) and once with it on, alternating, so the throughput
ratio holds even when the machine's speed drifts.

Writes JSON, a Markdown summary and PNG plots (latency CDF by cache result,
K histogram, throughput) under --output.

Example:
    nirvana-replay perf/data/diffusiondb_sample.jsonl --url 127.0.0.1:8001 --limit 200 --concurrency 2 --compare
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from nirvana_client.client import infer_inputs
from nirvana_perf.simulate import load_log

MODEL = "txt2img"


@dataclass
class Sample:
    index: int
    mode: str  # "on" or "off"
    status: str  # miss / approximate / exact / disabled / error
    start_step: int
    steps: int
    latency_s: float
    sent_at: float
    error: str = ""


def _inputs(grpc, prompt: str, seed: int, steps: int, cache: bool):
    return infer_inputs(grpc, {"PROMPT": np.array([[prompt.encode("utf-8")]], dtype=object),
                               "SEED": np.array([[seed]], dtype=np.int64), "STEPS": np.array([[steps]], dtype=np.int32),
                               "CACHE": np.array([[cache]], dtype=bool)})


async def _send(client, grpc, row: dict, index: int, steps: int, mode: str) -> Sample:
    seed = int(row["seed"]) % (2**63) if row.get("seed") is not None else index
    sent = time.perf_counter()
    try:
        # Ask for IMAGE (and ADMITTED) too: Triton skips ensemble steps whose outputs nobody requested.
        result = await client.infer(MODEL, _inputs(grpc, str(row["prompt"]), seed, steps, mode == "on"),
                                    outputs=[grpc.InferRequestedOutput(n) for n in
                                             ("IMAGE", "CACHE_STATUS", "START_STEP", "ADMITTED")])
        status = result.as_numpy("CACHE_STATUS").reshape(-1)[0].decode()
        start = int(result.as_numpy("START_STEP").reshape(-1)[0])
        return Sample(index, mode, status, start, steps, time.perf_counter() - sent, sent)
    except Exception as exc:  # noqa: BLE001 - recorded, the replay goes on
        return Sample(index, mode, "error", 0, steps, time.perf_counter() - sent, sent, str(exc)[:300])


async def closed_loop(client, grpc, rows: Sequence[dict], indexes: Sequence[int], steps: int, mode: str,
                      concurrency: int, bar: tqdm) -> List[Sample]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in indexes:
        queue.put_nowait(i)
    out: List[Sample] = []

    async def worker():
        while not queue.empty():
            i = queue.get_nowait()
            out.append(await _send(client, grpc, rows[i], i, steps, mode))
            bar.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def open_loop(client, grpc, rows: Sequence[dict], indexes: Sequence[int], steps: int, mode: str,
                    rate: float, bar: tqdm, seed: int = 0) -> List[Sample]:
    rng = random.Random(seed)
    tasks, start = [], time.perf_counter()
    at = 0.0
    for i in indexes:
        at += rng.expovariate(rate)
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(client, grpc, rows[i], i, steps, mode))
        task.add_done_callback(lambda _t: bar.update())
        tasks.append(task)
    return list(await asyncio.gather(*tasks))


async def run(args) -> Dict[str, object]:
    import tritonclient.grpc.aio as grpc

    rows = load_log(args.log, args.limit)
    client = grpc.InferenceServerClient(args.url)
    try:
        if not await client.is_model_ready(MODEL):
            raise RuntimeError(f"model {MODEL} is not ready at {args.url}")
        modes = ("off", "on") if args.compare else ("on",)
        chunks = [list(range(i, min(len(rows), i + args.chunk))) for i in range(0, len(rows), args.chunk)]
        samples: List[Sample] = []
        busy = {m: 0.0 for m in modes}
        with tqdm(total=len(rows) * len(modes), desc="replay", unit="req", file=sys.stderr) as bar:
            for n, chunk in enumerate(chunks):
                # Alternate which mode goes first so neither always runs on a warmer machine.
                for mode in (modes if n % 2 == 0 else modes[::-1]):
                    began = time.perf_counter()
                    if args.rate:
                        got = await open_loop(client, grpc, rows, chunk, args.steps, mode, args.rate, bar, seed=n)
                    else:
                        got = await closed_loop(client, grpc, rows, chunk, args.steps, mode, args.concurrency, bar)
                    busy[mode] += time.perf_counter() - began
                    samples += got
    finally:
        await client.close()
    return summarize(samples, busy, args)


def _percentiles(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)} | {"n": len(values)}


def summarize(samples: List[Sample], busy: Dict[str, float], args) -> Dict[str, object]:
    report: Dict[str, object] = {"log": str(args.log), "requests": len({s.index for s in samples}),
                                 "steps": args.steps, "concurrency": args.concurrency, "rate": args.rate,
                                 "modes": {}}
    for mode, seconds in busy.items():
        mine = [s for s in samples if s.mode == mode]
        ok = [s for s in mine if s.status != "error"]
        statuses = Counter(s.status for s in mine)
        run_steps = sum(s.steps - s.start_step for s in ok)
        report["modes"][mode] = {
            "requests": len(mine), "errors": statuses.get("error", 0), "wall_s": seconds,
            "throughput_rps": len(ok) / seconds if seconds else 0.0,
            "status_counts": dict(statuses),
            "hit_rate": (statuses.get("approximate", 0) + statuses.get("exact", 0)) / max(1, len(mine)),
            "unet_steps_saved": 1 - run_steps / max(1, sum(s.steps for s in ok)),
            "k_histogram": dict(sorted(Counter(s.start_step for s in ok).items())),
            "latency_s": _percentiles([s.latency_s for s in ok]),
            "latency_by_status_s": {st: _percentiles([s.latency_s for s in ok if s.status == st])
                                    for st in sorted({s.status for s in ok})},
        }
    if "on" in busy and "off" in busy:
        on, off = report["modes"]["on"], report["modes"]["off"]
        report["throughput_ratio_on_off"] = on["throughput_rps"] / off["throughput_rps"] if off["throughput_rps"] else None
        report["p50_ratio_on_off"] = on["latency_s"]["p50"] / off["latency_s"]["p50"] if off["latency_s"] else None
    report["samples"] = [asdict(s) for s in samples]
    return report


def markdown(report: Dict[str, object]) -> str:
    lines = [f"Replay of `{report['log']}`: {report['requests']} requests, {report['steps']} steps, "
             + (f"open loop {report['rate']} req/s" if report["rate"] else f"closed loop, concurrency {report['concurrency']}"),
             "", "| cache | throughput (req/s) | hit rate | UNet steps saved | p50 s | p95 s | p99 s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, m in report["modes"].items():
        lat = m["latency_s"]
        lines.append(f"| {mode} | {m['throughput_rps']:.3f} | {m['hit_rate']:.1%} | {m['unet_steps_saved']:.1%} | "
                     f"{lat.get('p50', 0):.3f} | {lat.get('p95', 0):.3f} | {lat.get('p99', 0):.3f} | {m['errors']} |")
    if report.get("throughput_ratio_on_off"):
        lines += ["", f"Throughput cache on / off: **{report['throughput_ratio_on_off']:.2f}x**; "
                      f"p50 latency on / off: {report['p50_ratio_on_off']:.2f}"]
    lines += ["", "Latency by cache result (cache on):", "", "| result | n | p50 s | p95 s | p99 s |", "|---|---|---|---|---|"]
    for status, lat in report["modes"].get("on", {}).get("latency_by_status_s", {}).items():
        lines.append(f"| {status} | {lat['n']} | {lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p99']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in report["samples"] if s["status"] != "error"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label in sorted({(s["mode"], s["status"]) for s in samples}):
        lat = np.sort([s["latency_s"] for s in samples if (s["mode"], s["status"]) == label])
        axes[0].plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"cache {label[0]}: {label[1]}")
    axes[0].set_xlabel("latency (s)")
    axes[0].set_ylabel("CDF")
    axes[0].legend(fontsize=8)
    hist = report["modes"].get("on", {}).get("k_histogram", {})
    axes[1].bar([str(k) for k in hist], list(hist.values()))
    axes[1].set_xlabel("START_STEP (steps skipped)")
    axes[1].set_ylabel("requests")
    modes = list(report["modes"])
    axes[2].bar(modes, [report["modes"][m]["throughput_rps"] for m in modes])
    axes[2].set_ylabel("throughput (req/s)")
    axes[2].set_xlabel("cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="JSON Lines prompt log (prompt, optional seed)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--limit", type=int, help="first N requests of the log")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2, help="closed loop: requests in flight")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second")
    parser.add_argument("--compare", action="store_true", help="alternate cache off / on per chunk")
    parser.add_argument("--chunk", type=int, default=20, help="requests per alternation chunk")
    parser.add_argument("--output", type=Path, default=Path("perf/results/replay"))
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.log.stem
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.output / f"{stem}.md").write_text(markdown(report))
    plot(report, args.output / f"{stem}.png")
    print(markdown(report))
    errors = sum(m["errors"] for m in report["modes"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
