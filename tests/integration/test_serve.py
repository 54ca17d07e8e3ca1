"""`nirvana-serve` (what `make serve` runs): serves on the given ports, and Ctrl-C or SIGTERM
leaves no server or Python-backend stub behind."""

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from nirvana.config import read_model_config
from nirvana.tritonserver import free_port

pytestmark = pytest.mark.integration

STUB = "triton_python_backend_stub"


def _executable(process: psutil.Process) -> str:
    """The program ``process`` runs ('' once it is gone): comm is cut at 15 characters, argv[0] is not."""
    try:
        argv = process.cmdline()
    except psutil.NoSuchProcess:  # exited (or a zombie) since it was listed
        return ""
    return Path(argv[0]).name if argv else ""


def wait_ready(http_port, timeout):
    """Until the server on ``http_port`` reports ready (the test's own assertions follow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)


def _running(processes):
    """Those of ``processes`` still running; zombies count as gone. psutil checks that a pid was not
    reused by another process since it was listed."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:  # gone while we looked: not running
            pass
    return alive


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly(repository, signum):
    http = free_port()
    serve = Path(sys.executable).parent / "nirvana-serve"
    proc = subprocess.Popen([str(serve), "--model-repository", str(repository), "--http-port", str(http),
                             "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = []
    try:
        wait_ready(http, 300)
        # Only the processes this test started: another Triton on the machine has stubs too.
        tree = psutil.Process(proc.pid).children(recursive=True)
        servers = [p for p in tree if _executable(p) == "tritonserver"]
        assert len(servers) == 1, f"expected one tritonserver under nirvana-serve, found {tree}"
        assert f"--http-port={http}" in servers[0].cmdline()
        stubs = [p for p in servers[0].children(recursive=True) if _executable(p) == STUB]
        python_models = sorted(path.parent.name for path in repository.glob("*/config.pbtxt")
                               if read_model_config(path).backend == "python")
        assert python_models
        for model in python_models:  # every Python-backend model has its stub in this server's tree
            assert any(f"/{model}/" in arg for p in stubs for arg in p.cmdline()), (model, stubs)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        deadline = time.monotonic() + 5  # a SIGKILL nirvana-serve sent on its way out takes a moment
        while _running(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(tree), f"left behind: {[(p.pid, _executable(p)) for p in _running(tree)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for process in _running(tree):  # a failed test leaves no server of its own behind
            process.kill()


@pytest.mark.timeout(300)
def test_serve_with_a_triton_root_and_a_redis_url(repository, tmp_path, redis_server):
    """--triton-root runs another Triton installation as it is (here: one laid out like the NVIDIA
    container's /opt/tritonserver, from the wheel's binary); --redis-url and --replica-id put the
    latent cache on the shared tier."""
    from nirvana import tritonserver
    from nirvana_client.admin import CacheAdminClient

    root = tmp_path / "opt-tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").symlink_to(tritonserver._pytriton_root() / "bin" / "tritonserver")
    tritonserver.prepare_backends(root)
    key_file = tmp_path / "key"
    key_file.write_text("serve-test-admin-key-0123456789")
    http, grpc = free_port(), free_port()
    serve = Path(sys.executable).parent / "nirvana-serve"
    proc = subprocess.Popen([str(serve), "--model-repository", str(repository), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(free_port()), "--triton-root", str(root),
                             "--redis-url", redis_server.url, "--replica-id", "serve-test",
                             "--admin-key-file", str(key_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(http, 240)
        servers = [p for p in psutil.Process(proc.pid).children(recursive=True) if _executable(p) == "tritonserver"]
        assert servers and f"--backend-directory={root / 'backends'}" in servers[0].cmdline()
        with CacheAdminClient(f"127.0.0.1:{grpc}", "grpc", key_file.read_text()) as admin:
            shared = admin.stats()["shared"]
        assert shared["replica_id"] == "serve-test" and shared["up"] and shared["usage"]["aof_enabled"]
        assert subprocess.run([str(serve), "--model-repository", str(repository), "--cache-dir", str(tmp_path / "c"),
                               "--redis-url", redis_server.url], capture_output=True, timeout=60).returncode == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
