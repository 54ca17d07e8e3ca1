"""The latent_cache model: lookup (before the UNet), admission (after it) and admin.

One handler class per job, sharing the cache, one lock (the cache is not thread-safe and
the background compaction reads it) and one :class:`CacheCounters`:

* :class:`CacheLookup` decides where each request starts (and makes a miss's noise);
* :class:`CacheAdmission` stores a finished request's states (and, with
  ``appendfsync=always``, acknowledges only once they are on disk);
* :class:`CacheAdmin` answers the admin surface's stats, flush and snapshot commands.

:class:`CacheStep` builds them, restores the cache and routes each request: one carrying
COMMAND is an admin command (see :mod:`nirvana.admin`), one carrying CHECKPOINT_STEPS an
admission; otherwise it is a lookup.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from nirvana import admin
from nirvana import inputs as rq
from nirvana.backend import PARAMETERS
from nirvana.cache import CacheKey, LatentCache, LookupResult
from nirvana.cache.engine import APPROXIMATE, DISABLED
from nirvana.cache.persistence import CachePersistence
from nirvana.cache.shared import SharedTier, SharedTierError, key_prefix
from nirvana.cache.sync import SharedTierSync
from nirvana.config import CacheConfig, PipelineSpec
from nirvana.guard import CHECK_FIELDS, CHECK_NUMBERS, DOWNGRADED, parse_verdict, policy_for
from nirvana.pipeline import Batch, Results, bytes_column, per_request


@dataclasses.dataclass
class CacheCounters:
    """What the cache model did since it loaded (mirrored by :class:`nirvana.metrics.CacheMetrics`)."""

    lookups: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by result
    approximate_hits_by_k: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    steps_run: int = 0
    steps_saved: int = 0
    lookup_seconds: float = 0.0
    coalesced: int = 0  # requests answered with an identical in-flight request's result
    guard_checks: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by outcome
    guard_fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by reason


class CacheLookup:
    """Where each request starts: an exact hit, a cached state at step K, or its own noise."""

    def __init__(self, cache: LatentCache, spec: PipelineSpec, counters: CacheCounters, lock: threading.Lock):
        self.cache, self.spec, self.counters, self.lock = cache, spec, counters, lock

    def __call__(self, embeddings: np.ndarray, keys: List[CacheKey], enabled: np.ndarray) -> Dict[str, np.ndarray]:
        width = len(self.cache.config.cache_steps)
        latents, start, sims, status, matched = [], [], [], [], []
        check: Dict[str, list] = {name: [] for name in CHECK_FIELDS}
        zeros = np.zeros(self.spec.latent_shape, np.float32)
        save = np.zeros((len(keys), width), dtype=np.int32)
        for i, key in enumerate(keys):
            began = time.perf_counter()
            if enabled[i]:
                with self.lock:
                    result = self.cache.lookup(embeddings[i], key)
            else:  # CACHE=false: a plain full generation, neither looked up nor admitted
                result = LookupResult(DISABLED, 0, 0.0, None, "", ())
            self._count(key, result, time.perf_counter() - began)
            noise = None
            if result.latents is None or result.guard_bound is not None:
                generator = torch.Generator().manual_seed(key.seed)
                noise = torch.randn(self.spec.latent_shape, generator=generator, dtype=torch.float32)
            latents.append(_array(result.latents if result.latents is not None else noise))
            # The latent check's inputs (unet_loop); GUARD_BOUND < 0: no check, the rest unused.
            checked = result.guard_bound is not None
            check["GUARD_BOUND"].append(result.guard_bound if checked else -1.0)
            check["PROBE_STEP"].append(result.probe_step)
            check["PROBE_LATENTS"].append(_array(result.probe_latents) if checked else zeros)
            check["PROBE_DIRECTION"].append(_array(result.direction) if checked else zeros)
            check["PROBE_UNCOND"].append(_array(result.uncond) if result.uncond is not None else zeros)
            check["FALLBACK_STEP"].append(result.fallback_step)
            check["FALLBACK_LATENTS"].append(_array(noise) if checked else zeros)
            start.append(result.start_step)
            sims.append(result.similarity)
            status.append(result.status)
            matched.append(result.matched_prompt)
            save[i, :len(result.save_steps)] = result.save_steps
        rows = len(keys)
        column = lambda values, dtype: np.array(values, dtype).reshape(rows, 1)  # noqa: E731
        out = {"LATENTS": np.stack(latents), "START_STEP_OUT": column(start, np.int32),
               "SIMILARITY": column(sims, np.float32), "CACHE_STATUS": bytes_column(status),
               "MATCHED_PROMPT": bytes_column(matched), "SAVE_STEPS": save}
        for name, values in check.items():
            out[name] = np.stack(values) if name not in CHECK_NUMBERS else column(values, CHECK_NUMBERS[name])
        return out

    def _count(self, key: CacheKey, result: LookupResult, seconds: float) -> None:
        c = self.counters
        c.lookup_seconds += seconds
        c.lookups[result.status] += 1
        if result.status == APPROXIMATE:
            c.approximate_hits_by_k[result.start_step] += 1
        if result.guard_bound is not None:
            return  # where a checked hit starts is known after the check: counted at admission
        c.steps_saved += result.start_step
        c.steps_run += key.steps - result.start_step


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to("cpu", torch.float32).numpy()


class CacheAdmission:
    """Stores a finished request's checkpoints and final latents; passes the latents on to the VAE."""

    def __init__(self, cache: LatentCache, counters: CacheCounters, lock: threading.Lock,
                 persistence: Optional[CachePersistence]):
        self.cache, self.counters, self.lock, self.persistence = cache, counters, lock, persistence

    def __call__(self, inputs, embeddings: np.ndarray, keys: List[CacheKey], enabled: np.ndarray) -> Dict[str, np.ndarray]:
        steps_in, states = inputs["CHECKPOINT_STEPS"], inputs["CHECKPOINTS"]
        final, start = inputs["FINAL_LATENTS"], inputs["START_STEP"]
        guides = inputs.get("CHECKPOINT_GUIDES")  # [rows, width, 2, C, H, W]: direction, unconditional
        if states is None:
            raise rq.InvalidInput("CHECKPOINTS", "is required with CHECKPOINT_STEPS")
        if final is None:
            raise rq.InvalidInput("FINAL_LATENTS", "is required with CHECKPOINT_STEPS")
        admitted = np.zeros((len(keys), 1), dtype=np.int32)
        coalesced = (np.zeros(len(keys), dtype=bool) if inputs.get("COALESCED") is None
                     else inputs["COALESCED"].reshape(-1).astype(bool))
        starts = np.zeros(len(keys), dtype=np.int64) if start is None else start.reshape(-1).astype(np.int64)
        self._count_guard(inputs, keys, starts, enabled)
        for i, key in enumerate(keys):
            if not enabled[i]:
                continue
            if coalesced[i]:
                # An identical request in flight computed this one's result: it ran no step, and
                # that request admits the states.
                self.counters.coalesced += 1
                self.counters.steps_saved += key.steps - int(starts[i])
                self.counters.steps_run -= key.steps - int(starts[i])
                continue
            if starts[i] >= key.steps:
                continue  # exact hit: nothing new to store
            checkpoints = {int(k): torch.from_numpy(np.array(states[i, j]))
                           for j, k in enumerate(steps_in[i]) if int(k) > 0}
            guide = {} if guides is None else {
                int(k): (torch.from_numpy(np.array(guides[i, j, 0])), torch.from_numpy(np.array(guides[i, j, 1])))
                for j, k in enumerate(steps_in[i]) if int(k) > 0 and np.any(guides[i, j])}
            final_i = torch.from_numpy(np.array(final[i]))
            with self.lock:
                # START_STEP is where the row actually started (after a guard downgrade, its fallback).
                admitted[i, 0] = self.cache.admit(embeddings[i], key, checkpoints, final_i, was_hit=bool(starts[i] > 0),
                                                  guides=guide)
        if admitted.any() and self.persistence is not None:
            self.persistence.sync()  # appendfsync=always: acknowledged only once on disk
        # The final latents pass through to the VAE, so admission runs whenever IMAGE is asked for.
        return {"ADMITTED": admitted, "LATENTS": final}

    def _count_guard(self, inputs, keys: List[CacheKey], starts: np.ndarray, enabled: np.ndarray) -> None:
        """Count the resume guard's verdicts and a checked hit's steps (the lookup left them out):
        saved from where the row actually started, and a downgrade's discarded UNet call as run."""
        verdicts = inputs.get("GUARD")
        if verdicts is None:
            return
        texts = rq.decode_texts(verdicts, "GUARD", len(keys), required=False, max_bytes=256)
        for i, text in enumerate(texts):
            try:
                outcome, reason = parse_verdict(text)
            except ValueError as exc:
                raise rq.InvalidInput("GUARD", str(exc)) from None
            if not enabled[i] or not outcome:
                continue
            c = self.counters
            c.guard_checks[outcome] += 1
            discarded = 0
            if outcome == DOWNGRADED:
                c.guard_fallbacks[reason] += 1
                discarded = 1
            c.steps_saved += int(starts[i])
            c.steps_run += keys[i].steps - int(starts[i]) + discarded


class CacheAdmin:
    """The admin surface's commands: stats, flush, snapshot (see :mod:`nirvana.admin`).

    With the shared tier, stats add every replica's counters and the tier's usage, and a flush
    reaches every replica (through the shared tier's events) or fails UNAVAILABLE so that it is
    retried: a flush that missed Redis would come back from it."""

    def __init__(self, cache: LatentCache, lock: threading.Lock, persistence: Optional[CachePersistence],
                 admin_key: Optional[str], sync: Optional[SharedTierSync] = None):
        self.cache, self.lock, self.persistence, self.admin_key = cache, lock, persistence, admin_key
        self.sync = sync

    def _shared_stats(self) -> Dict[str, object]:
        """The shared tier's usage and every replica's published counters, summed too."""
        tier = self.sync.tier
        out: Dict[str, object] = {"synced": self.sync.synced, "position": self.sync.position,
                                  "last_resync": self.sync.last_resync, **self.sync.lag_percentiles()}
        if not tier.available:
            return out
        try:
            out["usage"] = tier.usage()
            replicas = tier.replica_stats()
        except Exception as exc:  # noqa: BLE001 - a stats call never fails because Redis did
            out["error"] = repr(exc)
            return out
        out["replicas"] = replicas
        totals: collections.Counter = collections.Counter()
        for record in replicas.values():
            for name, value in (record.get("lookups") or {}).items():
                totals[name] += int(value)
            for name in ("steps_run", "steps_saved"):
                totals[name] += int(record.get(name, 0))
        out["totals"] = dict(totals)
        return out

    def __call__(self, inputs) -> Dict[str, np.ndarray]:
        admin.check_key(inputs.get(PARAMETERS) or {}, self.admin_key)
        command = rq.decode_texts(inputs["COMMAND"], "COMMAND", 1, required=True,
                                  max_bytes=64)[0].strip().lower()
        # No TENANT: the whole cache; TENANT "" is the shared namespace.
        tenant = None if inputs.get("TENANT") is None else rq.resolve_tenants(inputs["TENANT"], 1)[0]
        if command == "stats":
            with self.lock:
                result = (self.cache.tenant_stats(tenant) if tenant is not None
                          else {**self.cache.stats(), "tenants": self.cache.all_tenant_stats()})
            if self.persistence is not None and tenant is None:
                result["persistence"] = self.persistence.stats()
            if self.sync is not None and tenant is None:
                result["shared"].update(self._shared_stats())
        elif command == "flush":
            with self.lock:
                flushed = self.cache.flush(tenant, shared=False)
            if self.cache.shared is not None:  # outside the lock: a flush scans Redis's keys
                try:
                    self.cache.shared.flush(tenant)
                except SharedTierError as exc:
                    raise SharedTierError(f"flushed here, but the shared tier (Redis) could not be flushed, so other "
                                          f"replicas still serve the entries: retry the flush ({exc})") from exc
            # Persist the flush at once, keeping no older snapshot, so a restart cannot bring it back.
            snapshot = self.persistence.compact(keep=1) if self.persistence is not None else None
            result = {"tenant": tenant, "flushed_entries": flushed, "snapshot": snapshot and str(snapshot)}
        elif command == "snapshot":
            if self.persistence is None:
                raise rq.InvalidInput("COMMAND", "snapshot needs the latent_cache parameter snapshot_path (with "
                                                 "redis_url, Redis's own persistence is the store)")
            snapshot = self.persistence.compact()
            result = {"snapshot": str(snapshot), "entries": len(self.cache)}
        else:
            raise rq.InvalidInput("COMMAND", f"{command!r} is not one of {', '.join(admin.COMMANDS)}")
        result["command"] = command
        return {"ADMIN_RESULT": np.array([[admin.encode_result(result)]], dtype=object)}


class CacheStep:
    """The latent_cache model (see the module docstring).

    Args:
        admin_key: The key admin requests must carry; None turns the admin surface off.
        log: Where persistence problems found in the background go (Triton's logger).
    """

    INPUTS = ("POOLED_EMBEDDING", "PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE_SCALE", "TENANT",
              "CACHE", "START_STEP", "CHECKPOINTS", "CHECKPOINT_STEPS", "FINAL_LATENTS", "COMMAND", "COALESCED",
              "CHECKPOINT_GUIDES", "GUARD")
    WANTS_PARAMETERS = True  # admin requests carry the key as a (forwarded header) request parameter

    def __init__(self, directory: Path, config: CacheConfig, device: Optional[torch.device] = None,
                 admin_key: Optional[str] = None, log: Optional[Callable[[str], None]] = None):
        self.spec = PipelineSpec.load(directory)
        self.config = config = config.with_model_thresholds(self.spec)
        shared = None
        if config.redis_url:
            shared = SharedTier(config.redis_url, key_prefix(config.shared_prefix, self.spec.model_id), config.shared_bytes,
                                policy=config.eviction, timeout_s=config.shared_timeout_ms / 1000.0,
                                replica_id=config.replica_id)
        self.guard = policy_for(self.spec, config)
        self.cache = LatentCache(config, self.spec.embedding_dim, device, shared=shared, guard=self.guard)
        self.lock = threading.Lock()
        self.counters = CacheCounters()
        self.persistence: Optional[CachePersistence] = None
        self.restore_report: Dict[str, object] = {}
        if config.snapshot_path:
            persistence = CachePersistence(self.cache, Path(config.snapshot_path), self.lock,
                                           config.appendfsync, config.snapshot_interval_s, log)
            if persistence.acquire():
                self.persistence = persistence
                self.restore_report = persistence.restore()  # never raises: the model always loads
                persistence.start()
            else:
                self.restore_report = {"snapshot": None, "entries": 0, "states": 0, "problems": [
                    f"{config.snapshot_path} is locked by another live process (another server or model instance "
                    f"on the same snapshot_path); serving WITHOUT persistence"]}
        self.sync: Optional[SharedTierSync] = None
        if config.redis_url:
            self.sync = SharedTierSync(self.cache, self.cache.shared, self.lock, stats=self.replica_stats, log=log)
            # A restarted replica serves its earlier entries from its first request; with Redis
            # unreachable it serves from nothing and catches up once Redis answers.
            self.sync.start()
            self.restore_report = {"shared": self.sync.last_resync or f"redis unreachable: {self.cache.shared.last_error}"}
        self.lookup = CacheLookup(self.cache, self.spec, self.counters, self.lock)
        self.admission = CacheAdmission(self.cache, self.counters, self.lock, self.persistence)
        self.admin = CacheAdmin(self.cache, self.lock, self.persistence, admin_key, self.sync)

    def execute(self, batch: Batch) -> Results:
        return per_request(batch, self._one)

    def close(self) -> None:
        """Model unload: final snapshot, journal closed, background index builds stopped."""
        try:
            if self.sync is not None:
                self.sync.close()
            if self.persistence is not None:
                self.persistence.close()
        finally:
            self.cache.close()
            if self.cache.shared is not None:
                self.cache.shared.close()

    def replica_stats(self) -> Dict[str, object]:
        """This replica's request counters, as the shared tier publishes them for the admin stats."""
        c = self.counters
        return {"lookups": dict(c.lookups), "steps_run": c.steps_run, "steps_saved": c.steps_saved,
                "coalesced": c.coalesced, "entries": len(self.cache)}

    def _keys(self, inputs, rows: int) -> List[CacheKey]:
        prompts = rq.decode_texts(inputs["PROMPT"], "PROMPT", rows, required=True, max_bytes=1 << 30)
        negatives = rq.decode_texts(inputs["NEGATIVE_PROMPT"], "NEGATIVE_PROMPT", rows, required=False,
                                    max_bytes=1 << 30)
        for name in ("SEED", "STEPS", "GUIDANCE_SCALE"):
            if inputs[name] is None:
                raise rq.InvalidInput(name, "is required")
        seeds, steps, guidance = (inputs[n].reshape(-1) for n in ("SEED", "STEPS", "GUIDANCE_SCALE"))
        tenants = rq.resolve_tenants(inputs.get("TENANT"), rows)
        return [CacheKey(prompts[i], negatives[i], int(seeds[i]), int(steps[i]), float(guidance[i]),
                         tenant=tenants[i], model_id=self.spec.model_id) for i in range(rows)]

    def _one(self, inputs) -> Dict[str, np.ndarray]:
        if inputs.get("COMMAND") is not None:
            return self.admin(inputs)
        embeddings = inputs["POOLED_EMBEDDING"]
        if embeddings is None:
            raise rq.InvalidInput("POOLED_EMBEDDING", "is required")
        rows = len(embeddings)
        keys = self._keys(inputs, rows)
        enabled = np.ones(rows, dtype=bool) if inputs.get("CACHE") is None else inputs["CACHE"].reshape(-1).astype(bool)
        if len(enabled) != rows:
            raise rq.InvalidInput("CACHE", f"expected {rows} values, got {len(enabled)}")
        if inputs["CHECKPOINT_STEPS"] is not None:
            return self.admission(inputs, embeddings, keys, enabled)
        return self.lookup(embeddings, keys, enabled)
