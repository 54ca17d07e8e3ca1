"""Cache administration through the restricted ``cache_admin`` model, and the ``nirvana-admin`` CLI.

Example:
    >>> with CacheAdminClient("127.0.0.1:8001", key=open("admin.key").read().strip()) as admin:
    ...     print(admin.stats(tenant="acme")["entries"])
    ...     admin.flush(tenant="acme")
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from nirvana.admin import ADMIN_KEY_ENV, headers
from nirvana_client.client import Txt2ImgError, connect, infer_inputs

MODEL = "cache_admin"
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}


class CacheAdminClient:
    """Stats, flush and snapshot-now for a server's latent cache.

    Args:
        url: host:port of the server (gRPC port for grpc, HTTP port for http).
        protocol: "grpc" or "http".
        key: The server's admin key (sent as the restricted-API header).
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", key: str = "",
                 timeout_s: float = 120.0):
        self.protocol = protocol
        self._headers = headers(key, protocol) if key else {}
        self._module, self._client = connect(url, protocol, timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "CacheAdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, command: str, tenant: Optional[str] = None) -> Dict[str, object]:
        """Send one admin command; returns the server's JSON result.

        Raises:
            Txt2ImgError: With the server's message (a missing or wrong key included).
        """
        tensors = {"COMMAND": np.array([[command.encode("utf-8")]], dtype=object)}
        if tenant is not None:
            tensors["TENANT"] = np.array([[tenant.encode("utf-8")]], dtype=object)
        try:
            result = self._client.infer(MODEL, infer_inputs(self._module, tensors), headers=self._headers,
                                        outputs=[self._module.InferRequestedOutput("RESULT")])
        except self._module.InferenceServerException as exc:
            raise Txt2ImgError(exc.message() or str(exc)) from None
        return json.loads(result.as_numpy("RESULT").reshape(-1)[0])

    def stats(self, tenant: Optional[str] = None) -> Dict[str, object]:
        """Entries, states, bytes per tier and lookup counters: of one tenant, or of the whole cache."""
        return self.run("stats", tenant)

    def flush(self, tenant: Optional[str] = None) -> Dict[str, object]:
        """Drop one tenant's entries (all entries when ``tenant`` is None), persisted at once."""
        return self.run("flush", tenant)

    def snapshot(self) -> Dict[str, object]:
        """Write a snapshot now (the latent_cache model needs ``snapshot_path``)."""
        return self.run("snapshot")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-admin", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("stats", "flush", "snapshot"))
    parser.add_argument("--tenant", help="one tenant (\"\" is the shared namespace); default: the whole cache")
    parser.add_argument("--url", help="server host:port (default: 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--key-file", type=Path, help=f"file holding the admin key (default: ${ADMIN_KEY_ENV})")
    args = parser.parse_args(argv)
    url = args.url or DEFAULT_URLS[args.protocol]
    key = args.key_file.read_text().strip() if args.key_file else os.environ.get(ADMIN_KEY_ENV, "")
    try:
        with CacheAdminClient(url, args.protocol, key) as client:
            result = client.run(args.command, args.tenant)
    except Txt2ImgError as exc:
        print(f"nirvana-admin: server error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - connection problems, shown plainly
        print(f"nirvana-admin: cannot reach {args.protocol} server at {url}: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
