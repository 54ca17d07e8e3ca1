"""A seeded fuzz of the served ``txt2img`` ensemble over HTTP and gRPC, with cache persistence on.

Random valid requests (unicode, long and pooled prompts, edge seeds, 1-4 steps, guidance,
tenants, CACHE on/off, batches of 1-2 rows) are mixed with malformed ones (wrong dtypes and
shapes, missing, unknown and duplicated inputs, out-of-range values, invalid UTF-8, bad
tenants, oversized and inconsistent batch dims, truncated raw tensor bytes, broken HTTP bodies),
each asking for all outputs, none, IMAGE alone or any other subset, 2-4 in flight. Every request must get exactly one answer within the client timeout: a correct
IMAGE, or (malformed) an INVALID_ARG error whose message names the offending input. Afterwards
the server is live, ready and as deterministic as before, its log holds no traceback from our
models, a SIGTERM writes a snapshot that restores without problems (offline) and a new server
on it answers an earlier request with an exact hit.

    NIRVANA_FUZZ_REQUESTS=10000 (make fuzz)   how many requests (default 300)
    NIRVANA_FUZZ_SEED=1234                    replay a run (printed on failure); case i of a
                                              run depends only on (seed, i)
    NIRVANA_FUZZ_CONCURRENCY=3                requests in flight (2-4)
"""

from __future__ import annotations

import collections
import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from nirvana.tritonserver import TritonServer
from nirvana_export.repository import repository_variant

FUZZ_REQUESTS = int(os.environ.get("NIRVANA_FUZZ_REQUESTS", "300"))
FUZZ_SEED = int(os.environ.get("NIRVANA_FUZZ_SEED") or random.SystemRandom().randrange(2**31))
CONCURRENCY = min(4, max(2, int(os.environ.get("NIRVANA_FUZZ_CONCURRENCY", "3"))))
REQUEST_TIMEOUT_S = 180.0  # per request, on the client: a request without an answer by then hung
# Two server starts and the checks around the run, plus a generous second per request (on two
# CPU cores a 1-4 step request takes well under that, malformed ones a few milliseconds).
TEST_TIMEOUT_S = int(1200 + 1.0 * FUZZ_REQUESTS)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT_S)]

MODEL = "txt2img"
OUTPUTS = ("IMAGE", "CACHE_STATUS", "START_STEP", "SIMILARITY", "MATCHED_PROMPT", "SEED_USED",
           "STEPS_USED", "ADMITTED", "PROMPT_TRUNCATED", "COALESCED")
# The ensemble's inputs and their Triton datatypes (model_repository/txt2img/config.pbtxt).
INPUTS = {"PROMPT": "BYTES", "NEGATIVE_PROMPT": "BYTES", "SEED": "INT64", "STEPS": "INT32",
          "GUIDANCE_SCALE": "FP32", "TENANT": "BYTES", "CACHE": "BOOL", "TIMEOUT_MS": "INT32"}
MAX_BATCH = 8
NP_DTYPES = {"BYTES": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": bool,
             "FP64": np.float64, "INT8": np.int8, "UINT8": np.uint8, "FP16": np.float16, "INT16": np.int16,
             "UINT64": np.uint64}
CACHE_STATUSES = {"miss", "approximate", "exact", "disabled"}
# Statuses of an INVALID_ARG error and of UNAVAILABLE (a TIMEOUT_MS deadline) per protocol. Triton's
# HTTP frontend answers a body it cannot parse (bad JSON, JSON values of the wrong type, a data
# array that does not fill the shape) with 500 and its parser's message, before any model runs.
INVALID_ARG = {"grpc": {"StatusCode.INVALID_ARGUMENT"}, "http": {"400"}, "raw-http": {400, 500}}
UNAVAILABLE = {"grpc": {"StatusCode.UNAVAILABLE"}, "http": {"503"}}

REFERENCE = dict(prompt="a lighthouse on a cliff at dusk, oil painting", seed=424242, steps=4, guidance=7.5)

WORDS = ("a cat", "an astronaut", "riding", "a horse", "on the moon", "watercolor", "neon city", "at night",
         "oil painting", "portrait of", "a dragon", "in the snow", "highly detailed", "8k", "cyberpunk",
         "a bowl of fruit", "by the sea", "sunset", "forest", "studio lighting", "isometric", "pixel art")
POOL = ("a red fox in the snow", "a tiny robot watering plants", "a castle in the clouds, matte painting",
        "草原上的一匹马", "чёрный кот на крыше", "🌋 volcano at dawn 🌅", "café au lait, still life")
UNICODE_RANGES = ((0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
                  (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
                  (0x300, 0x36F), (0x200B, 0x200F), (0x2028, 0x2029), (0xFE00, 0xFE0F), (0x10000, 0x1007F),
                  (0xE000, 0xE0FF))
TENANTS = (None, None, None, "", "alice", "bob", "tenant-1", "T.2_x", "z" * 64, "9lives")
BAD_TENANTS = ("../etc", "..", "a/b", "../../tmp/x", "a b", "-leading", ".hidden", "t" * 65, "ümlaut", "a\\b",
               "tenant\n", "*", "%2e%2e")
BAD_UTF8 = (b"\xff\xfe not utf-8", b"\xc3\x28", b"abc\xed\xa0\x80", b"\xe2\x82", b"\x80", b"ok \xf8\x88\x80\x80\x80",
            b"\xc0\xaf", b"a cat \xf4\x90\x80\x80")
SEEDS = (0, 1, 7, 2**31 - 1, 2**31, 2**32 + 5, 2**53 + 1, 2**63 - 1)


# -- cases -----------------------------------------------------------------------------------------

Tensor = Tuple[str, np.ndarray, str]  # name, array, Triton datatype


@dataclass
class Case:
    index: int
    kind: str
    protocol: str  # grpc, http or raw-http
    tensors: List[Tensor] = field(default_factory=list)
    outputs: Optional[Sequence[str]] = OUTPUTS  # None: ask for no output (the server sends all)
    expect: str = "ok"  # ok | ok-or-deadline | invalid
    names: Tuple[str, ...] = ()  # invalid: the message must contain one of these
    rows: int = 1
    steps: Optional[List[int]] = None
    seeds: Optional[List[int]] = None
    cache: Optional[bool] = None
    key: Optional[dict] = None  # valid one-row requests: what replays them
    binary: bool = True  # http: tensors as binary data (else JSON)
    truncate: Optional[Tuple[str, bytes]] = None  # replace the raw bytes of an input
    body: bytes = b""  # raw-http
    headers: Dict[str, str] = field(default_factory=dict)

    def describe(self, limit: int = 400) -> str:
        if self.protocol == "raw-http":
            return f"#{self.index} {self.kind} raw-http body={self.body[:limit]!r} headers={self.headers}"
        parts = []
        for name, array, dtype in self.tensors:
            flat = array.reshape(-1)
            values = ", ".join(_short(v) for v in flat[:3]) + (", ..." if flat.size > 3 else "")
            parts.append(f"{name}:{dtype}{list(array.shape)}=[{values}]")
        extra = f" truncate={self.truncate}" if self.truncate else ""
        return (f"#{self.index} {self.kind} over {self.protocol}{'' if self.binary else ' (JSON)'}: "
                f"{'; '.join(parts)} outputs={list(self.outputs) if self.outputs else None}{extra}")[:limit * 3]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


def tensor(name: str, values, dtype: Optional[str] = None, rows: int = 1) -> Tensor:
    """A [rows, 1] tensor repeating ``values`` (a scalar, or one per row) in ``dtype``."""
    dtype = dtype or INPUTS[name]
    if not isinstance(values, list):
        values = [values] * rows
    array = np.array([[v] for v in values], dtype=NP_DTYPES[dtype])
    return name, array, dtype


def random_text(rng: random.Random, length: int) -> str:
    chars = []
    for _ in range(length):
        lo, hi = rng.choice(UNICODE_RANGES)
        c = rng.randint(lo, hi)
        chars.append(chr(c))
    return "".join(chars)


def random_prompt(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.35:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    if roll < 0.6:
        return random_text(rng, rng.randint(1, 60))
    if roll < 0.7:  # very long: the tokenizer truncates to 77 tokens
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 3000)))
    if roll < 0.75:
        return random_text(rng, rng.randint(1000, 20000))
    if roll < 0.8:  # odd but valid: leading/trailing whitespace, control characters, one character
        return rng.choice(["  a cat  ", "\ta\tcat\n", "x", "\x01\x7f bell", "é", "🙂", "a\u0301\u0302\u0303",
                           "\u202eevil rtl", "\ufeffbom first", "line1\r\nline2"])
    return rng.choice(POOL)


def random_outputs(rng: random.Random) -> Optional[Sequence[str]]:
    """The outputs a request asks for: all, none named (the server sends all), IMAGE alone, or
    IMAGE with any subset of the others. Never a subset without IMAGE: Triton 2.51's ensemble
    answers some of those (CACHE_STATUS alone, SEED_USED alone) with "unexpected deadlock", a
    documented limitation of the server (README: always request IMAGE or no output list)."""
    roll = rng.random()
    if roll < 0.3:
        return OUTPUTS
    if roll < 0.45:
        return None
    if roll < 0.65:
        return ("IMAGE",)
    return ("IMAGE", *rng.sample(OUTPUTS[1:], rng.randint(1, len(OUTPUTS) - 1)))


def valid_case(rng: random.Random, index: int, protocol: str) -> Case:
    rows = 1 if rng.random() < 0.85 else 2
    prompts = [random_prompt(rng) for _ in range(rows)]
    pooled = rng.random() < 0.3  # a small key space, so that exact and approximate hits happen
    if pooled:
        prompts = [rng.choice(POOL) for _ in range(rows)]
    tensors = []
    expect = "ok"
    blank = any(not p.strip() for p in prompts)
    tensors.append(tensor("PROMPT", [p.encode() for p in prompts]))
    negative = None
    if rng.random() < 0.3:
        negative = rng.choice(["", "blurry", "low quality, watermark", random_text(rng, rng.randint(0, 30))])
        tensors.append(tensor("NEGATIVE_PROMPT", negative.encode(), rows=rows))
    seeds = None
    if rng.random() < 0.9:
        seeds = [rng.choice(SEEDS) if rng.random() < 0.3 else rng.randrange(4 if pooled else 2**31)
                 for _ in range(rows)]
        tensors.append(tensor("SEED", seeds))
    steps = [rng.randint(1, 4) for _ in range(rows)]
    tensors.append(tensor("STEPS", steps))
    guidance = None
    if rng.random() < 0.7:
        guidance = rng.choice([0.0, 1.0, 7.5, 50.0, -0.0, round(rng.uniform(0, 15), 3)])
        tensors.append(tensor("GUIDANCE_SCALE", guidance, rows=rows))
    tenant = rng.choice(TENANTS)
    if tenant is not None:
        tensors.append(tensor("TENANT", tenant.encode(), rows=rows))
    cache = rng.choice([None, None, True, False])
    if cache is not None:
        tensors.append(tensor("CACHE", cache, rows=rows))
    roll = rng.random()
    if roll < 0.1:
        tensors.append(tensor("TIMEOUT_MS", rng.choice([600_000, 3_600_000]), rows=rows))
    elif roll < 0.14:  # a deadline the request may miss: UNAVAILABLE naming TIMEOUT_MS, or done
        tensors.append(tensor("TIMEOUT_MS", rng.randint(1, 50), rows=rows))
        expect = "ok-or-deadline"
    rng.shuffle(tensors)
    outputs = random_outputs(rng)
    case = Case(index, "valid", protocol, tensors, outputs, expect, rows=rows, steps=steps, seeds=seeds,
                cache=cache, binary=protocol != "http" or rng.random() < 0.7)
    if blank:  # a blank random prompt is not valid: the server must say so
        case.kind, case.expect, case.names = "blank-prompt", "invalid", ("PROMPT",)
    elif rows == 1 and seeds is not None and cache is not False:
        case.key = dict(prompt=prompts[0], negative=negative, seed=seeds[0], steps=steps[0],
                        guidance=guidance, tenant=tenant)
    return case


def base_tensors(rng: random.Random, rows: int = 1) -> Dict[str, Tensor]:
    """A small valid request (1 step), by input name, for a malformed case to break one part of."""
    return {"PROMPT": tensor("PROMPT", rng.choice(WORDS).encode(), rows=rows),
            "SEED": tensor("SEED", rng.randrange(1000), rows=rows),
            "STEPS": tensor("STEPS", 1, rows=rows)}


WRONG_DTYPES = {"BYTES": ["INT32", "FP32", "UINT8", "BOOL", "INT64"],
                "INT64": ["INT32", "FP32", "BYTES", "FP64", "UINT64"],
                "INT32": ["INT64", "FP32", "BYTES", "INT16", "BOOL"],
                "FP32": ["FP64", "FP16", "INT32", "BYTES"],
                "BOOL": ["INT32", "UINT8", "BYTES", "FP32"]}


def wrong_value(dtype: str, rng: random.Random):
    if dtype == "BYTES":
        return rng.choice([b"1", b"a cat", b""])
    if dtype == "BOOL":
        return rng.random() < 0.5
    if dtype.startswith("FP"):
        return rng.choice([1.0, 2.5, -1.0, 0.0])
    return rng.choice([0, 1, 2, 3])


def malformed_case(rng: random.Random, index: int, protocol: str) -> Case:
    kinds = [("wrong-dtype", 14), ("wrong-shape", 10), ("missing-prompt", 5), ("no-inputs", 1), ("unknown-input", 6),
             ("duplicate-input", 3), ("steps-range", 8), ("timeout-range", 5), ("seed-range", 4),
             ("guidance-range", 6), ("bad-utf8", 8), ("nul-char", 3), ("blank-prompt", 3), ("bad-tenant", 6),
             ("oversized-batch", 6), ("mismatched-rows", 4), ("unknown-output", 3), ("truncated-bytes", 4),
             ("zero-batch", 2), ("prompt-too-long", 1), ("raw-http", 4)]
    kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
    if kind == "raw-http":
        return raw_http_case(rng, index)
    t = base_tensors(rng)
    names: Tuple[str, ...] = ()
    outputs: Optional[Sequence[str]] = random_outputs(rng)
    truncate = None
    extra: List[Tensor] = []
    if kind == "wrong-dtype":
        name = rng.choice(list(INPUTS))
        dtype = rng.choice(WRONG_DTYPES[INPUTS[name]])
        t[name] = tensor(name, wrong_value(dtype, rng), dtype)
        names = (name,)
    elif kind == "wrong-shape":
        name = rng.choice(list(INPUTS))
        dtype = INPUTS[name]
        shape = rng.choice([(1, 2), (1, 3), (2, 2), (1, 1, 1), (1,), (1, 0), (1, 1, 2)])
        value = wrong_value(dtype, rng) if dtype != "BYTES" else b"a cat"
        t[name] = (name, np.full(shape, value, dtype=NP_DTYPES[dtype]), dtype)
        # A first dimension other than 1 is a batch size that differs from the other inputs':
        # Triton names one of them (the first it checks), not necessarily this one.
        names = (name,) if shape[0] == 1 else (name, "batch size does not match")
    elif kind == "missing-prompt":
        del t["PROMPT"]
        if rng.random() < 0.5:
            t["NEGATIVE_PROMPT"] = tensor("NEGATIVE_PROMPT", b"blurry")
        names = ("PROMPT",)
    elif kind == "no-inputs":  # Triton's ensemble says so before any model runs
        t = {}
        names = ("PROMPT", "0 inputs")
    elif kind == "unknown-input":
        name = rng.choice(["BOGUS", "prompt", "IMAGE", "SEED_USED", "COMMAND", "POOLED_EMBEDDING", "INPUT_IDS",
                           "PROMPT ", "ПРОМПТ", "DEADLINE_NS", "START_STEP"])
        extra.append(tensor(name, 1, "INT32") if rng.random() < 0.5 else tensor(name, b"x", "BYTES"))
        names = (name,)
    elif kind == "duplicate-input":
        name = rng.choice(["PROMPT", "STEPS", "SEED"])
        extra.append(t[name])
        names = (name,)
    elif kind == "steps-range":
        t["STEPS"] = tensor("STEPS", rng.choice([0, -1, -5, 201, 10_000, 2**31 - 1, -2**31]))
        names = ("STEPS",)
    elif kind == "timeout-range":
        t["TIMEOUT_MS"] = tensor("TIMEOUT_MS", rng.choice([0, -1, -1000, 3_600_001, 2**31 - 1, -2**31]))
        names = ("TIMEOUT_MS",)
    elif kind == "seed-range":
        t["SEED"] = tensor("SEED", rng.choice([-1, -2**63, -12345]))
        names = ("SEED",)
    elif kind == "guidance-range":
        t["GUIDANCE_SCALE"] = tensor("GUIDANCE_SCALE", rng.choice([math.nan, math.inf, -math.inf, -0.5, 50.5, 1e30,
                                                                   -1e-30]))
        names = ("GUIDANCE_SCALE",)
    elif kind == "bad-utf8":
        name = rng.choice(["PROMPT", "NEGATIVE_PROMPT", "TENANT"])
        t[name] = tensor(name, rng.choice(BAD_UTF8))
        names = (name,)
    elif kind == "nul-char":
        name = rng.choice(["PROMPT", "NEGATIVE_PROMPT", "TENANT"])
        t[name] = tensor(name, rng.choice([b"a\x00b", b"\x00", b"cat\x00"]))
        names = (name,)
    elif kind == "blank-prompt":
        t["PROMPT"] = tensor("PROMPT", rng.choice([b"", b" ", b"\t \n", "\u3000\u2003".encode(), b"\r\n\x0b\x0c"]))
        names = ("PROMPT",)
    elif kind == "bad-tenant":
        t["TENANT"] = tensor("TENANT", rng.choice(BAD_TENANTS).encode())
        names = ("TENANT",)
    elif kind == "oversized-batch":
        rows = rng.choice([MAX_BATCH + 1, 16, 100, 1000])
        t = base_tensors(rng, rows)
        names = ("batch",)
    elif kind == "mismatched-rows":
        t = base_tensors(rng, 2)
        name = rng.choice(["SEED", "STEPS", "PROMPT"])
        t[name] = base_tensors(rng, rng.choice([1, 3]))[name]
        names = ("PROMPT", "SEED", "STEPS", "batch")
    elif kind == "unknown-output":
        outputs = [rng.choice(["FOO", "image", "input_ids", "prompt_embedding", "LATENTS", "ADMIN_RESULT"])]
        if rng.random() < 0.5:
            outputs.append("IMAGE")
        names = (outputs[0],)
    elif kind == "truncated-bytes":  # raw tensor bytes that do not match the declared shape
        name = rng.choice(["PROMPT", "PROMPT", "NEGATIVE_PROMPT", "TENANT", "STEPS", "SEED", "GUIDANCE_SCALE"])
        if name not in t:
            t[name] = tensor(name, {"GUIDANCE_SCALE": 7.5, "NEGATIVE_PROMPT": b"blurry", "TENANT": b"bob"}.get(name, 1))
        raw = rng.choice([b"", b"\x01", b"\x05\x00\x00\x00ab", b"\xff\xff\xff\xff", b"\x01\x00\x00\x00" * 3])
        truncate = (name, raw)
        names = (name,)
    elif kind == "zero-batch":
        t = {n: (n, np.zeros((0, 1), dtype=a.dtype), d) for n, (_, a, d) in t.items()}
        names = ("PROMPT", "SEED", "STEPS", "batch")
    elif kind == "prompt-too-long":
        t["PROMPT"] = tensor("PROMPT", b"y" * (1024 * 1024 + rng.randint(1, 100)))
        names = ("PROMPT",)
    tensors = list(t.values()) + extra
    rng.shuffle(tensors)
    return Case(index, kind, protocol, tensors, outputs, "invalid", names, truncate=truncate,
                binary=protocol != "http" or rng.random() < 0.7)


def raw_http_case(rng: random.Random, index: int) -> Case:
    """Bodies the HTTP client library would not build: element counts, JSON types, broken framing.

    Triton's HTTP frontend rejects most of them while parsing, with its parser's message (which
    does not name the input): only an error status and a message are required then."""
    prompt = {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": ["a cat"]}
    steps = {"name": "STEPS", "shape": [1, 1], "datatype": "INT32", "data": [1]}
    choice = rng.randrange(7)
    headers = {"Content-Type": "application/json"}
    names: Tuple[str, ...] = ()
    if choice == 0:  # two values for a [1, 1] tensor
        steps["data"] = [1, 2]
    elif choice == 1:  # JSON types that are not the tensor's
        steps["data"] = [rng.choice(["two", 1.5, True, None])]
    elif choice == 2:
        prompt["data"] = [rng.choice([5, None, {"text": "a cat"}])]  # (nested lists are valid JSON tensors)
    elif choice == 3:
        prompt["shape"] = rng.choice([[1, -1], [-1, 1], [], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    elif choice == 4:
        # Out of INT32 range. Triton's JSON parser wraps integers modulo 2**32 instead of refusing
        # them (2**32 + 1 arrives as a valid 1): 2**40 arrives as 0, which the tokenizer refuses.
        steps["data"], names = [2**40], ("STEPS",)
    body = json.dumps({"inputs": [prompt, steps]}).encode()
    if choice == 5:  # not an inference request at all
        body = rng.choice([b"{", b"\x00\xff garbage", b"[]", b'{"inputs": 5}', b'{"inputs": [{}]}', b"",
                           b'{"inputs": [], "outputs": [{"name": 7}]}'])
    elif choice == 6:  # binary extension whose header length points past the body
        body = json.dumps({"inputs": [prompt]}).encode()
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(len(body) + rng.randint(1, 1000))}
    return Case(index, f"raw-http-{choice}", "raw-http", expect="invalid", names=names, body=body, headers=headers)


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the run with ``seed``: depends on nothing else (replayable)."""
    rng = random.Random(f"{seed}:{index}")
    protocol = rng.choice(["grpc", "http"])
    if rng.random() < 0.2:
        return valid_case(rng, index, protocol)
    return malformed_case(rng, index, protocol)


# -- sending ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    ok: bool
    status: str = ""
    message: str = ""
    result: Optional[Dict[str, np.ndarray]] = None
    seconds: float = 0.0
    client_error: str = ""  # the client got no answer (timeout, connection): a hang or a crash


class Sender:
    """One tritonclient per protocol and thread (the HTTP client is not thread-safe)."""

    def __init__(self, server: TritonServer):
        self.server = server
        self.local = threading.local()

    def client(self, protocol: str):
        clients = self.local.__dict__.setdefault("clients", {})
        if protocol not in clients:
            if protocol == "grpc":
                import tritonclient.grpc as module

                clients[protocol] = module, module.InferenceServerClient(self.server.grpc_url)
            else:
                import tritonclient.http as module

                clients[protocol] = module, module.InferenceServerClient(
                    self.server.http_url, network_timeout=REQUEST_TIMEOUT_S, connection_timeout=REQUEST_TIMEOUT_S)
        return clients[protocol]

    def reset(self, protocol: str) -> None:
        clients = self.local.__dict__.get("clients", {})
        entry = clients.pop(protocol, None)
        if entry is not None:
            try:
                entry[1].close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        for protocol in list(self.local.__dict__.get("clients", {})):
            self.reset(protocol)

    def send(self, case: Case) -> Answer:
        start = time.monotonic()
        try:
            answer = self._raw(case) if case.protocol == "raw-http" else self._infer(case)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - no answer from the server (gevent's Timeout is a BaseException)
            if case.protocol != "raw-http":
                self.reset(case.protocol)
            answer = Answer(False, client_error=f"{type(exc).__name__}: {exc}")
        answer.seconds = time.monotonic() - start
        return answer

    def _infer(self, case: Case) -> Answer:
        module, client = self.client(case.protocol)
        inputs = []
        for name, array, dtype in case.tensors:
            item = module.InferInput(name, list(array.shape), dtype)
            if case.protocol == "http":
                # JSON cannot carry NaN/inf or bytes that are not UTF-8: those go as binary data.
                as_json = not case.binary and not (array.dtype.kind == "f" and not np.isfinite(array).all())
                try:
                    item.set_data_from_numpy(array, binary_data=not as_json)
                except Exception:  # noqa: BLE001
                    item.set_data_from_numpy(array, binary_data=True)
            else:
                item.set_data_from_numpy(array)
            if case.truncate and case.truncate[0] == name:
                if case.protocol == "grpc":
                    item._raw_content = case.truncate[1]
                else:
                    item._data = None
                    item._raw_data = case.truncate[1]
                    item._parameters["binary_data_size"] = len(case.truncate[1])
            inputs.append(item)
        outputs = None if case.outputs is None else [module.InferRequestedOutput(o) for o in case.outputs]
        timeout = {"client_timeout": REQUEST_TIMEOUT_S} if case.protocol == "grpc" else {}
        try:
            response = client.infer(MODEL, inputs, outputs=outputs, **timeout)
        except module.InferenceServerException as exc:
            status = str(exc.status())
            if case.protocol == "grpc" and status in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"):
                raise TimeoutError(f"no answer in {REQUEST_TIMEOUT_S:.0f}s ({status})") from None
            if case.protocol == "grpc" and status == "StatusCode.UNAVAILABLE" and "connect" in (exc.message() or ""):
                raise ConnectionError(exc.message()) from None
            return Answer(False, status, exc.message() or str(exc))
        names = case.outputs or OUTPUTS
        return Answer(True, result={n: response.as_numpy(n) for n in names})

    def _raw(self, case: Case) -> Answer:
        host, port = self.server.http_url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request("POST", f"/v2/models/{MODEL}/infer", body=case.body, headers=case.headers)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text
        return Answer(resp.status == 200, resp.status, str(message))


# -- checking --------------------------------------------------------------------------------------

def check(case: Case, answer: Answer, image_shape: Tuple[int, ...]) -> Tuple[str, Optional[str]]:
    """(outcome, problem or None) of one answer."""
    if answer.client_error:
        return "no-answer", f"no answer: {answer.client_error}"
    if case.expect == "invalid":
        if answer.ok:
            return "accepted", "a malformed request succeeded"
        if answer.status not in INVALID_ARG[case.protocol]:
            return "wrong-status", f"status {answer.status} (expected INVALID_ARG): {answer.message[:500]!r}"
        if case.names and not any(n in answer.message for n in case.names):
            return "unnamed", f"the error does not name {' or '.join(case.names)}: {answer.message[:500]!r}"
        if not answer.message.strip():
            return "unnamed", "an empty error message"
        return "rejected", None
    if not answer.ok:
        if (case.expect == "ok-or-deadline" and answer.status in UNAVAILABLE[case.protocol]
                and "TIMEOUT_MS" in answer.message):
            return "deadline", None
        return "failed", f"a valid request failed: {answer.status} {answer.message[:500]!r}"
    return "ok", check_result(case, answer.result, image_shape)


def check_result(case: Case, result: Dict[str, np.ndarray], image_shape: Tuple[int, ...]) -> Optional[str]:
    image = result.get("IMAGE")
    if case.outputs is None or "IMAGE" in case.outputs:
        if image is None:
            return "no IMAGE in the response"
        if image.dtype != np.uint8:
            return f"IMAGE has dtype {image.dtype}, expected uint8"
        if image.shape != (case.rows, *image_shape):
            return f"IMAGE has shape {image.shape}, expected {(case.rows, *image_shape)}"
    status = result.get("CACHE_STATUS")
    if status is not None:
        statuses = {s.decode() if isinstance(s, bytes) else str(s) for s in status.reshape(-1)}
        if not statuses <= CACHE_STATUSES or status.shape != (case.rows, 1):
            return f"CACHE_STATUS {status.tolist()}"
        if case.cache is False and statuses != {"disabled"}:
            return f"CACHE false but CACHE_STATUS {status.tolist()}"
        if case.cache is not False and "disabled" in statuses:
            return f"cache on but CACHE_STATUS {status.tolist()}"
    used = result.get("STEPS_USED")
    if used is not None and used.reshape(-1).tolist() != case.steps:
        return f"STEPS_USED {used.reshape(-1).tolist()}, expected {case.steps}"
    seeds = result.get("SEED_USED")
    if seeds is not None and case.seeds is not None and seeds.reshape(-1).tolist() != case.seeds:
        return f"SEED_USED {seeds.reshape(-1).tolist()}, expected {case.seeds}"
    return None


TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
# Request errors that a model may log (with their traceback) and still answer properly.
REQUEST_ERRORS = re.compile(r"\b(InvalidInput|EngineUnavailable|DeadlineExceeded|Overloaded|RequestCancelled|"
                            r"ShuttingDown)\b")
CRASH = re.compile(r"Signal \((?!15\)|2\))\d+\) received|Segmentation fault|core dumped|is not healthy|"
                   r"Stub process .* (?:died|unhealthy)|terminate called", re.IGNORECASE)


def log_problems(text: str) -> List[str]:
    """Tracebacks from our models (other than logged request errors) and crash signs in a server log."""
    problems = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if TRACEBACK.search(line):
            block = [line]
            for nxt in lines[i + 1:i + 200]:
                block.append(nxt)
                if nxt and not nxt[0].isspace() and not TRACEBACK.search(nxt) and "During handling" not in nxt \
                        and "direct cause" not in nxt:
                    break
            if not REQUEST_ERRORS.search(block[-1]):
                problems.append("\n".join(block[-25:]))
        elif CRASH.search(line):
            problems.append(line)
    return problems


def http_ok(url: str, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}{path}", timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


def generate(server: TritonServer, key: dict, cache: Optional[bool]):
    """One solo request over gRPC: (IMAGE, CACHE_STATUS)."""
    from nirvana_client import Txt2ImgClient

    with Txt2ImgClient(server.grpc_url, "grpc", timeout_s=REQUEST_TIMEOUT_S) as client:
        result = client.generate(key["prompt"], negative_prompt=key.get("negative"), seed=key["seed"],
                                 steps=key["steps"], guidance_scale=key.get("guidance"), tenant=key.get("tenant"),
                                 cache=cache)
    return result.image, result.cache_status


# -- the test --------------------------------------------------------------------------------------

def signature(problem: str) -> str:
    """A problem with its numbers and quoted values blanked: equal signatures, one bug."""
    first = problem.splitlines()[0]
    return re.sub(r"'[^']*'|\b\d+\b", "_", first)[:160]


def fuzz(server: TritonServer, image_shape: Tuple[int, ...]) -> dict:
    """Send the run's requests, CONCURRENCY at a time; what came back, checked."""
    outcomes: Dict[Tuple[str, str], int] = collections.Counter()
    failures: Dict[str, List[str]] = collections.defaultdict(list)  # by signature
    admitted: List[Tuple[dict, np.ndarray]] = []
    slowest: List[Tuple[float, str]] = []
    lock = threading.Lock()
    counter = iter(range(FUZZ_REQUESTS))
    stop = threading.Event()
    sender = Sender(server)

    def worker():
        try:
            while not stop.is_set():
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                case = make_case(FUZZ_SEED, index)
                answer = sender.send(case)
                outcome, problem = check(case, answer, image_shape)
                with lock:
                    outcomes[(case.kind, outcome)] += 1
                    slowest.append((round(answer.seconds, 2), f"#{index} {case.kind}"))
                    slowest.sort(reverse=True)
                    del slowest[5:]
                    if problem:
                        failures[signature(problem)].append(f"{problem}\n      request {case.describe()}")
                    elif (outcome == "ok" and case.key is not None and answer.result
                          and "ADMITTED" in answer.result and "IMAGE" in answer.result
                          and int(answer.result["ADMITTED"].reshape(-1)[0]) > 0 and len(admitted) < 200):
                        admitted.append((case.key, answer.result["IMAGE"][0]))
                if answer.client_error and server.process.poll() is not None:
                    stop.set()  # the server is gone: every later request would fail the same way
        finally:
            sender.close()

    began = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"fuzz-{i}") for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_outcome = collections.Counter()
    for (_, outcome), n in outcomes.items():
        by_outcome[outcome] += n
    return dict(outcomes=outcomes, by_outcome=by_outcome, failures=failures, admitted=admitted,
                slowest=slowest, seconds=time.monotonic() - began)


def test_fuzzed_requests_over_http_and_grpc_with_persistence(repository, tmp_path, capsys):
    """Every request answered as it should be, then: live, ready, deterministic, a clean log,
    a loadable snapshot and exact hits after a restart on it. All problems are reported together."""
    from google.protobuf import json_format

    from nirvana.cache import LatentCache
    from nirvana.cache.persistence import CachePersistence
    from nirvana.config import CacheConfig, PipelineSpec, parse_parameters, read_model_config

    snapshots = tmp_path / "cache"
    variant = repository_variant(repository, tmp_path / "repo", {
        "latent_cache": {"snapshot_path": str(snapshots), "snapshot_interval_s": "2"}})
    banner = (f"fuzz seed {FUZZ_SEED} (NIRVANA_FUZZ_SEED={FUZZ_SEED} NIRVANA_FUZZ_REQUESTS={FUZZ_REQUESTS} "
              f"replays the run; case i depends only on the seed)")
    problems: List[str] = []
    keep: List[Tuple[dict, np.ndarray]] = []

    with TritonServer(variant, log_file=tmp_path / "server.log") as server:
        reference, status = generate(server, REFERENCE, cache=False)
        assert status == "disabled"
        image_shape = reference.shape  # (H, W, 3)
        assert reference.dtype == np.uint8 and len(image_shape) == 3 and image_shape[2] == 3

        run = fuzz(server, image_shape)
        failures, admitted = run["failures"], run["admitted"]
        with capsys.disabled():
            print(f"\n{banner}\n{sum(run['outcomes'].values())} of {FUZZ_REQUESTS} answered in {run['seconds']:.0f}s "
                  f"at concurrency {CONCURRENCY}; by outcome {dict(run['by_outcome'])}\nby kind and outcome "
                  f"{dict(sorted(run['outcomes'].items()))}\nslowest {run['slowest']}; {len(admitted)} admitted "
                  f"keys kept", flush=True)
        for _, examples in sorted(failures.items(), key=lambda item: -len(item[1])):
            problems.append(f"{len(examples)} x {examples[0]}")

        alive = server.process.poll() is None
        if not alive:
            problems.append(f"the server died (exit {server.process.returncode}); log:\n{server.log_tail()}")
        elif sum(run["outcomes"].values()) != FUZZ_REQUESTS:
            problems.append(f"only {sum(run['outcomes'].values())} of {FUZZ_REQUESTS} requests were answered")
        if alive:
            # Still live, ready and deterministic.
            for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
                if not http_ok(server.http_url, path):
                    problems.append(f"GET {path} is not 200 after the fuzz")
            again, status = generate(server, REFERENCE, cache=False)
            if status != "disabled" or not (again == reference).all():
                problems.append(f"the reference request {REFERENCE} no longer gives the image it gave before "
                                f"the fuzz (CACHE_STATUS {status}, {int((again != reference).sum())} values differ)")
            if not admitted and FUZZ_REQUESTS >= 50:
                problems.append("no valid request was admitted to the cache")
            keep = [admitted[i] for i in sorted(random.Random(FUZZ_SEED).sample(range(len(admitted)),
                                                                                min(3, len(admitted))))]
            server.stop()  # SIGTERM: the latent_cache writes its final snapshot while unloading
            if server.process.returncode != 0:
                problems.append(f"tritonserver exited with {server.process.returncode} on SIGTERM")
        problems += [f"server log: {p}" for p in log_problems(server.log_file.read_text(errors="replace"))]

    if alive:
        # Offline: the snapshot and journal restore without a problem into a fresh cache.
        if not (snapshots / "CURRENT").exists():
            problems.append(f"no snapshot under {snapshots} after SIGTERM")
        config_pb = read_model_config(variant / "latent_cache" / "config.pbtxt")
        config = parse_parameters(CacheConfig, json_format.MessageToDict(config_pb, preserving_proto_field_name=True))
        spec = PipelineSpec.load(variant / "latent_cache" / "1")
        cache = LatentCache(config.with_model_thresholds(spec), spec.embedding_dim)
        report = CachePersistence(cache, snapshots, threading.Lock(), interval_s=-1).restore()
        cache.close()
        if report["problems"] or (admitted and not report["entries"]):
            problems.append(f"offline restore of the snapshot: {report}")

        # Online: a new server on the same snapshot answers earlier requests with exact hits.
        with TritonServer(variant, log_file=tmp_path / "server2.log") as server:
            for key, image in keep:
                replay, status = generate(server, key, cache=True)
                if status != "exact" or not (replay == image).all():
                    problems.append(f"after the restart {key} came back {status}, "
                                    f"{int((replay != image).sum())} image values differ from the first answer")
            server.stop()
            problems += [f"restarted server's log: {p}"
                         for p in log_problems(server.log_file.read_text(errors="replace"))]

    assert not problems, f"{banner}: {len(problems)} problems\n" + "\n".join(problems[:30])
