"""Crash trials: kill -9 the server at random moments under load, restart it, count what came back.

One server per ``appendfsync`` mode, persisting its latent cache under a fresh snapshot folder.
Each trial runs a closed loop of misses (unique prompts, ``--concurrency`` requests in flight,
``--steps`` steps) against it, waits for the first acknowledged admission plus a random delay,
then SIGKILLs the whole server process group (tritonserver and its Python-backend stubs) and
restarts a server on the same snapshot folder. That restarted server is asked again for every
request acknowledged before the kill (a response received with ADMITTED > 0): it is *restored*
when it comes back as an exact hit with the very same image, else *lost*. The restarted server
then carries the next trial's load, so restores pile journal segments and snapshots on top of
each other the way repeated crashes do. After the last trial every acknowledged request of every
trial of the mode is asked for once more (a later restore must not lose what an earlier kept).

What to expect: with ``always`` an admission is acknowledged only once its journal record is
fsynced, so nothing acknowledged may be lost. With ``everysec`` the acknowledgement does not wait
for the journal at all: a kill -9 loses what the journal writer had not yet handed to the OS
(what was written survives a process crash even unfsynced; the fsync matters for power loss),
and the promise checked is "nothing acknowledged more than about a second before the kill".

The tests (tests/integration/test_crash_recovery.py) import the helpers below and run a short
version of the same trial.

Example:
    python -m nirvana_perf.crash_trials --trials 20 --modes always,everysec --output perf/results/crash_trials
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nirvana.tritonserver import TritonServer
from nirvana_client import Txt2ImgClient
from nirvana_export.repository import repository_variant

MODES = ("always", "everysec", "off")
RECENT_S = 1.0  # "lost within the last second": acknowledged at most this long before the kill

SAMPLE_LOG = Path(__file__).resolve().parent / "data" / "diffusiondb_sample.jsonl"
_FALLBACK_WORDS = ("lighthouse", "teapot", "locomotive", "violin", "jellyfish", "cathedral", "robot", "sunflower",
                   "submarine", "owl", "caravan", "bonsai", "balloon", "glacier", "samurai", "ramen", "windmill",
                   "octopus", "leopard", "typewriter", "volcano", "pond", "station", "bicycle", "tiger", "pagoda",
                   "jukebox", "waterfall", "chess", "dawn", "rain", "aurora", "moon", "neon", "crystal", "market",
                   "pier", "meadow", "sandstorm", "forest", "watercolor", "charcoal", "isometric", "ukiyo",
                   "polaroid", "stained", "nouveau", "poster", "marble", "copper")
_words: List[str] = []


def prompt_words() -> List[str]:
    """The words prompts are made of: those of the committed DiffusionDB sample (about 6,800)."""
    if not _words:
        found = set()
        try:
            for line in SAMPLE_LOG.read_text(encoding="utf-8").splitlines():
                found.update(w.lower() for w in re.findall(r"[A-Za-z]{4,12}", json.loads(line).get("prompt", "")))
        except (OSError, ValueError):
            pass
        _words.extend(sorted(found) if len(found) >= 1000 else _FALLBACK_WORDS)
    return _words


def unique_prompt(rng: random.Random, tag: str) -> str:
    """Six random words and ``tag`` (which makes the prompt unique). Two such prompts are seldom
    close enough for an approximate hit (the nearest of 400 has median cosine similarity 0.38 with
    the embedded all-MiniLM-L6-v2 key, none reaches the lowest threshold, 0.72): the load is misses."""
    return " ".join(rng.sample(prompt_words(), 6)) + f" ({tag})"


@dataclass
class Ack:
    """A request whose response arrived: the admission it reports is acknowledged."""

    prompt: str
    seed: int
    steps: int
    status: str  # the cache status of the original request (miss, approximate)
    admitted: int  # states the admission stored (ADMITTED)
    sent_at: float  # time.monotonic()
    acked_at: float  # time.monotonic() when the response was received
    image: np.ndarray = field(repr=False)


@dataclass
class Failure:
    prompt: str
    seed: int
    sent_at: float
    failed_at: float
    error: str


class MissLoad:
    """A closed loop of unique-prompt requests, ``concurrency`` in flight, over gRPC.

    Every response is recorded as an :class:`Ack` (``acks``, in arrival order); every error as
    a :class:`Failure`. A worker stops at its first error once :meth:`stop` was called (after
    a kill every in-flight request fails), else after ``max_errors`` errors in a row.
    """

    def __init__(self, url: str, concurrency: int = 2, steps: int = 6, tag: str = "load", seed: int = 0,
                 timeout_s: float = 120.0, max_errors: int = 3):
        self.url, self.concurrency, self.steps, self.tag = url, concurrency, steps, tag
        self.timeout_s, self.max_errors = timeout_s, max_errors
        self.rng = random.Random(seed)
        self.acks: List[Ack] = []
        self.failures: List[Failure] = []
        self.started_at = 0.0
        self.first_ack = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._count = 0

    def _next(self, worker: int):
        with self._lock:
            self._count += 1
            return unique_prompt(self.rng, f"{self.tag}-{worker}-{self._count}"), self.rng.randrange(2**31)

    def _worker(self, worker: int) -> None:
        errors = 0
        with Txt2ImgClient(self.url, "grpc", timeout_s=self.timeout_s) as client:
            while not self._stop.is_set():
                prompt, seed = self._next(worker)
                sent = time.monotonic()
                try:
                    result = client.generate(prompt, seed=seed, steps=self.steps)
                except Exception as exc:  # noqa: BLE001 - a kill fails every request in flight
                    self.failures.append(Failure(prompt, seed, sent, time.monotonic(), f"{type(exc).__name__}: {exc}"))
                    errors += 1
                    if self._stop.is_set() or errors >= self.max_errors:
                        return
                    time.sleep(0.2)
                    continue
                errors = 0
                self.acks.append(Ack(prompt, seed, self.steps, result.cache_status, result.admitted, sent,
                                     time.monotonic(), result.image))
                self.first_ack.set()

    def start(self) -> "MissLoad":
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._worker, args=(w,), name=f"miss-load-{w}", daemon=True)
                         for w in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Ask the workers to stop (each finishes or fails its request in flight)."""
        self._stop.set()

    def join(self, timeout: float = 120.0) -> bool:
        """Wait for the workers; False when one is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def admissions(self) -> List[Ack]:
        """The acknowledged admissions (responses with ADMITTED > 0)."""
        return [a for a in self.acks if a.admitted > 0]


SHM_PREFIX = "triton_python_backend_shm_region_"


def shm_regions(pgid: int) -> List[str]:
    """The shared-memory regions of the Python-backend stubs in process group ``pgid`` (each stub
    gets its region's name on its command line)."""
    names = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        names.update(a.decode() for a in args if a.startswith(SHM_PREFIX.encode()))
    return sorted(names)


def sigkill(server: TritonServer) -> float:
    """kill -9 the server's whole process group (tritonserver and its Python-backend stubs: it
    was started in a session of its own, so its pid is the group id); returns time.monotonic()
    just before the signal. The shared-memory regions of its stubs, which a killed server leaves
    in /dev/shm, are removed."""
    pgid = os.getpgid(server.process.pid)
    assert pgid == server.process.pid, "TritonServer starts the server as the leader of its own group"
    regions = shm_regions(pgid)
    killed_at = time.monotonic()
    os.killpg(pgid, signal.SIGKILL)
    server.process.wait(timeout=60)
    deadline = time.monotonic() + 10  # the stubs are the server's children: gone with it, or nearly
    while shm_regions(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name in regions:
        for path in Path("/dev/shm").glob(f"{name}*"):
            path.unlink(missing_ok=True)
    return killed_at


def kill_under_load(server: TritonServer, load: MissLoad, rng: random.Random, spread_s: float,
                    min_delay_s: float = 0.0, first_ack_timeout_s: float = 300.0) -> float:
    """Start ``load``, wait for its first acknowledged request plus a uniform random delay in
    [``min_delay_s``, ``min_delay_s + spread_s``), SIGKILL the server; returns the kill's
    time.monotonic(). The load's workers are stopped and joined."""
    load.start()
    if not load.first_ack.wait(first_ack_timeout_s):
        load.stop()
        raise TimeoutError(f"no response within {first_ack_timeout_s:.0f}s of the load's start; "
                           f"failures: {load.failures[:3]}")
    time.sleep(min_delay_s + rng.uniform(0.0, spread_s))
    try:
        killed_at = sigkill(server)
    finally:
        load.stop()
    if not load.join(timeout=180):
        raise RuntimeError("a load worker hung after the server was killed")
    return killed_at


@dataclass
class Check:
    """How an acknowledged request came back after a restart."""

    ack: Ack
    status: str  # cache status of the repeat ("error: ..." when it failed)
    same_image: bool

    @property
    def restored(self) -> bool:
        return self.status == "exact" and self.same_image


def check_restored(url: str, acks: Sequence[Ack], concurrency: int = 2, timeout_s: float = 120.0) -> List[Check]:
    """Ask ``url`` again for each of ``acks`` (same prompt, seed, steps); in the order given."""

    def one(ack: Ack) -> Check:
        with Txt2ImgClient(url, "grpc", timeout_s=timeout_s) as client:
            try:
                result = client.generate(ack.prompt, seed=ack.seed, steps=ack.steps)
            except Exception as exc:  # noqa: BLE001 - reported as the status
                return Check(ack, f"error: {type(exc).__name__}: {exc}", False)
        return Check(ack, result.cache_status, bool(np.array_equal(result.image, ack.image)))

    if not acks:
        return []
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, acks))


def restore_reports(log_text: str) -> List[Dict[str, object]]:
    """The restore reports latent_cache logged ("latent_cache restored ... {report}"), oldest first."""
    reports = []
    for line in log_text.splitlines():
        at = line.find("latent_cache restored")
        if at < 0:
            continue
        text = line[line.find("{", at):line.rfind("}") + 1]  # Triton quotes the message
        for candidate in (text, text.replace('\\"', '"')):  # and may escape the quotes inside it
            try:
                reports.append(ast.literal_eval(candidate))
                break
            except (ValueError, SyntaxError):
                continue
        else:
            reports.append({"unparsed": line[at:]})
    return reports


def distinct_ports(n: int = 3) -> List[int]:
    """``n`` free ports, all different (:func:`nirvana.tritonserver.free_port` called twice in a row
    can return the same port, and tritonserver refuses HTTP and metrics on one port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:  # held open together: the kernel cannot hand out one port twice
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def server_on(variant: Path, log_file: Path) -> TritonServer:
    """A :class:`TritonServer` over ``variant`` on three distinct free ports (not started)."""
    http, grpc, metrics = distinct_ports(3)
    return TritonServer(variant, http, grpc, metrics, log_file=log_file)


def persistent_variant(repository: Path, dest: Path, snapshot_path: Path, appendfsync: str,
                       snapshot_interval_s: float) -> Path:
    """A copy of ``repository`` whose latent_cache persists under ``snapshot_path``."""
    return repository_variant(repository, dest, {"latent_cache": {
        "snapshot_path": str(snapshot_path), "appendfsync": appendfsync,
        "snapshot_interval_s": f"{snapshot_interval_s:g}"}})


def close_server(server: Optional[TritonServer]) -> None:
    """Stop ``server`` (whatever is left of its group) and remove its work folder."""
    if server is not None:
        server.__exit__(None, None, None)


@dataclass
class TrialResult:
    mode: str
    trial: int
    seconds_into_load: float
    acknowledged: int  # admissions acknowledged before the kill
    approximate: int  # of those, requests that were approximate hits (the rest: misses)
    restored: int
    lost: int
    lost_recent: int  # lost, acknowledged at most RECENT_S before the kill
    lost_older: int
    in_flight: int  # requests the kill failed
    restart_s: float  # from the restart to ready (restore included)
    journal_records: int  # what the restore replayed
    restore_problems: int
    lost_detail: List[str] = field(default_factory=list)


def summarize(mode: str, trial: int, load: MissLoad, killed_at: float, checks: Sequence[Check], restart_s: float,
              report: Dict[str, object]) -> TrialResult:
    lost = [c for c in checks if not c.restored]
    recent = [c for c in lost if killed_at - c.ack.acked_at <= RECENT_S]
    return TrialResult(
        mode=mode, trial=trial, seconds_into_load=killed_at - load.started_at, acknowledged=len(checks),
        approximate=sum(c.ack.status == "approximate" for c in checks), restored=len(checks) - len(lost),
        lost=len(lost), lost_recent=len(recent), lost_older=len(lost) - len(recent),
        in_flight=len([f for f in load.failures if f.failed_at >= killed_at]), restart_s=restart_s,
        journal_records=int(report.get("journal_records", 0) or 0),
        restore_problems=len(report.get("problems", []) or []),
        lost_detail=[f"{c.ack.prompt!r} seed {c.ack.seed}: {c.status}, same image {c.same_image}, acknowledged "
                     f"{killed_at - c.ack.acked_at:.3f}s before the kill" for c in lost])


def run_mode(repository: Path, mode: str, trials: int, rng: random.Random, workdir: Path, *, steps: int = 6,
             concurrency: int = 2, spread_s: float = 8.0, snapshot_interval_s: float = 2.0,
             progress=None) -> Dict[str, object]:
    """``trials`` kills under load on one snapshot folder (see the module docstring)."""
    snapshots = workdir / f"{mode}-cache"
    variant = persistent_variant(repository, workdir / f"{mode}-repo", snapshots, mode, snapshot_interval_s)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: List[TrialResult] = []
    everything: List[Ack] = []
    server = server_on(variant, logs / f"{mode}-00.log").start()
    try:
        for trial in range(1, trials + 1):
            load = MissLoad(server.grpc_url, concurrency, steps, tag=f"{mode}-t{trial}-{rng.randrange(10**6)}",
                            seed=rng.randrange(2**31))
            killed_at = kill_under_load(server, load, rng, spread_s)
            close_server(server)
            server = None
            acked = load.admissions()  # responses that arrived: the server sent them before it died
            began = time.monotonic()
            log = logs / f"{mode}-{trial:02d}.log"
            server = server_on(variant, log).start()
            restart_s = time.monotonic() - began
            reports = restore_reports(log.read_text(errors="replace"))
            checks = check_restored(server.grpc_url, acked, concurrency)
            everything += acked
            results.append(summarize(mode, trial, load, killed_at, checks, restart_s, reports[-1] if reports else {}))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(mode=mode, acked=len(acked), lost=results[-1].lost)
        final = check_restored(server.grpc_url, everything, concurrency)
    finally:
        close_server(server)
    return {"mode": mode, "trials": results,
            "final_check": {"acknowledged": len(final), "restored": sum(c.restored for c in final),
                            "lost": [f"{c.ack.prompt!r} seed {c.ack.seed}: {c.status}" for c in final if not c.restored]}}


def markdown(runs: Sequence[Dict[str, object]], settings: Dict[str, object]) -> str:
    lines = ["# Crash trials: kill -9 under load, restart, what came back", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             f"*lost ≤{RECENT_S:g}s*: acknowledged at most {RECENT_S:g} s before the kill; *older*: earlier. "
             "*in flight*: requests the kill failed (never acknowledged, not checked). "
             "*approx. hits*: acknowledged requests that started from a cached state (the rest were misses). "
             "*restart*: seconds from the restart to ready, restore included.", ""]
    for run in runs:
        trials: List[TrialResult] = run["trials"]
        lines += [f"## appendfsync={run['mode']}", "",
                  "| trial | seconds into load | acknowledged before kill | restored | lost | lost ≤1s | lost older "
                  "| approx. hits | in flight | restart s | journal records replayed | restore problems |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in trials:
            lines.append(f"| {t.trial} | {t.seconds_into_load:.2f} | {t.acknowledged} | {t.restored} | {t.lost} | "
                         f"{t.lost_recent} | {t.lost_older} | {t.approximate} | {t.in_flight} | {t.restart_s:.1f} | "
                         f"{t.journal_records} | {t.restore_problems} |")
        total = lambda name: sum(getattr(t, name) for t in trials)  # noqa: E731
        lines.append(f"| **all** | | **{total('acknowledged')}** | **{total('restored')}** | **{total('lost')}** | "
                     f"{total('lost_recent')} | {total('lost_older')} | {total('approximate')} | {total('in_flight')} "
                     "| | | |")
        final = run["final_check"]
        lines += ["", f"After the last restart, {final['restored']} of {final['acknowledged']} admissions "
                      f"acknowledged over all {len(trials)} trials are exact hits with the same image.", ""]
        details = [d for t in trials for d in t.lost_detail] + list(final["lost"])
        if details:
            lines += ["Lost:", ""] + [f"- {d}" for d in details] + [""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nirvana_perf.crash_trials",
        description="kill -9 a tritonserver at random moments under a load of misses, restart it on the same "
                    "snapshot folder, and count the acknowledged admissions that come back (exact hit, same image).")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="the exported repository")
    parser.add_argument("--trials", type=int, default=20, help="kills per mode (default 20)")
    parser.add_argument("--modes", default="always,everysec", help="appendfsync modes, comma-separated "
                                                                    "(always, everysec, off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and prompts")
    parser.add_argument("--output", type=Path, default=Path("perf/results/crash_trials"),
                        help="folder for crash_trials.md, crash_trials.json and the server logs")
    parser.add_argument("--steps", type=int, default=6, help="steps per request (default 6)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight (default 2)")
    parser.add_argument("--spread", type=float, default=8.0,
                        help="the kill comes after the first response plus uniform [0, SPREAD) seconds (default 8)")
    parser.add_argument("--snapshot-interval", type=float, default=2.0,
                        help="latent_cache snapshot_interval_s: kills also land in compactions (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the snapshot folders and repository copies")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: each of {', '.join(MODES)}")
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if not (args.repository / ".exported").exists():
        print(f"{args.repository} is not exported: run `make export`", file=sys.stderr)
        return 1
    from tqdm import tqdm

    args.output.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nirvana-crash-"))
    settings = {"trials": args.trials, "steps": args.steps, "concurrency": args.concurrency, "seed": args.seed,
                "spread_s": args.spread, "snapshot_interval_s": args.snapshot_interval}
    rng = random.Random(args.seed)
    runs = []
    began = time.monotonic()
    try:
        with tqdm(total=args.trials * len(modes), desc="kills", unit="kill", file=sys.stderr) as bar:
            for mode in modes:
                runs.append(run_mode(args.repository, mode, args.trials, rng, workdir, steps=args.steps,
                                     concurrency=args.concurrency, spread_s=args.spread,
                                     snapshot_interval_s=args.snapshot_interval, progress=bar))
    finally:
        if (workdir / "logs").exists():
            shutil.copytree(workdir / "logs", args.output / "logs", dirs_exist_ok=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    settings["wall_s"] = round(time.monotonic() - began)
    text = markdown(runs, settings)
    (args.output / "crash_trials.md").write_text(text)
    (args.output / "crash_trials.json").write_text(json.dumps(
        {"settings": settings, "runs": [{"mode": r["mode"], "final_check": r["final_check"],
                                         "trials": [asdict(t) for t in r["trials"]]} for r in runs]}, indent=2))
    print(text)
    failed = any(t.lost for r in runs if r["mode"] == "always" for t in r["trials"]) or \
        any(t.lost_older for r in runs for t in r["trials"] if r["mode"] == "everysec") or \
        any(r["final_check"]["lost"] for r in runs if r["mode"] == "always")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
