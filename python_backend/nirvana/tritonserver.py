"""Start the real tritonserver shipped in the nvidia-pytriton wheel (Triton 2.51, Python backend).

``nirvana-serve`` runs it in the foreground on Triton's default ports; tests,
the demo and the benchmarks use :class:`TritonServer` as a context manager.
In the NVIDIA tritonserver container, run that image's ``tritonserver``
directly on the container repository the export writes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nirvana import admin


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise RuntimeError("nvidia-pytriton is not installed; run `make venv`") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise RuntimeError(f"no tritonserver binary under {root}")
    return root


def prepare_backends(workdir: Path) -> Path:
    """A backends folder with the Python backend and the stub for this interpreter next to it."""
    root = _pytriton_root()
    backends = workdir / "backends"
    python_dir = backends / "python"
    if not (python_dir / "triton_python_backend_stub").exists():
        shutil.copytree(root / "backends", backends, dirs_exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise RuntimeError(f"no Python-backend stub for Python {version} in nvidia-pytriton")
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return backends


def server_environment(admin_key: Optional[str] = None) -> Dict[str, str]:
    """Environment for the server: this venv first on PATH, this Python's libpython first, and
    the admin key (for the latent_cache model) or none."""
    env = dict(os.environ)
    env.pop(admin.ADMIN_KEY_ENV, None)
    if admin_key:
        env[admin.ADMIN_KEY_ENV] = admin_key
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [libdir, str(_site_packages() / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> List[int]:
    """``n`` distinct free ports: the sockets stay bound together while they are picked, so the
    kernel cannot hand the same port out twice (it did: HTTP and metrics on one port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServer:
    """A tritonserver process over a model repository.

    Args:
        model_repository: The repository folder.
        http_port, grpc_port, metrics_port: Ports; 0 picks a free one.
        log_file: Where the server's output goes (a temp file by default).
        extra_args: More tritonserver flags.
        watchdog_interval_s: Seconds between stub-health probes (0: no watchdog).
        admin_key: Turns on the cache admin surface and restricts ``restricted_apis`` (Triton's
            own API categories) to requests carrying it (see :mod:`nirvana.admin`).
        triton_root: A Triton installation to run instead of the nvidia-pytriton wheel's: its
            ``bin/tritonserver`` and ``backends/`` as they are (the NVIDIA container's
            /opt/tritonserver, which has the onnxruntime backend the container repository uses).
    """

    def __init__(self, model_repository: Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 log_file: Optional[Path] = None, extra_args: Optional[List[str]] = None,
                 watchdog_interval_s: float = 0.0, admin_key: Optional[str] = None,
                 restricted_apis: Sequence[str] = admin.RESTRICTED_APIS, triton_root: Optional[Path] = None):
        if admin_key is not None:
            admin.validate_key(admin_key)
        self.admin_key = admin_key
        self.triton_root = Path(triton_root) if triton_root else None
        if self.triton_root is not None and not (self.triton_root / "bin" / "tritonserver").exists():
            raise ValueError(f"--triton-root {self.triton_root}: no bin/tritonserver there")
        self.restricted_apis = tuple(restricted_apis)
        self.model_repository = Path(model_repository).resolve()
        picked = iter(free_ports(3))
        self.http_port = http_port or next(picked)
        self.grpc_port = grpc_port or next(picked)
        self.metrics_port = metrics_port or next(picked)
        self._workdir = Path(tempfile.mkdtemp(prefix="nirvana-triton-"))
        self.log_file = Path(log_file) if log_file else self._workdir / "server.log"
        self.extra_args = list(extra_args or [])
        self.process: Optional[subprocess.Popen] = None
        self.watchdog_interval_s = watchdog_interval_s
        self.watchdog: Optional["StubWatchdog"] = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> List[str]:
        if self.triton_root is not None:
            binary, backends = self.triton_root / "bin" / "tritonserver", self.triton_root / "backends"
        else:
            binary, backends = _pytriton_root() / "bin" / "tritonserver", prepare_backends(self._workdir)
        return [str(binary),
                f"--model-repository={self.model_repository}", f"--backend-directory={backends}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--log-verbose=0",
                # Explicit control with every model loaded: the watchdog can reload a model whose
                # Python-backend stub died (Triton 2.51 neither restarts it nor marks it unready).
                "--model-control-mode=explicit", "--load-model=*",
                *(admin.triton_args(self.admin_key, self.restricted_apis) if self.admin_key else []),
                *self.extra_args]

    def environment(self) -> Dict[str, str]:
        return server_environment(self.admin_key)

    def start(self, timeout: float = 300.0) -> "TritonServer":
        if not (self.model_repository / ".exported").exists():
            raise RuntimeError(f"{self.model_repository} has not been exported yet: run `make export`")
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.environment(), start_new_session=True)
        self.wait_ready(timeout)
        if self.watchdog_interval_s > 0:
            self.watchdog = StubWatchdog(self.http_url, self.watchdog_interval_s, admin_key=self.admin_key).start()
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}; "
                                   f"log:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (server and Python-backend stubs), SIGKILL if it lingers."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.process is None:
            return
        pgid = self.process.pid  # started with start_new_session: the server leads its own group
        if self.process.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        try:  # Python-backend stubs left behind by a killed server
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


class StubWatchdog:
    """Reloads a Python-backend model whose stub process died.

    When a stub is killed (OOM killer, a crash in native code), Triton 2.51 answers every later
    request for that model with "Stub process '<model>_<i>_<j>' is not healthy" while still
    reporting the model ready. Every ``interval_s`` this sends a 1-step probe through the
    ensemble (cache bypassed) and, on that error, reloads the model named in it.
    """

    STUB_ERROR = re.compile(r"Stub process '(\w+?)_\d+_\d+' is not healthy")

    def __init__(self, http_url: str, interval_s: float = 10.0, model: str = "txt2img",
                 admin_key: Optional[str] = None):
        self.http_url, self.interval_s, self.model = http_url, interval_s, model
        # Model load/unload is restricted when the server has an admin key.
        self.headers = admin.headers(admin_key, "http") if admin_key else None
        self.reloads: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)

    def start(self) -> "StubWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> Optional[str]:
        """Probe once; reload and return the model whose stub was dead, else None."""
        import numpy as np
        import tritonclient.http as http

        client = http.InferenceServerClient(self.http_url, network_timeout=120, connection_timeout=120)
        try:
            inputs = []
            for name, array, dtype in (("PROMPT", np.array([[b"watchdog probe"]], dtype=object), "BYTES"),
                                       ("STEPS", np.array([[1]], np.int32), "INT32"),
                                       ("CACHE", np.array([[False]]), "BOOL")):
                tensor = http.InferInput(name, [1, 1], dtype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            try:
                client.infer(self.model, inputs, outputs=[http.InferRequestedOutput("IMAGE")])
                return None
            except http.InferenceServerException as exc:
                match = self.STUB_ERROR.search(str(exc))
                if not match:
                    return None
                # A load of an unchanged, loaded model is a no-op that keeps the dead stub: unload
                # first, then load, which starts a fresh stub (and re-runs its initialize).
                name = match.group(1)
                client.unload_model(name, headers=self.headers)
                deadline = time.monotonic() + 60
                while client.is_model_ready(name) and time.monotonic() < deadline:
                    time.sleep(0.2)
                client.load_model(name, headers=self.headers)
                self.reloads.append(name)
                print(f"stub watchdog: reloaded {name} after its stub died", file=sys.stderr, flush=True)
                return name
        except Exception:  # noqa: BLE001 - the server may be going down; try again next time
            return None
        finally:
            client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-serve", description="Run tritonserver in the foreground.")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--watchdog-interval", type=float, default=10.0,
                        help="seconds between stub-health probes (0: off)")
    parser.add_argument("--admin-key-file", type=Path,
                        help=f"file holding the admin key (default: ${admin.ADMIN_KEY_ENV}); turns on the "
                             "cache_admin model and restricts --restricted-apis to requests with header "
                             f"'{admin.ADMIN_HEADER}: <key>'. Without a key, cache_admin refuses everything")
    parser.add_argument("--cache-dir", type=Path,
                        help="keep the latent cache here across restarts (snapshots and journal; sets "
                             "latent_cache's snapshot_path in a run copy of the repository, the committed "
                             "config is left alone). Default: the config's snapshot_path (empty: no persistence)")
    parser.add_argument("--redis-url",
                        help="share the latent cache with other replicas through Redis at this URL (sets "
                             "latent_cache's redis_url in a run copy; Redis's AOF is then the durable store, so "
                             "not with --cache-dir). The password, if any: $NIRVANA_REDIS_PASSWORD")
    parser.add_argument("--replica-id",
                        help="this replica's name in the shared tier's events and stats (default: host:pid)")
    parser.add_argument("--triton-root", type=Path,
                        help="run this Triton installation's bin/tritonserver and backends/ (the NVIDIA "
                             "container's /opt/tritonserver) instead of the nvidia-pytriton wheel's")
    parser.add_argument("--restricted-apis", default=",".join(admin.RESTRICTED_APIS),
                        help="Triton API categories the admin key restricts (comma-separated; '' for none)")
    args, extra = parser.parse_known_args(argv)
    try:
        key = (args.admin_key_file.read_text().strip() if args.admin_key_file
               else admin.server_key())
        apis = [a for a in args.restricted_apis.split(",") if a.strip()]
        repository = args.model_repository
        if args.cache_dir and args.redis_url:
            raise ValueError("--cache-dir and --redis-url are exclusive: with the shared tier, Redis (appendonly "
                             "yes) keeps the cache across restarts")
        overrides = latent_cache_overrides(args.cache_dir, args.redis_url, args.replica_id)
        if overrides and (repository / ".exported").exists():
            repository = run_copy(repository, overrides)
        server = TritonServer(repository, args.http_port, args.grpc_port, args.metrics_port,
                              extra_args=extra, admin_key=key, restricted_apis=apis, triton_root=args.triton_root)
    except (OSError, ValueError) as exc:
        print(f"nirvana-serve: {exc}", file=sys.stderr)
        return 2
    if not (server.model_repository / ".exported").exists():
        print(f"nirvana-serve: {server.model_repository} is not exported; run `make export`", file=sys.stderr)
        return 1
    process = subprocess.Popen(server.command(), env=server.environment(), start_new_session=True)
    server.process = process

    received = []

    def forward(signum, _frame):
        # Only signal here: the main thread is inside process.wait() and reaps the server.
        received.append(signum)
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if args.watchdog_interval > 0:
        threading.Thread(target=_start_watchdog, args=(server, args.watchdog_interval), daemon=True).start()
    print(f"tritonserver: HTTP {args.http_port}, gRPC {args.grpc_port}, metrics {args.metrics_port} "
          f"(Ctrl-C stops it)", file=sys.stderr)
    code = process.wait()
    server.stop()
    if server.model_repository != args.model_repository.resolve():
        shutil.rmtree(server.model_repository.parent, ignore_errors=True)  # the run copy (--cache-dir, --redis-url)
    return 128 + received[0] if received else code


def latent_cache_overrides(cache_dir: Optional[Path] = None, redis_url: Optional[str] = None,
                           replica_id: Optional[str] = None) -> Dict[str, str]:
    """The latent_cache parameters nirvana-serve's flags set (empty: the committed config as is)."""
    overrides: Dict[str, str] = {}
    if cache_dir:
        cache_dir = Path(cache_dir).resolve()
        cache_dir.mkdir(parents=True, exist_ok=True)
        overrides["snapshot_path"] = str(cache_dir)
    if redis_url:
        overrides.update(redis_url=redis_url, snapshot_path="")
    if replica_id:
        overrides["replica_id"] = replica_id
    return overrides


def run_copy(repository: Path, latent_cache: Dict[str, str]) -> Path:
    """A run copy of ``repository`` (files hard-linked) with these latent_cache parameters."""
    from nirvana_export.repository import repository_variant

    copy = Path(tempfile.mkdtemp(prefix="nirvana-serve-")) / "model_repository"
    return repository_variant(repository, copy, {"latent_cache": latent_cache})


def _start_watchdog(server: TritonServer, interval_s: float) -> None:
    try:
        server.wait_ready(600)
    except (RuntimeError, TimeoutError):
        return
    server.watchdog = StubWatchdog(server.http_url, interval_s, admin_key=server.admin_key).start()


if __name__ == "__main__":
    sys.exit(main())
