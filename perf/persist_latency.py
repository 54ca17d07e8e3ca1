"""``nirvana-persist-bench``: request latency of the latent_cache model while its cache is persisted.

Drives the model's own handlers (:class:`nirvana.cache_step.CacheStep`, as the Triton adapter
does) in one process, like the Python-backend stub: an open loop of requests, each a lookup
and then the admission of its states, against a cache pre-filled with ``--states`` states of
``--latent-shape`` (default SD 1.5 at 512 px: 4x64x64), while the cache is persisted every
``--interval`` seconds. Configurations, side by side in one run:

* ``none``: no persistence (the floor);
* ``inline``: the whole snapshot written inside the request path when due (what the model did
  before the journal: every request waited for it);
* ``journal-<appendfsync>``: the journal (``always``, ``everysec``) plus background compaction
  (what the model does now).

Reports p50/p99/max latency of admissions and lookups, snapshots written and their duration.

Example:
    python -m nirvana_perf.persist_latency --states 10000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from tqdm import tqdm

from nirvana.cache_step import CacheStep
from nirvana.config import CacheConfig, PipelineSpec

CONFIGS = ("none", "inline", "journal-everysec", "journal-always")


def _request(spec: PipelineSpec, rng: np.random.Generator, n: int, shape, save_steps) -> Dict[str, np.ndarray]:
    """The inputs of one request's lookup (admission adds CHECKPOINTS etc.)."""
    embedding = rng.standard_normal((1, spec.embedding_dim)).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    return {"POOLED_EMBEDDING": embedding, "PROMPT": np.array([[f"bench prompt {n}".encode()]], dtype=object),
            "NEGATIVE_PROMPT": None, "SEED": np.array([[n]], np.int64), "STEPS": np.array([[50]], np.int32),
            "GUIDANCE_SCALE": np.array([[7.5]], np.float32), "TENANT": None, "CACHE": None, "START_STEP": None,
            "CHECKPOINTS": None, "CHECKPOINT_STEPS": None, "FINAL_LATENTS": None, "COMMAND": None, "COALESCED": None}


def _admission(lookup: Dict[str, np.ndarray], shape, save_steps) -> Dict[str, np.ndarray]:
    width = len(save_steps)
    states = np.random.default_rng(int(lookup["SEED"][0, 0])).standard_normal((1, width, *shape)).astype(np.float32)
    return {**lookup, "START_STEP": np.zeros((1, 1), np.int32), "CHECKPOINTS": states,
            "CHECKPOINT_STEPS": np.array([save_steps], np.int32), "FINAL_LATENTS": states[:, -1]}


def _pct(values: List[float]) -> Dict[str, float]:
    if not values:
        return {}
    return {"p50_ms": 1e3 * float(np.percentile(values, 50)), "p99_ms": 1e3 * float(np.percentile(values, 99)),
            "max_ms": 1e3 * max(values), "n": len(values)}


def run_config(name: str, directory: Path, states: int, shape, seconds: float, interval: float,
               host_bytes: int, rate: float, progress: bool = True) -> Dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix=f"nirvana-persist-{name}-"))
    persist = name != "none"
    appendfsync = name.split("-", 1)[1] if name.startswith("journal-") else "everysec"
    # inline: no background compaction (interval < 0); the request path compacts when due.
    config = CacheConfig(host_bytes=host_bytes, snapshot_path=str(root) if persist else "",
                         snapshot_interval_s=interval if name.startswith("journal") else -1, appendfsync=appendfsync)
    step = CacheStep(directory, config)
    spec, save_steps = step.spec, list(step.cache.save_steps(50))
    rng = np.random.default_rng(0)
    per_request = len(save_steps) + 1  # checkpoints + final latents
    fill = states // per_request
    with tqdm(total=fill, desc=f"{name}: fill", unit="entry", disable=not progress, file=sys.stderr) as bar:
        for n in range(fill):
            step.execute([_admission(_request(spec, rng, n, shape, save_steps), shape, save_steps)])
            bar.update()
    if persist:
        step.persistence.compact()  # start from a snapshot of the full cache, like a warm server
    lookups: List[float] = []
    admissions: List[float] = []
    inline_snapshots: List[float] = []
    last = time.monotonic()
    n = fill
    began = time.perf_counter()
    # Open loop: request i is due at began + i/rate and its latency counts from then, so a stall
    # delays every request due while it lasts (a closed loop would hide it: coordinated omission).
    with tqdm(total=int(seconds), desc=f"{name}: load", unit="s", disable=not progress, file=sys.stderr) as bar:
        i = 0
        while (due := began + i / rate) < began + seconds:
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            request = _request(spec, rng, n, shape, save_steps)
            t0 = time.perf_counter()
            step.execute([request])
            t1 = time.perf_counter()
            if name == "inline" and time.monotonic() - last >= interval:  # the old path: inside execute
                step.persistence.compact()
                last = time.monotonic()
                inline_snapshots.append(time.perf_counter() - t1)
            step.execute([_admission(request, shape, save_steps)])
            t2 = time.perf_counter()
            lookups.append(t1 - due)  # queueing behind a stall included
            admissions.append(t2 - t1)
            n += 1
            i += 1
            if int(t2 - began) > bar.n:
                bar.update(min(int(seconds), int(t2 - began)) - bar.n)
    persistence = step.persistence.stats() if persist else {}
    step.close()
    return {"config": name, "states_at_start": fill * per_request, "requests": len(lookups),
            "lookup": _pct(lookups), "admission": _pct(admissions),
            "request": _pct([a + b for a, b in zip(lookups, admissions)]),
            "snapshots": persistence.get("compactions", 0), "last_snapshot": persistence.get("last_compaction", {}),
            "inline_snapshot_s": _pct(inline_snapshots)}


def run(repository: Path, states: int = 10_000, shape=(4, 64, 64), seconds: float = 30.0, interval: float = 10.0,
        rate: float = 20.0, configs=CONFIGS, output: Path = None, progress: bool = True) -> Dict[str, object]:
    """Every configuration in turn; writes persist_latency.{json,md} under ``output`` when given."""
    directory = Path(repository) / "latent_cache" / "1"
    if not (directory / "pipeline.json").exists():
        raise FileNotFoundError(f"{directory} is not exported; run `make export`")
    state_bytes = 2 * int(np.prod(shape))
    host_bytes = 2 * (states + 4000) * state_bytes * 2  # room for the fill and the load, fp32 finals included
    results = [run_config(name, directory, states, shape, seconds, interval, host_bytes, rate, progress)
               for name in configs]
    report = {"states": states, "latent_shape": list(shape), "seconds": seconds, "interval_s": interval,
              "rate": rate, "results": results}
    report["markdown"] = markdown(report)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "persist_latency.json").write_text(json.dumps(report, indent=1))
        (output / "persist_latency.md").write_text(report["markdown"])
    return report


def markdown(report: Dict[str, object]) -> str:
    results = report["results"]
    lines = [f"Request latency while persisting (latent_cache handlers in-process): {results[0]['states_at_start']} "
             f"states of {'x'.join(map(str, report['latent_shape']))} fp16 at the start, open loop of lookup + "
             f"admission at {report['rate']:g} requests/s (latency from when each was due) for "
             f"{report['seconds']:.0f}s per configuration, a snapshot due every {report['interval_s']:.0f}s. "
             f"inline: the snapshot written inside the request path (before the journal); journal-*: journal "
             f"plus background compaction (now).", "",
             "| configuration | requests | request p50 ms | request p99 ms | request max ms | admission p99 ms | "
             "snapshots | snapshot capture s | snapshot write s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r["last_snapshot"] or {}
        inline = r["inline_snapshot_s"] or {}
        write_s = last.get("write_seconds", 0) if not inline else inline.get("max_ms", 0) / 1e3
        lines.append(f"| {r['config']} | {r['requests']} | {r['request'].get('p50_ms', 0):.2f} | "
                     f"{r['request'].get('p99_ms', 0):.2f} | {r['request'].get('max_ms', 0):.1f} | "
                     f"{r['admission'].get('p99_ms', 0):.2f} | {r['snapshots']} | "
                     f"{last.get('capture_seconds', 0):.3f} | {write_s:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-persist-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--states", type=int, default=10_000, help="states in the cache before the load")
    parser.add_argument("--latent-shape", type=lambda t: tuple(int(x) for x in t.split("x")), default=(4, 64, 64),
                        help="shape of one state (default %(default)s: SD 1.5 at 512 px)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load per configuration")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between snapshots")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="requests per second (open loop: latency counts from when a request was due)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--output", type=Path, default=Path("perf/results/persist_latency"))
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        report = run(args.model_repository, args.states, args.latent_shape, args.seconds, args.interval, args.rate,
                     names, args.output)
    except FileNotFoundError as exc:
        print(f"nirvana-persist-bench: {exc}", file=sys.stderr)
        return 1
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
