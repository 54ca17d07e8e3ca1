"""The cache admin surface: stats, flush and snapshot-now, for holders of the admin key.

Triton restricts APIs by category (inference, model-repository, statistics, ...), not per
model, so the key is checked twice with one header:

* ``nirvana-serve`` passes the key to Triton's restricted-API flags, which guard Triton's own
  admin categories (model load/unload, trace and log settings, shared memory);
* the same header reaches the ``cache_admin`` model as a request parameter through Triton's
  header forwarding, and :func:`check_key` compares it with the server's key (taken from the
  environment, so it is never visible in a model config).

Without a key the admin surface is off: every admin request is refused.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from typing import Mapping, Optional, Sequence

ADMIN_HEADER = "nirvana-admin-key"
# Triton's gRPC endpoint checks restricted protocols against this prefixed metadata key.
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_KEY_ENV = "NIRVANA_ADMIN_KEY"
# Triton's own API categories that an admin key restricts by default.
RESTRICTED_APIS = ("model-repository", "trace", "logging", "shared-memory")
COMMANDS = ("stats", "flush", "snapshot")
# Fits Triton's "<apis>:<header>=<value>" flag syntax; secrets.token_urlsafe(32) makes one.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,256}")


class Unauthorized(PermissionError):
    """An admin request without the right key (or with the admin surface off)."""


def server_key(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The admin key this server was started with, or None when the admin surface is off."""
    key = environ.get(ADMIN_KEY_ENV, "").strip()
    return key or None


def validate_key(key: str) -> str:
    """``key`` if it is usable as an admin key, else ValueError saying why."""
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError("the admin key must be 16-256 characters of letters, digits and '._~-' "
                         "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)")
    return key


def check_key(parameters: Mapping[str, object], expected: Optional[str]) -> None:
    """Raise :class:`Unauthorized` unless the request parameters carry the expected key.

    Args:
        parameters: The request's parameters (forwarded headers land here).
        expected: The server's key (:func:`server_key`).
    """
    if not expected:
        raise Unauthorized("the cache admin surface is off: start the server with an admin key "
                           f"(nirvana-serve --admin-key-file, or {ADMIN_KEY_ENV})")
    given = parameters.get(ADMIN_HEADER, parameters.get(GRPC_ADMIN_HEADER))
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(f"cache admin is restricted, expecting header '{ADMIN_HEADER}' "
                           f"(gRPC: '{GRPC_ADMIN_HEADER}') with the server's admin key")


def headers(key: str, protocol: str) -> dict:
    """The request headers (HTTP) or metadata (gRPC) that carry ``key``."""
    return {GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER: key}


def triton_args(key: str, apis: Sequence[str] = RESTRICTED_APIS) -> list:
    """tritonserver flags that restrict ``apis`` to ``key`` and forward the key header to models."""
    restricted = f"{','.join(apis)}:{ADMIN_HEADER}={key}"
    forward = f"^({GRPC_ADMIN_HEADER}|{ADMIN_HEADER})$"
    args = [f"--http-header-forward-pattern={forward}", f"--grpc-header-forward-pattern={forward}"]
    if apis:
        args += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
    return args


def encode_result(result: Mapping[str, object]) -> bytes:
    return json.dumps(result, sort_keys=True).encode("utf-8")
