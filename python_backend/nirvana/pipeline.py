"""The pipeline's steps, one class per Triton model, over numpy inputs and outputs.

Each step has ``INPUTS`` and ``execute(batch)``: ``batch`` holds one dict of
input arrays per Triton request (leading dimension = that request's batch
size); the result holds, per request, a dict of output arrays or the
exception that request raised. Triton adapters call them through
:func:`nirvana.backend.serve`; tests call them directly.
"""

from __future__ import annotations

import collections
import hashlib
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from nirvana import admin
from nirvana import inputs as rq
from nirvana.config import OnnxModelConfig, PipelineSpec, RequestDefaults, UNetLoopConfig
from nirvana.guard import CHECK_FIELDS, CHECK_NUMBERS, ResumeCheck, format_verdict
from nirvana.onnx_session import OnnxModel
from nirvana.schedulers import history_length, make_scheduler
from nirvana.text import PromptTokenizer
from nirvana.step_engine import DeadlineExceeded, StepEngine, Ticket
from nirvana.unet_loop import DenoiseJob, DenoiseResult, StepRangeLoop

Batch = List[Dict[str, Optional[np.ndarray]]]
Results = List[Union[Dict[str, np.ndarray], BaseException]]


def bytes_column(values: Sequence[str]) -> np.ndarray:
    return np.array([[v.encode("utf-8")] for v in values], dtype=object)


def _split(array: np.ndarray, counts: Sequence[int]) -> List[np.ndarray]:
    return np.split(array, np.cumsum(counts)[:-1]) if counts else []


def per_request(batch: Batch, fn) -> Results:
    """Apply ``fn`` per request, turning its InvalidInput (or refused admin key) into that request's error."""
    results: Results = []
    for inputs in batch:
        try:
            results.append(fn(inputs))
        except (rq.InvalidInput, admin.Unauthorized) as exc:
            results.append(exc)
    return results


def inputs_digest(*parts) -> str:
    """A digest of some inputs (arrays, numbers, tuples): equal digests mean byte-identical inputs.

    A deterministic computation gives them the same result, so it runs once: the step engine
    coalesces identical denoising rows, the ONNX steps' memo answers repeated input rows.
    """
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(array.tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


class TokenizerStep:
    """Entry of the pipeline: validates the request, resolves defaults, tokenizes both prompts."""

    INPUTS = ("PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE_SCALE", "TENANT", "TIMEOUT_MS")

    def __init__(self, directory: Path, defaults: RequestDefaults):
        self.defaults = defaults
        spec = PipelineSpec.load(directory)
        self.tokenizer = PromptTokenizer(Path(directory) / "tokenizer", spec.max_length)

    def execute(self, batch: Batch) -> Results:
        return per_request(batch, self._one)

    def _one(self, inputs) -> Dict[str, np.ndarray]:
        d = self.defaults
        rows = rq.batch_rows(inputs["PROMPT"], "PROMPT")
        prompts = rq.decode_texts(inputs["PROMPT"], "PROMPT", rows, required=True, max_bytes=d.max_prompt_bytes)
        negatives = rq.decode_texts(inputs["NEGATIVE_PROMPT"], "NEGATIVE_PROMPT", rows, required=False,
                                    max_bytes=d.max_prompt_bytes)
        rq.resolve_tenants(inputs.get("TENANT"), rows)
        seeds = rq.resolve_seeds(inputs["SEED"], rows)
        steps = rq.resolve_steps(inputs["STEPS"], rows, d.default_steps, d.max_steps)
        guidance = rq.resolve_guidance(inputs["GUIDANCE_SCALE"], rows, d.default_guidance_scale,
                                       d.max_guidance_scale)
        # The deadline is stamped here, where the request enters the pipeline, on the wall clock
        # that every model process of this server shares.
        deadlines = rq.resolve_deadlines(inputs.get("TIMEOUT_MS"), rows, d.max_timeout_ms, time.time_ns())
        cond = self.tokenizer(prompts)
        uncond = self.tokenizer(negatives)
        return {
            "INPUT_IDS": cond.input_ids, "ATTENTION_MASK": cond.attention_mask,
            "NEGATIVE_INPUT_IDS": uncond.input_ids, "NEGATIVE_ATTENTION_MASK": uncond.attention_mask,
            "RESOLVED_SEED": seeds.reshape(rows, 1), "RESOLVED_STEPS": steps.reshape(rows, 1),
            "RESOLVED_GUIDANCE_SCALE": guidance.reshape(rows, 1),
            "PROMPT_TRUNCATED": cond.truncated.reshape(rows, 1),
            "RESOLVED_DEADLINE_NS": deadlines.reshape(rows, 1),
        }


class RowMemo:
    """Outputs of recently seen input rows (least recently used first out), keyed by a digest
    of the row's input bytes: a deterministic graph gives a repeated row the same outputs."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: "collections.OrderedDict[str, Dict[str, np.ndarray]]" = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> Optional[Dict[str, np.ndarray]]:
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, key: str, row: Dict[str, np.ndarray]) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)


class OnnxStep:
    """Runs one ONNX graph over all requests of a batch at once (text_encoder, vae_decoder);
    with ``memo_rows``, rows seen recently are answered from a :class:`RowMemo` and only the
    others run."""

    def __init__(self, onnx_path: Path, config: OnnxModelConfig):
        self.model = OnnxModel(onnx_path, config.execution_provider, config.intra_op_threads)
        self.INPUTS = tuple(self.model.input_names)
        self.memo = RowMemo(config.memo_rows) if config.memo_rows else None

    def execute(self, batch: Batch) -> Results:
        for inputs in batch:
            for name, value in inputs.items():
                if value is None:
                    raise rq.InvalidInput(name, "is required")
        counts = [len(inputs[self.INPUTS[0]]) for inputs in batch]
        feeds = {name: np.concatenate([inputs[name] for inputs in batch]) for name in self.INPUTS}
        outputs = self.model.run(feeds) if self.memo is None else self._run_memoized(feeds)
        split = {name: _split(value, counts) for name, value in outputs.items()}
        return [{name: split[name][i] for name in outputs} for i in range(len(batch))]

    def _run_memoized(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows = len(feeds[self.INPUTS[0]])
        keys = [inputs_digest(*(feeds[name][i] for name in self.INPUTS)) for i in range(rows)]
        found = [self.memo.get(key) for key in keys]
        todo = [i for i, row in enumerate(found) if row is None]
        if todo:
            computed = self.model.run({name: value[todo] for name, value in feeds.items()})
            for j, i in enumerate(todo):
                found[i] = {name: value[j].copy() for name, value in computed.items()}
                self.memo.put(keys[i], found[i])
        return {name: np.stack([row[name] for row in found]) for name in found[0]}


class Responder(Protocol):
    """How a held request is answered later (Triton's response sender, in the adapter)."""

    def send(self, outputs: Dict[str, np.ndarray]) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def is_cancelled(self) -> bool: ...


class UNetLoopStep:
    """The unet_loop model: denoises each request from START_STEP to STEPS.

    With ``batching`` "step" (default) requests are handed to a :class:`StepEngine` with
    :meth:`submit` and answered from its thread when their own rows are done; with "execute"
    all requests of one Triton batch run one loop together in :meth:`execute`.
    """

    REQUIRED = ("HIDDEN_STATES", "NEGATIVE_HIDDEN_STATES", "LATENTS", "START_STEP", "STEPS",
                "GUIDANCE_SCALE", "SAVE_STEPS")
    # DEADLINE_NS optional; the resume guard's latent check (from the cache lookup): all or none.
    INPUTS = REQUIRED + ("DEADLINE_NS",) + CHECK_FIELDS

    def __init__(self, directory: Path, config: UNetLoopConfig,
                 on_engine_tick: Optional[Callable[[StepEngine], None]] = None,
                 log_error: Optional[Callable[[str], None]] = None):
        self.spec = PipelineSpec.load(directory)
        self.config = config
        self.unet = OnnxModel(Path(directory) / "unet.onnx", config.execution_provider, config.intra_op_threads)
        self.loop = StepRangeLoop(self._predict_noise, config.scheduler, self.spec.scheduler_config)
        # A multistep solver (dpmpp, lms) resumes exactly only with its history, which does not
        # travel through the ensemble: with one, no intermediate state is handed out for caching
        # and resuming from one is refused (exact hits, the final latents, still work).
        self.resumes_from_cache = history_length(
            config.scheduler, make_scheduler(config.scheduler, self.spec.scheduler_config)) == 0
        self.engine: Optional[StepEngine] = None
        if config.batching == "step":
            self.engine = StepEngine(self.loop, config.max_active_rows, config.max_pending_rows,
                                     config.cancel_check_ticks, config.stuck_tick_s, on_engine_tick, log_error)

    def _predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # Jobs live on the UNet's device (see jobs_for), so with IOBinding nothing is copied per step.
        device = self.unet.device
        feeds = {"sample": sample.to(device), "timestep": timestep.to(device), "encoder_hidden_states": hidden.to(device)}
        if self.config.io_binding:
            return self.unet.run_bound(feeds, output_shapes={"noise_pred": tuple(sample.shape)})["noise_pred"]
        out = self.unet.run({k: v.cpu().numpy() for k, v in feeds.items()})
        return torch.from_numpy(out["noise_pred"]).to(device)

    def submit(self, inputs, responder: Responder) -> None:
        """Hand one request to the step engine; ``responder`` gets its one answer later (or now).

        Raises:
            InvalidInput: Naming the bad field (nothing was taken).
            EngineUnavailable: Overloaded, stopping or failed (nothing was taken).
        """
        if self.engine is None:
            raise RuntimeError("submit needs batching 'step'")
        jobs = self.jobs_for(inputs)
        deadline = self.deadline_for(inputs)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("TIMEOUT_MS: the request's deadline passed before the UNet loop took it")
        self.engine.submit(Ticket(
            jobs, on_done=lambda done, coalesced: responder.send(self.outputs_for(inputs, done, coalesced)),
            on_error=responder.fail, deadline=deadline, is_cancelled=responder.is_cancelled))

    def deadline_for(self, inputs) -> Optional[float]:
        """The request's deadline on ``time.monotonic()``'s clock: DEADLINE_NS (wall clock, set by
        the tokenizer from TIMEOUT_MS when the request entered the pipeline), else
        ``default_timeout_ms`` from now; None when neither is set."""
        value = inputs.get("DEADLINE_NS")
        deadline_ns = int(value.reshape(-1).max()) if value is not None and value.size else 0
        if deadline_ns > 0:
            return time.monotonic() + (deadline_ns - time.time_ns()) / 1e9
        if self.config.default_timeout_ms:
            return time.monotonic() + self.config.default_timeout_ms / 1e3
        return None

    def stop(self) -> int:
        """Fail every held request (model unload); returns how many."""
        return self.engine.stop() if self.engine is not None else 0

    def execute(self, batch: Batch) -> Results:
        """Per-execute batching: all requests of ``batch`` in one loop run; they may start at different steps."""
        jobs: List[DenoiseJob] = []
        owners: List[int] = []
        results: Results = [None] * len(batch)  # type: ignore[list-item]
        for r, inputs in enumerate(batch):
            try:
                jobs_r = self.jobs_for(inputs)
            except rq.InvalidInput as exc:
                results[r] = exc
                continue
            jobs += jobs_r
            owners += [r] * len(jobs_r)
        done = self.loop.run(jobs)
        for r, inputs in enumerate(batch):
            if results[r] is None:
                mine = [res for res, owner in zip(done, owners) if owner == r]
                results[r] = self.outputs_for(inputs, mine, [False] * len(mine))
        return results

    def outputs_for(self, inputs, done: List[DenoiseResult], coalesced: Sequence[bool]) -> Dict[str, np.ndarray]:
        """Output tensors of one request from its jobs' results."""
        width = inputs["SAVE_STEPS"].shape[1]
        shape = self.spec.latent_shape
        checkpoints = np.zeros((len(done), width, *shape), dtype=np.float32)
        guides = np.zeros((len(done), width, 2, *shape), dtype=np.float32)  # zeros: none (unguided)
        steps = np.zeros((len(done), width), dtype=np.int32)
        for i, res in enumerate(done):
            for j, (k, state) in enumerate(sorted(res.checkpoints.items())):
                checkpoints[i, j] = state.cpu().numpy()
                if k in res.directions:
                    guides[i, j, 0] = res.directions[k].cpu().numpy()
                    guides[i, j, 1] = res.unconds[k].cpu().numpy()
                steps[i, j] = k
        rows = len(done)
        # An exact hit (nothing run) keeps its START_STEP; a row the guard downgraded reports its fallback.
        started = [res.start_step if res.steps_run else int(s)
                   for res, s in zip(done, inputs["START_STEP"].reshape(-1))]
        return {"FINAL_LATENTS": np.stack([res.latents.cpu().numpy() for res in done]),
                "CHECKPOINTS": checkpoints, "CHECKPOINT_STEPS": steps, "CHECKPOINT_GUIDES": guides,
                "COALESCED": np.array(coalesced, dtype=bool).reshape(rows, 1),
                "START_STEP_USED": np.array(started, dtype=np.int32).reshape(rows, 1),
                "GUARD": bytes_column([format_verdict(res.verdict) for res in done])}

    def jobs_for(self, inputs) -> List[DenoiseJob]:
        """The loop jobs of one request (one per row); raises InvalidInput naming the field."""
        for name in self.REQUIRED:
            if inputs.get(name) is None:
                raise rq.InvalidInput(name, "is required")
        rows = len(inputs["LATENTS"])
        for name in self.REQUIRED:
            if len(inputs[name]) != rows:
                raise rq.InvalidInput(name, f"has {len(inputs[name])} rows, LATENTS has {rows}")
        start = inputs["START_STEP"].reshape(-1)
        steps = inputs["STEPS"].reshape(-1)
        guidance = inputs["GUIDANCE_SCALE"].reshape(-1)
        jobs = []
        device = self.unet.device
        as_tensor = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(device)  # noqa: E731
        checks = self._check_inputs(inputs, rows)
        for i in range(rows):
            if not 0 <= int(start[i]) <= int(steps[i]):
                raise rq.InvalidInput("START_STEP", f"{int(start[i])} is outside 0..STEPS ({int(steps[i])})")
            if not self.resumes_from_cache and 0 < int(start[i]) < int(steps[i]):
                raise rq.InvalidInput("START_STEP", f"unet_loop's scheduler {self.config.scheduler!r} cannot resume "
                                      f"from a cached state at step {int(start[i])}: its solver history does not "
                                      f"travel through the ensemble, so the result would be silently approximate. "
                                      f"Use scheduler ddim or euler for approximate caching")
            save = tuple(int(k) for k in inputs["SAVE_STEPS"][i] if 0 < int(k) < int(steps[i])) \
                if self.resumes_from_cache else ()
            latents, hidden, negative = (inputs[n][i] for n in ("LATENTS", "HIDDEN_STATES", "NEGATIVE_HIDDEN_STATES"))
            check = self._check_for(checks, i, int(start[i]), int(steps[i]), as_tensor) if checks else None
            guard_part = () if check is None else tuple(checks[name][i] for name in CHECK_FIELDS)
            jobs.append(DenoiseJob(
                latents=as_tensor(latents), prompt_embeds=as_tensor(hidden), negative_embeds=as_tensor(negative),
                start_step=int(start[i]), steps=int(steps[i]), guidance_scale=float(guidance[i]),
                save_steps=save, check=check,
                digest=inputs_digest(latents, hidden, negative, int(start[i]), int(steps[i]), float(guidance[i]),
                                     save, *guard_part)))
        return jobs

    def _check_inputs(self, inputs, rows: int) -> Optional[Dict[str, np.ndarray]]:
        """The latent check's inputs, validated, or None when the request sends none."""
        sent = [name for name in CHECK_FIELDS if inputs.get(name) is not None]
        if not sent:
            return None
        missing = [name for name in CHECK_FIELDS if name not in sent]
        if missing:
            raise rq.InvalidInput(missing[0], f"is required with {', '.join(sent)} (the resume guard's check)")
        out = {}
        for name in CHECK_FIELDS:
            value = inputs[name]
            if len(value) != rows:
                raise rq.InvalidInput(name, f"has {len(value)} rows, LATENTS has {rows}")
            if name in CHECK_NUMBERS:
                out[name] = value.reshape(rows, -1)[:, 0]
            elif value.shape[1:] != inputs["LATENTS"].shape[1:]:
                raise rq.InvalidInput(name, f"has shape {list(value.shape[1:])} per row, LATENTS "
                                            f"{list(inputs['LATENTS'].shape[1:])}")
            else:
                out[name] = value
        if np.any(np.isnan(out["GUARD_BOUND"])):
            raise rq.InvalidInput("GUARD_BOUND", "must be a number (< 0: no check)")
        return out

    @staticmethod
    def _check_for(checks: Dict[str, np.ndarray], i: int, start: int, steps: int,
                   as_tensor) -> Optional[ResumeCheck]:
        """Row ``i``'s latent check (None when GUARD_BOUND < 0 or the row does not resume)."""
        if checks["GUARD_BOUND"][i] < 0 or not 0 < start < steps:
            return None
        probe, fallback = int(checks["PROBE_STEP"][i]), int(checks["FALLBACK_STEP"][i])
        if not 0 < probe < start:
            raise rq.InvalidInput("PROBE_STEP", f"{probe} is outside 1..START_STEP-1 ({start - 1})")
        if fallback not in (0, probe):
            raise rq.InvalidInput("FALLBACK_STEP", f"{fallback} is neither 0 nor PROBE_STEP ({probe})")
        uncond = checks["PROBE_UNCOND"][i]
        return ResumeCheck(probe, as_tensor(checks["PROBE_LATENTS"][i]), as_tensor(checks["PROBE_DIRECTION"][i]),
                           as_tensor(uncond) if np.any(uncond) else None, float(checks["GUARD_BOUND"][i]),
                           fallback, as_tensor(checks["FALLBACK_LATENTS"][i]))
