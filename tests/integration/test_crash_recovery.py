"""Crash recovery of the persistent latent cache against a real tritonserver.

* ``nirvana-serve --cache-dir`` (what ``make serve`` runs) stopped with SIGTERM and started again
  serves the same prompts as exact hits with the same images;
* a damaged CURRENT, manifest or state shard: the restarted server says why in its log and
  serves what survives (the previous snapshot, or nothing);
* kill -9 under a load of misses: every admission acknowledged with ``appendfsync=always``
  comes back; with ``everysec`` everything acknowledged more than ~1.5 s before the kill.

The kill trials share their helpers with ``perf/crash_trials.py`` (``nirvana_perf.crash_trials``),
which runs the long version. Kill moments are random: set CRASH_TEST_SEED to replay a failure
(the seed is in every assertion message).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nirvana_client import Txt2ImgClient
from nirvana_perf.crash_trials import (MissLoad, check_restored, close_server, distinct_ports, kill_under_load,
                                       persistent_variant, restore_reports, server_on)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("CRASH_TEST_SEED", time.time_ns() % 2**31))
# Far apart, so that one is never an approximate hit for the other once it is lost.
PROMPTS = ["a paper lantern floating over a dark lake", "a steam locomotive crossing a stone bridge in snow",
           "a bowl of ramen on a wooden counter, overhead photo"]


# -- nirvana-serve (make serve) -------------------------------------------------------------------------

def _start_serve(repository: Path, cache_dir: Path, log_path: Path):
    """``nirvana-serve`` as ``make serve`` runs it (from the checkout, offline), on free ports."""
    http, grpc, metrics = distinct_ports(3)
    serve = Path(sys.executable).parent / "nirvana-serve"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(serve), "--model-repository", str(repository), "--http-port", str(http),
                                 "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                 "--cache-dir", str(cache_dir)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"


def _wait_ready(proc: subprocess.Popen, http_url: str, log_path: Path, timeout: float = 400.0) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(http_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"nirvana-serve exited with {proc.returncode}:\n{_tail(log_path)}"
            try:
                if client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
    finally:
        client.close()
    pytest.fail(f"nirvana-serve not ready after {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_leftovers(proc: subprocess.Popen) -> None:
    """After a failure: nirvana-serve and the server group it started (only these processes)."""
    if proc.poll() is not None:
        return
    try:
        servers = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        servers = []
    proc.kill()
    proc.wait(30)
    for server in servers:  # started with start_new_session: each leads its own group
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(1000)
def test_nirvana_serve_sigterm_then_restart_serves_exact_hits(repository, tmp_path):
    cache_dir = tmp_path / "cache"
    log_path = tmp_path / "serve.log"
    before = {}
    for run in ("first", "second"):
        proc, http_url, grpc_url = _start_serve(repository, cache_dir, log_path)
        try:
            _wait_ready(proc, http_url, log_path)
            with Txt2ImgClient(grpc_url, "grpc", timeout_s=120) as client:
                results = {p: client.generate(p, seed=21 + i, steps=10) for i, p in enumerate(PROMPTS)}
            if run == "first":
                assert [r.cache_status for r in results.values()] == ["miss"] * len(PROMPTS)
                assert all(r.admitted > 0 for r in results.values())
                before = results
            else:
                assert [r.cache_status for r in results.values()] == ["exact"] * len(PROMPTS), _tail(log_path)
                for prompt, result in results.items():
                    assert (result.image == before[prompt].image).all(), prompt
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"nirvana-serve still running 120s after SIGTERM:\n{_tail(log_path)}")
            assert code == 128 + signal.SIGTERM, _tail(log_path)
        finally:
            _stop_leftovers(proc)
        if run == "first":  # the clean shutdown wrote a final snapshot into the cache dir
            assert (cache_dir / "CURRENT").exists(), sorted(p.name for p in cache_dir.iterdir())
    assert "latent_cache restored" in log_path.read_text(errors="replace")


# -- damaged snapshots ----------------------------------------------------------------------------------

def _complete_snapshots(root: Path):
    """{snapshot name: prompts in it}, oldest first (only complete ones, read from entries.json)."""
    out = {}
    for folder in sorted(p for p in root.glob("snap-*") if p.is_dir() and not p.name.endswith(".partial")):
        try:
            entries = json.loads((folder / "entries.json").read_text())["entries"]
        except (OSError, ValueError, KeyError):
            continue
        out[folder.name] = {e["key"]["prompt"] for e in entries}
    return out


def _wait_for_snapshot_with(root: Path, prompts, timeout: float = 60.0) -> str:
    """The snapshot CURRENT names once it holds exactly ``prompts`` (compaction runs in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            name = (root / "CURRENT").read_text().split()[0]
            if _complete_snapshots(root).get(name) == set(prompts):
                return name
        except (OSError, IndexError):
            pass
        time.sleep(0.2)
    pytest.fail(f"no snapshot with {prompts} after {timeout:.0f}s: {_complete_snapshots(root)}")


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + 8] = bytes(b ^ 0xFF for b in data[i:i + 8])
    path.write_bytes(bytes(data))


def _damage_manifest_states_digest(folder: Path) -> None:
    """One hex digit of a state shard's sha256 in manifest.json changed: still valid JSON."""
    manifest = json.loads((folder / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith("states-"))
    digest = manifest["files"][name]
    manifest["files"][name] = ("0" if digest[0] != "0" else "1") + digest[1:]
    (folder / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))


def _lost_with_shard(folder: Path, shard: Path):
    """What the newest snapshot still restores once ``shard`` is refused: (indexes of PROMPTS whose
    final latents, hence exact hits, survive; entries with any state left)."""
    from safetensors import safe_open

    from nirvana.cache.engine import FINAL
    from nirvana.cache.snapshot import state_blob_name

    with safe_open(str(shard), "pt") as f:
        gone = set(f.keys())
    survivors, entries = set(), 0
    for entry in json.loads((folder / "entries.json").read_text())["entries"]:
        blobs = {state_blob_name(entry["id"], s["step"]) for s in entry["steps"]}
        entries += bool(blobs - gone)
        if state_blob_name(entry["id"], FINAL) not in gone:
            survivors.add(PROMPTS.index(entry["key"]["prompt"]))
    return survivors, entries


DAMAGES = ["CURRENT garbage", "manifest bytes flipped", "manifest states digest", "states shard bytes flipped"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_snapshot_restart_says_why_and_serves_what_survives(repository, tmp_path, damage):
    snapshots = tmp_path / "snapshots"
    # snapshot_interval_s=0: a compaction after every change, so each admission leaves a snapshot.
    variant = persistent_variant(repository, tmp_path / "repo", snapshots, "always", 0)
    first = []
    with server_on(variant, tmp_path / "first.log") as server, \
            Txt2ImgClient(server.grpc_url, "grpc", timeout_s=120) as client:
        for i, prompt in enumerate(PROMPTS[:2]):
            first.append(client.generate(prompt, seed=31 + i, steps=10))
            assert first[-1].cache_status == "miss" and first[-1].admitted > 0
            _wait_for_snapshot_with(snapshots, PROMPTS[:i + 1])
    on_disk = _complete_snapshots(snapshots)
    assert list(on_disk.values()) == [set(PROMPTS[:1]), set(PROMPTS[:2])], on_disk  # clean stop: nothing new
    older, newest = [snapshots / name for name in on_disk]

    # What the log must say, the prompts that are exact hits afterwards, the entries restored and
    # the snapshot they come from.
    if damage == "CURRENT garbage":
        # Unreadable CURRENT: the newest snapshot, checked by its own manifest, is loaded.
        (snapshots / "CURRENT").write_bytes(os.urandom(48).replace(b" ", b"\xff"))
        reason, survivors, entries, loaded = "CURRENT is unreadable", {0, 1}, 2, newest
    elif damage == "manifest bytes flipped":
        # manifest.json unreadable: the newest snapshot is refused, the previous one loaded.
        _flip(newest / "manifest.json")
        reason, survivors, entries, loaded = "manifest.json does not match CURRENT", {0}, 1, older
    elif damage == "manifest states digest":
        # Still valid JSON, but not the manifest CURRENT names: never trusted, the previous snapshot
        # is loaded (not the newest without the states its bad digest refuses).
        _damage_manifest_states_digest(newest)
        reason, survivors, entries, loaded = "manifest.json does not match CURRENT", {0}, 1, older
    else:
        # A state shard fails its checksum: the newest snapshot loads without that shard's states
        # (snapshot.py: "a bad state shard loses only its states"); no fallback for them.
        shard = sorted(newest.glob("states-*.safetensors"))[0]
        survivors, entries = _lost_with_shard(newest, shard)
        _flip(shard)
        reason, loaded = f"{shard.name}: checksum mismatch; its states skipped", newest

    log = tmp_path / "restarted.log"
    with server_on(variant, log) as server, Txt2ImgClient(server.grpc_url, "grpc", timeout_s=120) as client:
        text = log.read_text(errors="replace")
        reports = restore_reports(text)
        assert "latent_cache restored with problems" in text and reason in text, text[-4000:]
        assert len(reports) == 1 and reports[0]["entries"] == entries, reports
        assert reports[0]["snapshot"] == loaded.name, reports
        again = [client.generate(p, seed=31 + i, steps=10) for i, p in enumerate(PROMPTS[:2])]
        exact = {i for i, r in enumerate(again) if r.cache_status == "exact"}
        assert exact == survivors, ([r.cache_status for r in again], reports)
        for i in survivors:
            assert (again[i].image == first[i].image).all()
        # It serves: a new prompt is a miss and is admitted, and the one just regenerated is exact.
        fresh = client.generate(PROMPTS[2], seed=33, steps=10)
        assert fresh.cache_status == "miss" and fresh.admitted > 0
        assert client.generate(PROMPTS[2], seed=33, steps=10).cache_status == "exact"


# -- kill -9 under load ---------------------------------------------------------------------------------

# mode -> kills, (min, spread) of the delay after the first response, what must come back
KILLS = {
    # Every acknowledged admission was fsynced before its response left.
    "always": (3, (0.0, 4.0), 0.0),
    # The acknowledgement does not wait for the journal: only the older ones are promised. The
    # delay is at least 2 s, so the first response is always among them.
    "everysec": (2, (2.0, 3.0), 1.5),
}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", list(KILLS))
def test_kill_9_under_load_then_restart_keeps_acknowledged_admissions(repository, tmp_path, mode):
    kills, (min_delay, spread), older_than = KILLS[mode]
    rng = random.Random(f"{SEED}-{mode}")
    # snapshot_interval_s=1: the kills also land during background compactions.
    variant = persistent_variant(repository, tmp_path / "repo", tmp_path / "cache", mode, 1)
    server = server_on(variant, tmp_path / "server-0.log").start()
    checked = 0
    try:
        for kill in range(1, kills + 1):
            load = MissLoad(server.grpc_url, concurrency=2, steps=6, tag=f"{mode}-{SEED}-{kill}",
                            seed=rng.randrange(2**31))
            killed_at = kill_under_load(server, load, rng, spread, min_delay_s=min_delay)
            context = (f"CRASH_TEST_SEED={SEED} kill {kill}: killed {killed_at - load.started_at:.2f}s into the "
                       f"load, {len(load.acks)} responses")
            early = [f for f in load.failures if f.failed_at < killed_at]
            assert not early, f"{context}: requests failed before the kill: {early}"
            acked = load.admissions()
            assert acked and len(acked) == len(load.acks), f"{context}: every response admits ({load.acks})"
            close_server(server)
            server = None
            log = tmp_path / f"server-{kill}.log"
            server = server_on(variant, log).start()
            promised = [a for a in acked if killed_at - a.acked_at > older_than] if older_than else acked
            assert promised, context
            checks = check_restored(server.grpc_url, promised)
            lost = [(c.ack.prompt, c.status, c.same_image, round(killed_at - c.ack.acked_at, 3))
                    for c in checks if not c.restored]
            assert not lost, (f"{context}: {len(lost)} of {len(checks)} acknowledged admissions lost "
                              f"(prompt, status, same image, acknowledged s before the kill): {lost}; "
                              f"restore: {restore_reports(log.read_text(errors='replace'))}")
            checked += len(checks)
    finally:
        close_server(server)
    assert checked >= kills
