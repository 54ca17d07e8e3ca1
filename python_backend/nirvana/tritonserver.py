"""Start the real tritonserver shipped in the nvidia-pytriton wheel (Triton 2.51, Python backend).

``nirvana-serve`` runs it in the foreground on Triton's default ports; tests,
the demo and the benchmarks use :class:`TritonServer` as a context manager.
In the NVIDIA tritonserver container, run that image's ``tritonserver``
directly on the container repository the export writes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional


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


def server_environment() -> Dict[str, str]:
    """Environment for the server: this venv first on PATH, this Python's libpython first."""
    env = dict(os.environ)
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonServer:
    """A tritonserver process over a model repository.

    Args:
        model_repository: The repository folder.
        http_port, grpc_port, metrics_port: Ports; 0 picks a free one.
        log_file: Where the server's output goes (a temp file by default).
        extra_args: More tritonserver flags.
    """

    def __init__(self, model_repository: Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 log_file: Optional[Path] = None, extra_args: Optional[List[str]] = None):
        self.model_repository = Path(model_repository).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="nirvana-triton-"))
        self.log_file = Path(log_file) if log_file else self._workdir / "server.log"
        self.extra_args = list(extra_args or [])
        self.process: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> List[str]:
        backends = prepare_backends(self._workdir)
        return [str(_pytriton_root() / "bin" / "tritonserver"),
                f"--model-repository={self.model_repository}", f"--backend-directory={backends}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--log-verbose=0", *self.extra_args]

    def start(self, timeout: float = 300.0) -> "TritonServer":
        if not (self.model_repository / ".exported").exists():
            raise RuntimeError(f"{self.model_repository} has not been exported yet: run `make export`")
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=server_environment(), start_new_session=True)
        self.wait_ready(timeout)
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
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        try:  # stubs left behind by a killed server
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-serve", description="Run tritonserver in the foreground.")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args, extra = parser.parse_known_args(argv)
    server = TritonServer(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                          extra_args=extra)
    if not (server.model_repository / ".exported").exists():
        print(f"nirvana-serve: {server.model_repository} is not exported; run `make export`", file=sys.stderr)
        return 1
    process = subprocess.Popen(server.command(), env=server_environment(), start_new_session=True)
    server.process = process

    def forward(signum, _frame):
        server.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    print(f"tritonserver: HTTP {args.http_port}, gRPC {args.grpc_port}, metrics {args.metrics_port} "
          f"(Ctrl-C stops it)", file=sys.stderr)
    code = process.wait()
    server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
