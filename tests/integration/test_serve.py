"""`nirvana-serve` (what `make serve` runs): serves on the given ports, and Ctrl-C or SIGTERM
leaves no server or Python-backend stub behind."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nirvana.tritonserver import free_port

pytestmark = pytest.mark.integration


def _processes(fragment: str):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if fragment in cmd and state != "Z":
                found.append(int(entry))
    return found


def _children(pids):
    """Processes whose parent is one of ``pids`` (a server's Python-backend stubs)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent in pids:
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly(repository, signum):
    http = free_port()
    serve = Path(sys.executable).parent / "nirvana-serve"
    proc = subprocess.Popen([str(serve), "--model-repository", str(repository), "--http-port", str(http),
                             "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        servers = _processes(f"--http-port={http}")
        assert servers, "server did not start"
        stubs = _children(servers)  # this server's own stubs, not those of other servers on the machine
        assert stubs
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        time.sleep(1)
        assert not _processes(f"--http-port={http}")
        assert not [pid for pid in stubs if _alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
