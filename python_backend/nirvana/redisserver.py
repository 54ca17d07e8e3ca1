"""Start a real redis-server (Debian's ``redis-server``, installed by the Makefile) for the shared
tier on loopback: tests, benchmarks and ``make serve-replicas`` use it; a deployment runs its own
Redis (deploy/).

The server persists with AOF in its own directory, so a server stopped (even with SIGKILL) and
started again on the same directory comes back with what it acknowledged.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server; "
                           "`make test` installs it)")
    return found


class RedisServer:
    """One redis-server process on 127.0.0.1.

    Args:
        directory: Its working directory (AOF files); reused by :meth:`restart`.
        port: Loopback port (default: a free one, kept across restarts).
        appendfsync: ``always`` (an acknowledged write survives SIGKILL: what the tests check) or
            ``everysec`` (Redis's default: at most the last second is lost).
        extra_args: More ``redis-server`` options, e.g. ``["--maxmemory", "1gb"]``.
    """

    def __init__(self, directory: Path, port: Optional[int] = None, appendfsync: str = "always",
                 extra_args: Optional[List[str]] = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args or [])
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> List[str]:
        return [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", "redis.log",
                *self.extra_args]

    def start(self, timeout: float = 20.0) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"redis-server not answering on port {self.port} after {timeout:.0f}s: {self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # not -LOADING while the AOF loads
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save; what the AOF holds is what comes back."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "redis.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
