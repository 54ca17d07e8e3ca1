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

from nirvana.admin import ADMIN_KEY_ENV, COMMANDS, headers
from nirvana_client.cli import add_server_arguments, call_server
from nirvana_client.client import ServerClient, infer_inputs, text_tensor

MODEL = "cache_admin"


class CacheAdminClient(ServerClient):
    """Stats, flush and snapshot-now for a server's latent cache.

    Args:
        url: host:port of the server (gRPC port for grpc, HTTP port for http).
        protocol: "grpc" or "http".
        key: The server's admin key (sent as the restricted-API header).
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", key: str = "",
                 timeout_s: float = 120.0):
        super().__init__(url, protocol, timeout_s)
        self._headers = headers(key, protocol) if key else {}

    def run(self, command: str, tenant: Optional[str] = None) -> Dict[str, object]:
        """Send one admin command; returns the server's JSON result.

        Raises:
            Txt2ImgError: With the server's message (a missing or wrong key included).
        """
        tensors = {"COMMAND": text_tensor(command)}
        if tenant is not None:
            tensors["TENANT"] = text_tensor(tenant)
        result = self._infer(MODEL, infer_inputs(self._module, tensors), ["RESULT"], headers=self._headers)
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
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--tenant", help="one tenant (\"\" is the shared namespace); default: the whole cache")
    add_server_arguments(parser)
    parser.add_argument("--key-file", type=Path, help=f"file holding the admin key (default: ${ADMIN_KEY_ENV})")
    args = parser.parse_args(argv)
    key = args.key_file.read_text().strip() if args.key_file else os.environ.get(ADMIN_KEY_ENV, "")

    def run(url):
        with CacheAdminClient(url, args.protocol, key) as client:
            return client.run(args.command, args.tenant)

    result, code = call_server("nirvana-admin", args, run)
    if code:
        return code
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
