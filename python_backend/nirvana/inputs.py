"""Validation of per-request inputs, shared by the Triton adapters.

Every check raises :class:`InvalidInput` naming the offending input tensor, so
the adapter can answer with Triton's INVALID_ARG and keep serving.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import List, Optional

import numpy as np

MAX_SEED = 2**63 - 1
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class InvalidInput(ValueError):
    """A request input is missing or malformed.

    Attributes:
        field: Name of the input tensor at fault.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def batch_rows(array: Optional[np.ndarray], field: str) -> int:
    """Number of rows (batch size) of a ``[batch, 1]`` input."""
    if array is None:
        raise InvalidInput(field, "is required")
    if array.ndim != 2 or array.shape[1] != 1:
        raise InvalidInput(field, f"expected shape [batch, 1], got {list(array.shape)}")
    return int(array.shape[0])


def decode_texts(array: Optional[np.ndarray], field: str, rows: int, *, required: bool,
                 max_bytes: int, strip_empty: bool = True) -> List[str]:
    """Decode a BYTES input into one string per row.

    Args:
        array: The input as numpy (object dtype, shape ``[rows, 1]``) or None if absent.
        field: Input name, for errors.
        rows: Expected batch size.
        required: Whether an absent or blank value is an error (else it decodes to "").
        max_bytes: Largest accepted UTF-8 size per row.
    """
    if array is None:
        if required:
            raise InvalidInput(field, "is required")
        return [""] * rows
    if array.ndim != 2 or array.shape != (rows, 1):
        raise InvalidInput(field, f"expected shape [{rows}, 1], got {list(array.shape)}")
    texts = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, (bytes, bytearray, np.bytes_)):
            raise InvalidInput(field, f"expected BYTES (UTF-8 text), got {type(item).__name__}")
        if len(item) > max_bytes:
            raise InvalidInput(field, f"is {len(item)} bytes; the limit is {max_bytes}")
        try:
            text = bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(field, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if "\x00" in text:
            raise InvalidInput(field, "contains a NUL character")
        if required and strip_empty and not text.strip():
            raise InvalidInput(field, "is empty")
        texts.append(text)
    return texts


def _column(array: Optional[np.ndarray], field: str, rows: int, kinds: str) -> Optional[np.ndarray]:
    if array is None:
        return None
    if array.ndim != 2 or array.shape != (rows, 1):
        raise InvalidInput(field, f"expected shape [{rows}, 1], got {list(array.shape)}")
    if array.dtype.kind not in kinds:
        raise InvalidInput(field, f"has dtype {array.dtype}, expected {'integer' if kinds == 'iu' else 'floating point'}")
    return array.reshape(-1)


def resolve_seeds(array: Optional[np.ndarray], rows: int) -> np.ndarray:
    """SEED per row; a fresh random seed where absent (returned to the client)."""
    seeds = _column(array, "SEED", rows, "iu")
    if seeds is None:
        return np.array([secrets.randbelow(2**31) for _ in range(rows)], dtype=np.int64)
    for s in seeds:
        if int(s) < 0 or int(s) > MAX_SEED:
            raise InvalidInput("SEED", f"{int(s)} is out of range 0..{MAX_SEED}")
    return seeds.astype(np.int64)


def resolve_steps(array: Optional[np.ndarray], rows: int, default: int, maximum: int) -> np.ndarray:
    """STEPS per row, within 1..maximum."""
    steps = _column(array, "STEPS", rows, "iu")
    if steps is None:
        return np.full(rows, default, dtype=np.int32)
    for s in steps:
        if not 1 <= int(s) <= maximum:
            raise InvalidInput("STEPS", f"{int(s)} is out of range 1..{maximum}")
    return steps.astype(np.int32)


def resolve_guidance(array: Optional[np.ndarray], rows: int, default: float, maximum: float) -> np.ndarray:
    """GUIDANCE_SCALE per row: finite, within 0..maximum (<= 1 disables classifier-free guidance)."""
    scales = _column(array, "GUIDANCE_SCALE", rows, "f")
    if scales is None:
        return np.full(rows, default, dtype=np.float32)
    for g in scales:
        if not math.isfinite(float(g)) or not 0.0 <= float(g) <= maximum:
            raise InvalidInput("GUIDANCE_SCALE", f"{float(g)} is not a finite number in 0..{maximum}")
    return scales.astype(np.float32)


def resolve_deadlines(array: Optional[np.ndarray], rows: int, maximum_ms: int, now_ns: int) -> np.ndarray:
    """TIMEOUT_MS per row (1..maximum_ms) as an absolute Unix deadline in ns; 0 where absent."""
    timeouts = _column(array, "TIMEOUT_MS", rows, "iu")
    if timeouts is None:
        return np.zeros(rows, dtype=np.int64)
    for t in timeouts:
        if not 1 <= int(t) <= maximum_ms:
            raise InvalidInput("TIMEOUT_MS", f"{int(t)} is out of range 1..{maximum_ms}")
    return now_ns + timeouts.astype(np.int64) * 1_000_000


def resolve_tenants(array: Optional[np.ndarray], rows: int) -> List[str]:
    """TENANT per row ("" = the shared namespace): 1-64 of letters, digits, ``_.-``."""
    tenants = decode_texts(array, "TENANT", rows, required=False, max_bytes=64)
    for tenant in tenants:
        if tenant and not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidInput("TENANT", f"{tenant!r} is not 1-64 letters, digits, '_', '.' or '-' "
                                         "starting with a letter or digit")
    return tenants
