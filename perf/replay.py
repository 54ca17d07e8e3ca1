"""``nirvana-replay``: replay a prompt log against running servers and report what the cache did.

Plain replay (no ``--warmup``): closed loop (``--concurrency N``: N requests in flight) or open
loop (``--rate R``: Poisson arrivals at R requests/s), over gRPC with asyncio. With ``--compare``
the log is cut into chunks and every chunk is sent twice, once with the cache bypassed
(CACHE=false) and once with it on, alternating, so the throughput ratio holds even when the
machine's speed drifts.

Warm-cache replay (``--warmup N``, what ``make perf`` runs): the first N requests of the log are
admitted unmeasured (cache on), then each level measures its own window of the log that follows
(``--window`` requests per level, consecutive windows): closed loops at ``--levels`` concurrencies
and ``open``, a Poisson open loop at ``--open-rate-factor`` times the cache-off throughput measured
at the highest closed level (or ``--rate``). Every chunk of a window is sent to every server
(``--url label=host:port``, one per configuration, e.g. batching=step and batching=execute) with
the cache off and on, the order rotating per chunk, so all configurations see the same drift.
At the ``--probe-levels`` levels every ``--probe-every``-th request repeats a (prompt, seed) of
the warm-up prefix: an exact hit under saturation, reported next to the misses of the same run.

Per configuration and level: throughput on and off, R = on/off, UNet steps saved s, conversion
efficiency E = (1 - 1/R) / s, and p50/p99 latency per cache result (miss, approximate K=..,
exact, coalesced when the server reports COALESCED).

Writes JSON, a Markdown summary and PNG plots under --output.

Examples:
    nirvana-replay perf/data/diffusiondb_sample.jsonl --url 127.0.0.1:8001 --limit 200 --concurrency 2 --compare
    nirvana-replay LOG.jsonl --url step=127.0.0.1:8001 --url execute=127.0.0.1:9001 --warmup 300 --window 300 --levels 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from nirvana_client.client import infer_inputs
from nirvana_perf.simulate import load_log

MODEL = "txt2img"
OUTPUTS = ("IMAGE", "CACHE_STATUS", "START_STEP", "ADMITTED")
OPEN = "open"


@dataclass
class Sample:
    index: int  # row of the log (for a probe: the warm-up row it repeats)
    mode: str  # "on" or "off"
    status: str  # miss / approximate / exact / disabled / error
    start_step: int
    steps: int
    latency_s: float
    sent_at: float
    error: str = ""
    kind: str = "log"  # "log" or "probe" (a repeat of a warm-up request)
    coalesced: bool = False
    server: str = ""
    level: str = ""
    chunk: int = -1


@dataclass(frozen=True)
class Item:
    """One request to send: a log row (or a probe repeating one) with the seed it runs with."""

    index: int
    prompt: str
    seed: int
    kind: str = "log"


def row_seed(row: dict, index: int) -> int:
    """The log's seed, or the row's index: a repeat of a row is then an exact repeat."""
    return int(row["seed"]) % (2**63) if row.get("seed") is not None else index


def items_of(rows: Sequence[dict], indexes: Sequence[int]) -> List[Item]:
    return [Item(i, str(rows[i]["prompt"]), row_seed(rows[i], i)) for i in indexes]


def with_probes(window: List[Item], warmup: List[Item], every: int) -> List[Item]:
    """``window`` with every ``every``-th request a repeat of a warm-up request (spread over it)."""
    if every <= 1 or not warmup:
        return list(window)
    out: List[Item] = []
    stride = max(1, len(warmup) // max(1, len(window) // (every - 1)))
    probes = 0
    for item in window:
        if (len(out) + 1) % every == 0:
            w = warmup[(probes * stride + stride // 2) % len(warmup)]
            out.append(Item(w.index, w.prompt, w.seed, "probe"))
            probes += 1
        out.append(item)
    return out


def _inputs(grpc, prompt: str, seed: int, steps: int, cache: bool):
    return infer_inputs(grpc, {"PROMPT": np.array([[prompt.encode("utf-8")]], dtype=object),
                               "SEED": np.array([[seed]], dtype=np.int64), "STEPS": np.array([[steps]], dtype=np.int32),
                               "CACHE": np.array([[cache]], dtype=bool)})


async def served_outputs(client) -> Tuple[str, ...]:
    """The outputs to request: ours, plus COALESCED when this server's ensemble has it."""
    meta = await client.get_model_metadata(MODEL, as_json=True)
    names = {o["name"] for o in meta.get("outputs", [])}
    return OUTPUTS + (("COALESCED",) if "COALESCED" in names else ())


async def _send(client, grpc, item: Item, steps: int, mode: str, outputs: Sequence[str] = OUTPUTS,
                server: str = "", level: str = "") -> Sample:
    sent = time.perf_counter()
    try:
        # Ask for IMAGE (and ADMITTED) too: Triton skips ensemble steps whose outputs nobody requested.
        result = await client.infer(MODEL, _inputs(grpc, item.prompt, item.seed, steps, mode == "on"),
                                    outputs=[grpc.InferRequestedOutput(n) for n in outputs])
        status = result.as_numpy("CACHE_STATUS").reshape(-1)[0].decode()
        start = int(result.as_numpy("START_STEP").reshape(-1)[0])
        coalesced = result.as_numpy("COALESCED") if "COALESCED" in outputs else None
        coalesced = bool(coalesced is not None and coalesced.reshape(-1)[0])
        return Sample(item.index, mode, status, start, steps, time.perf_counter() - sent, sent, kind=item.kind,
                      coalesced=coalesced, server=server, level=level)
    except Exception as exc:  # noqa: BLE001 - recorded, the replay goes on
        return Sample(item.index, mode, "error", 0, steps, time.perf_counter() - sent, sent, str(exc)[:300],
                      kind=item.kind, server=server, level=level)


async def closed_loop(client, grpc, items: Sequence[Item], steps: int, mode: str, concurrency: int, bar: tqdm,
                      outputs: Sequence[str] = OUTPUTS, server: str = "", level: str = "") -> List[Sample]:
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    out: List[Sample] = []

    async def worker():
        while not queue.empty():
            item = queue.get_nowait()
            out.append(await _send(client, grpc, item, steps, mode, outputs, server, level))
            bar.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def open_loop(client, grpc, items: Sequence[Item], steps: int, mode: str, rate: float, bar: tqdm,
                    seed: int = 0, outputs: Sequence[str] = OUTPUTS, server: str = "",
                    level: str = "") -> List[Sample]:
    rng = random.Random(seed)
    tasks, start = [], time.perf_counter()
    at = 0.0
    for item in items:
        at += rng.expovariate(rate)
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(client, grpc, item, steps, mode, outputs, server, level))
        task.add_done_callback(lambda _t: bar.update())
        tasks.append(task)
    return list(await asyncio.gather(*tasks))


async def run(args) -> Dict[str, object]:
    """Plain replay (cache on, or off/on alternated with ``compare``) against one server."""
    import tritonclient.grpc.aio as grpc

    rows = load_log(args.log, args.limit)
    client = grpc.InferenceServerClient(args.url)
    try:
        if not await client.is_model_ready(MODEL):
            raise RuntimeError(f"model {MODEL} is not ready at {args.url}")
        outputs = await served_outputs(client)
        modes = ("off", "on") if args.compare else ("on",)
        items = items_of(rows, range(len(rows)))
        chunks = [items[i:i + args.chunk] for i in range(0, len(items), args.chunk)]
        samples: List[Sample] = []
        busy = {m: 0.0 for m in modes}
        with tqdm(total=len(rows) * len(modes), desc="replay", unit="req", file=sys.stderr) as bar:
            for n, chunk in enumerate(chunks):
                # Alternate which mode goes first so neither always runs on a warmer machine.
                for mode in (modes if n % 2 == 0 else modes[::-1]):
                    began = time.perf_counter()
                    if args.rate:
                        got = await open_loop(client, grpc, chunk, args.steps, mode, args.rate, bar, seed=n,
                                              outputs=outputs)
                    else:
                        got = await closed_loop(client, grpc, chunk, args.steps, mode, args.concurrency, bar,
                                                outputs=outputs)
                    busy[mode] += time.perf_counter() - began
                    samples += got
    finally:
        await client.close()
    return summarize(samples, busy, args)


def _percentiles(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)} | {"n": len(values)}


def result_class(s: Sample) -> str:
    """miss, approximate K=.., exact, coalesced (or disabled / error)."""
    if s.coalesced:
        return "coalesced"
    if s.status == "approximate":
        return f"approximate K={s.start_step}"
    return s.status


def _class_order(name: str) -> tuple:
    order = ["miss", "approximate", "exact", "exact (probes)", "coalesced", "disabled", "error"]
    base = name.split(" K=")[0]
    k = int(name.split("K=")[1]) if "K=" in name else 0
    return (order.index(base) if base in order else len(order), k, name)


def mode_summary(mine: List[Sample], seconds: float, concurrency: int = 0) -> Dict[str, object]:
    """Throughput, steps saved and latency by cache result of one (configuration, level, cache mode).

    For a closed loop (``concurrency`` c > 0) also the throughput at exactly c requests in flight,
    c / mean latency (Little's law), and the occupancy: the mean number in flight over c. The wall
    clock throughput counts each chunk's drain, when fewer than c requests are left: the drain is
    longer when request lengths differ (cache on: exact hits next to misses), which charges the
    cache for the benchmark's chunking rather than for the server."""
    ok = [s for s in mine if s.status != "error"]
    busy_s = sum(s.latency_s for s in ok)
    statuses = Counter(s.status for s in mine)

    def saved(samples):
        return 1 - sum(s.steps - s.start_step for s in samples) / max(1, sum(s.steps for s in samples))

    by_class: Dict[str, List[float]] = {}
    for s in ok:
        by_class.setdefault(result_class(s), []).append(s.latency_s)
    probes = [s.latency_s for s in ok if s.kind == "probe" and result_class(s) == "exact"]
    if probes:
        by_class["exact (probes)"] = probes
    return {
        "requests": len(mine), "errors": statuses.get("error", 0), "wall_s": seconds,
        "throughput_rps": len(ok) / seconds if seconds else 0.0,
        "throughput_at_c_rps": concurrency * len(ok) / busy_s if concurrency and busy_s else None,
        "occupancy": busy_s / (concurrency * seconds) if concurrency and seconds else None,
        "status_counts": dict(statuses),
        "hit_rate": (statuses.get("approximate", 0) + statuses.get("exact", 0)) / max(1, len(mine)),
        "unet_steps_saved": saved(ok),
        "unet_steps_saved_log_only": saved([s for s in ok if s.kind == "log"]),
        "probes": sum(1 for s in mine if s.kind == "probe"),
        "coalesced": sum(1 for s in ok if s.coalesced),
        "k_histogram": dict(sorted(Counter(s.start_step for s in ok).items())),
        "latency_s": _percentiles([s.latency_s for s in ok]),
        "latency_by_status_s": {st: _percentiles([s.latency_s for s in ok if s.status == st])
                                for st in sorted({s.status for s in ok})},
        "latency_by_class_s": {c: _percentiles(by_class[c]) for c in sorted(by_class, key=_class_order)},
        "errors_sample": sorted({s.error for s in mine if s.status == "error"})[:5],
    }


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def efficiency(r: Optional[float], saved: float) -> Optional[float]:
    """E = (1 - 1/R) / s: the share of the saved UNet steps that became throughput."""
    return (1 - 1 / r) / saved if r and saved > 0 else None


def compare_summary(on: Dict[str, object], off: Dict[str, object]) -> Dict[str, object]:
    """R = throughput on / off, s = UNet steps saved (cache on), E = (1 - 1/R) / s (wall clock, and at
    exactly c in flight for a closed loop); exact vs miss p50."""
    r = _ratio(on["throughput_rps"], off["throughput_rps"])
    r_at_c = _ratio(on.get("throughput_at_c_rps"), off.get("throughput_at_c_rps"))
    s = on["unet_steps_saved"]
    classes = on["latency_by_class_s"]
    miss = classes.get("miss", {}).get("p50")
    exact = classes.get("exact", {}).get("p50")
    return {"R": r, "s": s, "E": efficiency(r, s), "R_at_c": r_at_c, "E_at_c": efficiency(r_at_c, s),
            "miss_p50_s": miss,
            "exact_p50_s": exact, "exact_over_miss": exact / miss if exact is not None and miss else None,
            "p50_ratio_on_off": (on["latency_s"]["p50"] / off["latency_s"]["p50"]
                                 if on["latency_s"] and off["latency_s"] else None)}


def summarize(samples: List[Sample], busy: Dict[str, float], args) -> Dict[str, object]:
    report: Dict[str, object] = {"log": str(args.log), "requests": len({s.index for s in samples}),
                                 "steps": args.steps, "concurrency": args.concurrency, "rate": args.rate,
                                 "modes": {}}
    for mode, seconds in busy.items():
        report["modes"][mode] = mode_summary([s for s in samples if s.mode == mode], seconds)
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
    for status, lat in report["modes"].get("on", {}).get("latency_by_class_s", {}).items():
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


# ---------------------------------------------------------------------------------------------
# Warm-cache replay


def add_warm_replay_arguments(parser: argparse.ArgumentParser, warmup_default: int) -> None:
    """The warm replay's flags, shared by ``nirvana-replay`` and ``make perf`` (nirvana_perf.run_all)."""
    parser.add_argument("--warmup", type=int, default=warmup_default,
                        help="warm replay: requests admitted unmeasured first")
    parser.add_argument("--window", type=int, default=300, help="warm replay: measured requests per level")
    parser.add_argument("--levels", default="1,4,8,open",
                        help="warm replay: closed-loop concurrencies and/or 'open' (Poisson near the cache-off capacity)")
    parser.add_argument("--probe-every", type=int, default=10,
                        help="warm replay: every Nth request at the probe levels repeats a warm-up request (0: none)")
    parser.add_argument("--probe-levels", default="8", help="warm replay: levels with exact-hit probes")
    parser.add_argument("--open-rate-factor", type=float, default=0.9,
                        help="warm replay: open-loop rate = this x the cache-off throughput at the highest closed level")


def warm_replay_options(args: argparse.Namespace) -> Dict[str, object]:
    """Keyword arguments of :func:`warm_replay` from the flags of :func:`add_warm_replay_arguments`."""
    return {"warmup": args.warmup, "window": args.window, "levels": parse_levels(args.levels),
            "probe_every": args.probe_every,
            "probe_levels": parse_levels(args.probe_levels) if args.probe_levels else [],
            "open_rate_factor": args.open_rate_factor}


def parse_levels(text: str) -> List[str]:
    """"1,4,8,open" -> ["1", "4", "8", "open"]: closed-loop concurrencies (in order), then the open loop."""
    levels = [x.strip().lower() for x in str(text).split(",") if x.strip()]
    for level in levels:
        if level != OPEN and not (level.isdigit() and int(level) >= 1):
            raise ValueError(f"level {level!r}: a concurrency >= 1 or 'open'")
    closed = [x for x in levels if x != OPEN]
    return closed + ([OPEN] if OPEN in levels else [])


def default_chunk(level: str) -> int:
    """Requests per on/off chunk: long enough that a closed loop's ramp-up and drain are a small
    part of it (6 rounds of its concurrency), at least 20."""
    return 30 if level == OPEN else max(20, 6 * int(level))


def warm_layout(n_rows: int, warmup: int, window: int, levels: Sequence[str]) -> Tuple[int, int]:
    """(warm-up, window) that fit a log of ``n_rows``: as asked when they fit, else the warm-up takes
    at most half of the log and the windows share the rest."""
    if n_rows < 2:
        raise ValueError("the log needs at least 2 rows")
    if warmup + window * max(1, len(levels)) <= n_rows:
        return warmup, window
    warmup = min(warmup, n_rows // 2)
    window = min(window, (n_rows - warmup) // max(1, len(levels)))
    if window < 1:
        raise ValueError(f"log of {n_rows} rows: no room for windows after a warm-up of {warmup}")
    return warmup, window


async def warm_replay(urls: Dict[str, str], rows: Sequence[dict], *, warmup: int, window: int,
                      levels: Sequence[str], steps: int = 50, chunk: int = 0, probe_every: int = 10,
                      probe_levels: Sequence[str] = ("8",), open_rate: float = 0.0, open_rate_factor: float = 0.9,
                      warmup_concurrency: int = 8, progress: bool = True,
                      after_warmup: Optional[Callable[[], None]] = None) -> Dict[str, object]:
    """Warm every server with the same prefix, then measure each level's window on every server,
    cache off and on, chunk by chunk with the order rotating. See the module docstring.

    ``after_warmup`` is called (blocking) between the warm-up and the first window, e.g. to read
    the servers' statistics."""
    import tritonclient.grpc.aio as grpc

    levels = list(levels)
    asked = (warmup, window)
    warmup, window = warm_layout(len(rows), warmup, window, levels)
    labels = list(urls)
    clients = {label: grpc.InferenceServerClient(url) for label, url in urls.items()}
    samples: List[Sample] = []
    report: Dict[str, object] = {"requests_in_log_read": len(rows), "warmup": warmup, "window": window,
                                 "levels": levels, "steps": steps, "probe_every": probe_every,
                                 "probe_levels": list(probe_levels), "servers": dict(urls), "configs": {},
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if (warmup, window) != asked:
        report["notes"] = [f"the log has {len(rows)} rows: warm-up {warmup} and window {window} instead of "
                           f"{asked[0]} and {asked[1]}"]
    try:
        outputs = {}
        for label, client in clients.items():
            if not await client.is_model_ready(MODEL):
                raise RuntimeError(f"model {MODEL} is not ready at {urls[label]}")
            outputs[label] = await served_outputs(client)
        report["coalesced_reported"] = {label: "COALESCED" in o for label, o in outputs.items()}
        warm_items = items_of(rows, range(warmup))
        # Warm-up: every server at once (unmeasured; the same prefix, cache on).
        began = time.perf_counter()
        with tqdm(total=warmup * len(labels), desc="warm-up", unit="req", file=sys.stderr,
                  disable=not progress) as bar:
            warm = await asyncio.gather(*(closed_loop(clients[label], grpc, warm_items, steps, "on",
                                                      warmup_concurrency, bar, outputs[label], label, "warm-up")
                                          for label in labels))
        report["warmup_s"] = time.perf_counter() - began
        report["warmup_status_counts"] = {label: dict(Counter(s.status for s in got)) for label, got in zip(labels, warm)}
        if after_warmup:
            after_warmup()
        combos = [(label, mode) for label in labels for mode in ("off", "on")]
        busy: Dict[tuple, float] = {}
        for n_level, level in enumerate(levels):
            start = warmup + n_level * window
            items = items_of(rows, range(start, start + window))
            if level in probe_levels:
                items = with_probes(items, warm_items, probe_every)
            rate = 0.0
            if level == OPEN:
                rate = open_rate or _open_rate(report, open_rate_factor)
                if not rate:
                    report.setdefault("notes", []).append("open loop skipped: no closed level measured and no --rate")
                    continue
                report["open_rate_rps"] = rate
            size = chunk or default_chunk(level)
            chunks = [items[i:i + size] for i in range(0, len(items), size)]
            chunk_rps = {combo: [] for combo in combos}
            with tqdm(total=len(items) * len(combos), desc=f"level {level}", unit="req", file=sys.stderr,
                      disable=not progress) as bar:
                for n, part in enumerate(chunks):
                    # Rotate the order so no configuration always runs first or last in a chunk.
                    for label, mode in combos[n % len(combos):] + combos[:n % len(combos)]:
                        t0 = time.perf_counter()
                        if level == OPEN:
                            got = await open_loop(clients[label], grpc, part, steps, mode, rate, bar, seed=n,
                                                  outputs=outputs[label], server=label, level=level)
                        else:
                            got = await closed_loop(clients[label], grpc, part, steps, mode, int(level), bar,
                                                    outputs[label], label, level)
                        spent = time.perf_counter() - t0
                        busy[(label, level, mode)] = busy.get((label, level, mode), 0.0) + spent
                        chunk_rps[(label, mode)].append(sum(s.status != "error" for s in got) / spent)
                        for s in got:
                            s.chunk = n
                        samples += got
            for label in labels:
                cfg = report["configs"].setdefault(label, {})
                per_mode = {mode: mode_summary([s for s in samples if (s.server, s.level, s.mode) == (label, level, mode)],
                                               busy.get((label, level, mode), 0.0),
                                               0 if level == OPEN else int(level)) for mode in ("off", "on")}
                cfg[level] = {**per_mode, **compare_summary(per_mode["on"], per_mode["off"]),
                              **chunk_ratios(chunk_rps[(label, "on")], chunk_rps[(label, "off")],
                                             per_mode["on"]["unet_steps_saved"]),
                              "open_rate_rps": rate or None, "chunk": size}
    finally:
        for client in clients.values():
            await client.close()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["samples"] = [asdict(s) for s in samples]
    return report


def chunk_ratios(on: Sequence[float], off: Sequence[float], saved: float) -> Dict[str, object]:
    """R per chunk (on and off of the same chunk ran back to back): its median and quartiles, a
    check on R when the machine's speed drifts (a shared machine), and E from the median."""
    ratios = [a / b for a, b in zip(on, off) if a and b]
    if not ratios:
        return {"R_per_chunk": [], "R_chunk_median": None, "R_chunk_p25": None, "R_chunk_p75": None,
                "E_chunk_median": None}
    median = float(np.median(ratios))
    return {"R_per_chunk": [round(r, 4) for r in ratios], "R_chunk_median": median,
            "R_chunk_p25": float(np.percentile(ratios, 25)), "R_chunk_p75": float(np.percentile(ratios, 75)),
            "E_chunk_median": efficiency(median, saved)}


def _open_rate(report: Dict[str, object], factor: float) -> float:
    """``factor`` x the lowest cache-off throughput (over configurations) at the highest closed level."""
    best = None
    for cfg in report["configs"].values():
        closed = [lv for lv in cfg if lv != OPEN]
        if closed:
            level = max(closed, key=int)
            value = (int(level), cfg[level]["off"]["throughput_rps"])
            best = value if best is None or value[0] > best[0] or (value[0] == best[0] and value[1] < best[1]) else best
    return factor * best[1] if best and best[1] else 0.0


def _f(value, fmt: str = ".3f", none: str = "—") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _lat(m: Dict[str, object], cls: str, q: str) -> Optional[float]:
    return m["latency_by_class_s"].get(cls, {}).get(q)


def level_name(level: str, cfg_level: Optional[Dict[str, object]] = None) -> str:
    if level == OPEN:
        rate = (cfg_level or {}).get("open_rate_rps")
        return f"open {rate:.2f}/s" if rate else "open"
    return f"c={level}"


def warm_markdown(report: Dict[str, object]) -> str:
    """One table per configuration (throughput, R, s, E; latency per cache result) and a summary."""
    lines = [f"Warm-cache replay: warm-up {report['warmup']} requests (cache on, unmeasured, "
             f"{report.get('warmup_s', 0):.0f}s), then {report['window']} requests per level, {report['steps']} steps; "
             f"cache off and on alternated in chunks on every configuration. Probes (repeats of a warm-up "
             f"request, exact hits) every {report['probe_every']}th request at levels "
             f"{', '.join(report['probe_levels']) or 'none'}. R = throughput on/off; s = UNet steps saved (cache on, "
             f"probes included; log only in brackets); E = (1 - 1/R) / s. Closed loops: \"at c\" is the throughput "
             f"with exactly c requests in flight, c / mean latency (Little's law), and R at c, E at c from it; "
             f"occupancy is the mean number in flight over c. The wall-clock throughput also counts each chunk's "
             f"drain (fewer than c in flight), which is longer with the cache on because request lengths differ: "
             f"compare the occupancies. Open loop: throughput is the offered rate, so R and E say little there; "
             f"read its latencies.", ""]
    for label, cfg in report["configs"].items():
        lines += [f"### {label}", "",
                  "| level | cache | requests | errors | throughput req/s | at c req/s | occupancy | hit rate | s | R | E "
                  "| R at c | E at c | p50 s | p99 s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for level, lv in cfg.items():
            for mode in ("off", "on"):
                m = lv[mode]
                on = mode == "on"
                lines.append(
                    f"| {level_name(level, lv)} | {mode} | {m['requests']} | {m['errors']} | {m['throughput_rps']:.3f} | "
                    f"{_f(m.get('throughput_at_c_rps'))} | {_f(m.get('occupancy'), '.1%')} | "
                    f"{m['hit_rate']:.1%} | " + (f"{m['unet_steps_saved']:.1%} ({m['unet_steps_saved_log_only']:.1%})"
                                                  if on else "") +
                    f" | {_f(lv['R'], '.3f') if on else ''} | {_f(lv['E'], '.2f') if on else ''} | "
                    f"{_f(lv.get('R_at_c'), '.3f') if on else ''} | {_f(lv.get('E_at_c'), '.2f') if on else ''} | "
                    f"{_f(m['latency_s'].get('p50'))} | {_f(m['latency_s'].get('p99'))} |")
        lines += ["", "Latency by cache result (cache on; cache off: every request runs all steps):", "",
                  "| level | result | n | p50 s | p99 s |", "|---|---|---|---|---|"]
        for level, lv in cfg.items():
            for cls, lat in lv["on"]["latency_by_class_s"].items():
                lines.append(f"| {level_name(level, lv)} | {cls} | {lat['n']} | {lat['p50']:.3f} | {lat['p99']:.3f} |")
            off = lv["off"]["latency_s"]
            if off:
                lines.append(f"| {level_name(level, lv)} | (cache off, all) | {off['n']} | {off['p50']:.3f} | {off['p99']:.3f} |")
        errors = {lv: cfg[lv][m]["errors_sample"] for lv in cfg for m in ("off", "on") if cfg[lv][m]["errors_sample"]}
        if errors:
            lines += ["", f"Errors (first of each level): {errors}"]
        lines.append("")
    lines += ["### Side by side", "",
              "R per chunk: on/off throughput of each chunk (run back to back), median [quartiles], and E from "
              "that median: less sensitive than R to a shared machine's speed drifting between chunks.", "",
              "| level | batching | R | s | E | R at c | E at c | miss p50 s | exact p50 s | exact/miss | R per chunk "
              "| E (chunk median) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    levels = list(dict.fromkeys(lv for cfg in report["configs"].values() for lv in cfg))
    for level in levels:
        for label, cfg in report["configs"].items():
            if level in cfg:
                lv = cfg[level]
                lines.append(f"| {level_name(level, lv)} | {label} | {_f(lv['R'])} | {lv['s']:.1%} | {_f(lv['E'], '.2f')} | "
                             f"{_f(lv.get('R_at_c'))} | {_f(lv.get('E_at_c'), '.2f')} | "
                             f"{_f(lv['miss_p50_s'])} | {_f(lv['exact_p50_s'])} | {_f(lv['exact_over_miss'], '.1%')} | "
                             f"{_f(lv.get('R_chunk_median'))} [{_f(lv.get('R_chunk_p25'), '.2f')}–"
                             f"{_f(lv.get('R_chunk_p75'), '.2f')}] | {_f(lv.get('E_chunk_median'), '.2f')} |")
    if report.get("coalesced_reported") and not any(report["coalesced_reported"].values()):
        lines += ["", "No server reports COALESCED: identical in-flight requests count as their own cache result."]
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def warm_plot(report: Dict[str, object], path: Path) -> None:
    """Latency CDF by cache result per configuration at the highest closed level, and R per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["configs"])
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(5 * (len(labels) + 1), 4), squeeze=False)
    samples = [s for s in report["samples"] if s["status"] != "error" and s["level"] != "warm-up"]
    closed = [lv for lv in report["levels"] if lv != OPEN]
    level = max(closed, key=int) if closed else OPEN
    for ax, label in zip(axes[0], labels):
        mine = [s for s in samples if s["server"] == label and s["level"] == level]
        groups: Dict[str, List[float]] = {}
        for s in mine:
            name = "cache off" if s["mode"] == "off" else result_class(Sample(**s)).split(" K=")[0]
            groups.setdefault(name, []).append(s["latency_s"])
        for name, lat in sorted(groups.items()):
            lat = np.sort(lat)
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{name} ({len(lat)})")
        ax.set_xscale("log")
        ax.set_title(f"{label}, level {level}")
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("CDF")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    width = 0.8 / max(1, len(labels))
    levels = list(dict.fromkeys(lv for cfg in report["configs"].values() for lv in cfg))
    for i, label in enumerate(labels):
        cfg = report["configs"][label]
        ax.bar([j + i * width for j in range(len(levels))], [(cfg.get(lv, {}).get("R") or 0) for lv in levels],
               width, label=label)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(levels))], levels)
    ax.set_ylabel("throughput on / off (R)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _urls(values: Sequence[str]) -> Dict[str, str]:
    out = {}
    for i, value in enumerate(values or ["127.0.0.1:8001"]):
        label, _, url = value.rpartition("=")
        out[label or (f"server{i + 1}" if len(values) > 1 else "server")] = url
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="JSON Lines prompt log (prompt, optional seed)")
    parser.add_argument("--url", action="append", default=[],
                        help="gRPC host:port (default 127.0.0.1:8001); warm replay: repeat as LABEL=host:port")
    parser.add_argument("--limit", type=int, help="first N requests of the log")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2, help="closed loop: requests in flight")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: Poisson arrivals per second (warm replay: the open level's rate)")
    parser.add_argument("--compare", action="store_true", help="alternate cache off / on per chunk")
    parser.add_argument("--chunk", type=int, default=0,
                        help="requests per alternation chunk (0: 20; warm replay: 6 x concurrency, at least 20)")
    add_warm_replay_arguments(parser, warmup_default=0)  # --warmup N > 0 selects the warm replay
    parser.add_argument("--output", type=Path, default=Path("perf/results/replay"))
    args = parser.parse_args(argv)
    urls = _urls(args.url)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.log.stem
    if args.warmup:
        options = warm_replay_options(args)
        rows = load_log(args.log, args.limit or args.warmup + args.window * len(options["levels"]))
        report = asyncio.run(warm_replay(urls, rows, steps=args.steps, chunk=args.chunk, open_rate=args.rate,
                                         **options))
        report["log"] = str(args.log)
        text = warm_markdown(report)
        (args.output / f"{stem}.warm.json").write_text(json.dumps(report, indent=1))
        (args.output / f"{stem}.warm.md").write_text(text)
        warm_plot(report, args.output / f"{stem}.warm.png")
        print(text)
        errors = sum(lv[m]["errors"] for cfg in report["configs"].values() for lv in cfg.values() for m in ("off", "on"))
        return 1 if errors else 0
    if len(urls) != 1:
        parser.error("a plain replay takes one --url")
    args.url = next(iter(urls.values()))
    args.chunk = args.chunk or 20
    report = asyncio.run(run(args))
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.output / f"{stem}.md").write_text(markdown(report))
    plot(report, args.output / f"{stem}.png")
    print(markdown(report))
    errors = sum(m["errors"] for m in report["modes"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
