"""A small client for the ``txt2img`` ensemble.

Example:
    >>> with Txt2ImgClient("127.0.0.1:8001", protocol="grpc") as client:
    ...     result = client.generate("a red fox in the snow", seed=7)
    ...     result.save("fox.png")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

MODEL = "txt2img"
OUTPUTS = ("IMAGE", "CACHE_STATUS", "START_STEP", "SIMILARITY", "MATCHED_PROMPT", "SEED_USED",
           "STEPS_USED", "ADMITTED", "PROMPT_TRUNCATED", "COALESCED", "GUARD")


class Txt2ImgError(RuntimeError):
    """The server rejected or failed a request; the message is the server's."""


@dataclass
class GenerationResult:
    """One generated image and what the cache did for it."""

    image: np.ndarray  # uint8 [H, W, 3]
    cache_status: str  # "miss", "approximate", "exact" or "disabled"
    start_step: int
    similarity: float
    matched_prompt: str
    seed: int
    steps: int
    admitted: int
    prompt_truncated: bool
    latency_s: float
    coalesced: bool = False  # an identical request was in flight: this one got its result, ran no step
    # The resume guard on an approximate hit: "" (not checked), "passed", or "downgraded:<reason>"
    # (start_step is then where it restarted: a smaller K of the matched entry, or 0 = from noise).
    guard: str = ""

    @property
    def downgraded(self) -> bool:
        return self.guard.startswith("downgraded")

    @property
    def steps_skipped(self) -> int:
        return self.start_step

    @property
    def hit(self) -> bool:
        return self.cache_status in ("approximate", "exact")

    def save(self, path: Path) -> Path:
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image).save(path)
        return path


def infer_inputs(module, tensors: Mapping[str, np.ndarray]) -> list:
    """``InferInput`` objects of ``module`` (tritonclient.grpc or .http) holding numpy arrays by name."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in tensors.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def connect(url: str, protocol: str, timeout_s: float):
    """The tritonclient module ("grpc" or "http") and a client of it connected to ``url``."""
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module, module.InferenceServerClient(url)
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
    raise ValueError(f"protocol must be grpc or http, not {protocol!r}")


def text_tensor(text: str) -> np.ndarray:
    """A one-row BYTES tensor holding ``text`` as UTF-8."""
    return np.array([[text.encode("utf-8")]], dtype=object)


def _flag(array: Optional[np.ndarray]) -> bool:
    """A BOOL output's first value; False when the server did not send it (older servers)."""
    return bool(array.reshape(-1)[0]) if array is not None else False


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class ServerClient:
    """A tritonclient connection over gRPC or HTTP, closed by ``with``; the base of this package's clients.

    Args:
        url: host:port of the server (gRPC port for grpc, HTTP port for http).
        protocol: "grpc" or "http".
        timeout_s: Per-request network timeout.
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", timeout_s: float = 300.0):
        self.protocol = protocol
        self.timeout_s = timeout_s
        self._module, self._client = connect(url, protocol, timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _infer(self, model: str, inputs: list, outputs: Sequence[str], headers: Optional[Mapping[str, str]] = None):
        """One inference of ``inputs`` (InferInput objects); a server error becomes :class:`Txt2ImgError`
        with the server's message."""
        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        # The HTTP client applies its timeout at connection level; gRPC takes it per call.
        timeout = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            return self._client.infer(model, inputs, outputs=requested, headers=headers, **timeout)
        except self._module.InferenceServerException as exc:
            raise Txt2ImgError(exc.message() or str(exc)) from None


class Txt2ImgClient(ServerClient):
    """Sends prompts to the ``txt2img`` ensemble (arguments: :class:`ServerClient`)."""

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready()) and bool(self._client.is_model_ready(MODEL))
        except Exception:  # noqa: BLE001 - not reachable is "not ready"
            return False

    def build_inputs(self, prompt: Optional[str], negative_prompt: Optional[str] = None, seed: Optional[int] = None,
                     steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                     tenant: Optional[str] = None, cache: Optional[bool] = None, timeout_ms: Optional[int] = None):
        """The request tensors; None leaves an input out (the server applies its default)."""
        values = {"PROMPT": None if prompt is None else text_tensor(prompt),
                  "NEGATIVE_PROMPT": None if negative_prompt is None else text_tensor(negative_prompt),
                  "SEED": None if seed is None else np.array([[seed]], dtype=np.int64),
                  "STEPS": None if steps is None else np.array([[steps]], dtype=np.int32),
                  "GUIDANCE_SCALE": None if guidance_scale is None else np.array([[guidance_scale]], dtype=np.float32),
                  "TENANT": None if tenant is None else text_tensor(tenant),
                  "CACHE": None if cache is None else np.array([[cache]], dtype=bool),
                  "TIMEOUT_MS": None if timeout_ms is None else np.array([[timeout_ms]], dtype=np.int32)}
        return infer_inputs(self._module, {k: v for k, v in values.items() if v is not None})

    def generate(self, prompt: Optional[str], negative_prompt: Optional[str] = None, seed: Optional[int] = None,
                 steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 tenant: Optional[str] = None, cache: Optional[bool] = None,
                 timeout_ms: Optional[int] = None) -> GenerationResult:
        """Generate one image.

        ``tenant`` selects a private cache namespace: lookups never cross tenants.
        ``cache=False`` bypasses the cache (no lookup, no admission), e.g. for A/B measurements.
        ``timeout_ms``: the server gives up (UNAVAILABLE) when the image is not done that long
        after the request arrived, and frees its batch rows.

        Raises:
            Txt2ImgError: With the server's message (e.g. ``PROMPT: is required``).
        """
        inputs = self.build_inputs(prompt, negative_prompt, seed, steps, guidance_scale, tenant, cache, timeout_ms)
        start = time.perf_counter()
        result = self._infer(MODEL, inputs, OUTPUTS)
        return parse_result(result.as_numpy, time.perf_counter() - start)


def parse_result(as_numpy, latency_s: float) -> GenerationResult:
    """Build a :class:`GenerationResult` from a response's ``as_numpy`` accessor."""
    return GenerationResult(
        image=as_numpy("IMAGE")[0],
        cache_status=_text(as_numpy("CACHE_STATUS").reshape(-1)[0]),
        start_step=int(as_numpy("START_STEP").reshape(-1)[0]),
        similarity=float(as_numpy("SIMILARITY").reshape(-1)[0]),
        matched_prompt=_text(as_numpy("MATCHED_PROMPT").reshape(-1)[0]),
        seed=int(as_numpy("SEED_USED").reshape(-1)[0]),
        steps=int(as_numpy("STEPS_USED").reshape(-1)[0]),
        admitted=int(as_numpy("ADMITTED").reshape(-1)[0]),
        prompt_truncated=bool(as_numpy("PROMPT_TRUNCATED").reshape(-1)[0]),
        latency_s=latency_s,
        coalesced=_flag(as_numpy("COALESCED")),
        guard=_text(as_numpy("GUARD").reshape(-1)[0]) if as_numpy("GUARD") is not None else "",
    )
