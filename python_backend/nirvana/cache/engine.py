"""The latent cache engine: lookup and admission of noise states.

A cached *entry* is one generated prompt: its embedding (in the index), the
noise states after each cache step K (in the store), and optionally its final
latents for the exact-hit fast path. States are evicted one by one; an entry
leaves the index once it has no state left.

With a shared tier (:mod:`nirvana.cache.shared`, Redis), the local store is a read-through
cache of it: an entry also knows the steps the shared tier holds (admitted by any replica,
learned from its events stream), a lookup may choose one of them and fetch it, and every
admission and flush goes to the shared tier too. The shared tier failing never fails a lookup
or an admission: the cache then serves what it holds locally.

With the resume guard (:mod:`nirvana.guard`), a state the guard may probe is stored together
with its guidance direction and unconditional prediction (one tensor [3, C, H, W]), and an
approximate hit above the unchecked K carries the entry's probe state, its direction, the bound
its K allows and where a downgrade goes on from, for the step loop's latent check.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import gc
import hashlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from nirvana.cache.index import EmbeddingIndex
from nirvana.cache.policy import StateStats, eviction_score
from nirvana.cache.shared import SharedEntry, SharedTier, SharedTierError
from nirvana.cache.store import DTYPES, DiskTier, LatentStore, MemoryTier
from nirvana.config import CacheConfig
from nirvana.guard import FALLBACK_PROBE, GuardPolicy
from nirvana.steps import scale_step, scale_steps, start_step_for

MISS, APPROXIMATE, EXACT = "miss", "approximate", "exact"
DISABLED = "disabled"  # the request bypassed the cache (CACHE=false)
FINAL = -1  # step key of an entry's final latents


@dataclass(frozen=True, slots=True)  # slots: a cache holds up to millions of these
class CacheKey:
    """What identifies a request's output exactly (the exact-hit key) and its namespace."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    tenant: str = ""
    model_id: str = ""

    @property
    def namespace(self) -> Tuple[str, int]:
        # States are only comparable between runs with the same step schedule.
        return (self.tenant, self.steps)

    def digest(self) -> str:
        text = "\x1f".join([self.model_id, self.tenant, self.prompt, self.negative_prompt,
                            str(self.seed), str(self.steps), repr(float(self.guidance_scale))])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class LookupResult:
    """What a lookup decided for one request.

    Attributes:
        guard_bound: Largest probe divergence the latent check allows at ``start_step``; None: the
            hit is served unchecked (and the probe fields are unset).
        probe_step: The matched entry's early step the check probes.
        probe_latents: The entry's state at ``probe_step``.
        direction: The matched prompt's guidance direction at the probe state.
        uncond: The unconditional prediction at the probe state, when the request's negative
            prompt is the entry's (so it stands in for the probe's own); None: computed.
        fallback_step: Where a downgraded hit goes on from: ``probe_step`` or 0 (the request's own
            noise, which the caller makes as for a miss).
    """

    status: str
    start_step: int
    similarity: float
    latents: Optional[torch.Tensor] = None
    matched_prompt: str = ""
    save_steps: Tuple[int, ...] = ()
    guard_bound: Optional[float] = None
    probe_step: int = 0
    probe_latents: Optional[torch.Tensor] = None
    direction: Optional[torch.Tensor] = None
    uncond: Optional[torch.Tensor] = None
    fallback_step: int = 0


def pack_state(latents: torch.Tensor, direction: Optional[torch.Tensor] = None,
               uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One stored tensor for a state: [3, C, H, W] (latents, guidance direction, unconditional
    prediction) where the guard may probe it, else the latents alone [C, H, W]."""
    if direction is None or uncond is None:
        return latents
    return torch.stack([latents, direction.to(latents.dtype), uncond.to(latents.dtype)])


def unpack_state(state: torch.Tensor,
                 latent_rank: int = 3) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(latents, direction or None, unconditional prediction or None) of a stored state."""
    if state.dim() == latent_rank + 1 and state.shape[0] == 3:
        return state[0], state[1], state[2]
    return state, None, None


@dataclass
class StateRecord:
    """One cached state as persistence sees it: its step, usage statistics and tensor."""

    step: int
    stats: StateStats
    tensor: torch.Tensor


@dataclass
class EntryRecord:
    """One cached entry with its states: what :meth:`LatentCache.export_entries` yields and
    :meth:`LatentCache.import_entries` takes (snapshots, the journal, replicas)."""

    entry_id: int
    key: CacheKey
    embedding: np.ndarray
    states: List[StateRecord]


@dataclass
class ImportReport:
    """What :meth:`LatentCache.import_entries` did. ``entries``/``states`` count what is in the
    cache afterwards, not what was offered."""

    entries: int = 0
    states: int = 0
    offered_states: int = 0
    dropped_by_budget: int = 0  # did not fit the configured tiers (lowest scores first)
    dropped_other_steps: int = 0  # steps the configuration does not cache (or exact_hit off)
    duplicates: int = 0  # an entry with the same exact-hit key was already cached
    problems: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        return dict(self.__dict__)


# What the cache tells its listener (the journal) after each change:
#   ("put", EntryRecord with the one stored state), ("forget", entry_id, step), ("flush", tenant or None).
ChangeListener = Callable[[tuple], None]


def policy_weight(key: CacheKey, step: int) -> int:
    """The steps a state saves, which the eviction policy weighs: K, or every step of the run for
    the final latents."""
    return key.steps if step == FINAL else step


@dataclass(slots=True)
class _Entry:
    entry_id: int
    key: CacheKey
    embedding: np.ndarray
    steps: set = field(default_factory=set)  # cached steps in the local store, FINAL included
    synthetic: bool = False  # benchmark filler (fill_synthetic): searched, never served
    shared_steps: set = field(default_factory=set)  # steps the shared tier holds (as last heard)
    unpublished: set = field(default_factory=set)  # admitted here while the shared tier was down


class LatentCache:
    """Approximate cache of noise states keyed by prompt embedding.

    Args:
        config: The latent_cache model parameters.
        embedding_dim: Width of the prompt embeddings.
        device: Where the device tier lives (CUDA when present); ignored without a device budget.
        shared: The shared tier every replica sees (None: this cache is the only one).
        guard: The resume guard's calibrated bounds (None: approximate hits are served unchecked,
            as in the paper).
    """

    def __init__(self, config: CacheConfig, embedding_dim: int, device: Optional[torch.device] = None,
                 shared: Optional[SharedTier] = None, guard: Optional[GuardPolicy] = None):
        self.config = config
        self.shared = shared
        self.guard = guard
        self.index = EmbeddingIndex(embedding_dim, kind=config.index, use_gpu=config.use_gpu,
                                    threads=config.index_threads)
        tiers = []
        if config.device_bytes and device is not None and torch.device(device).type == "cuda":
            tiers.append(MemoryTier(config.device_bytes, device))
        tiers.append(MemoryTier(config.host_bytes, torch.device("cpu")))
        if config.disk_bytes:
            if not config.disk_path:
                raise ValueError("disk_bytes is set but disk_path is empty")
            tiers.append(DiskTier(config.disk_bytes, Path(config.disk_path)))
        self.store = LatentStore(tiers, DTYPES[config.store_dtype])
        self._score = eviction_score(config.eviction)
        self._entries: Dict[int, _Entry] = {}
        self._by_digest: Dict[str, int] = {}
        self._stats: Dict[Tuple[int, int], StateStats] = {}
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self.counters: Dict[str, int] = {"lookups": 0, "exact_hits": 0, "approximate_hits": 0, "misses": 0,
                                         "admitted_states": 0, "evicted_states": 0, "flushed_states": 0}
        # The same lookup counters per tenant, for the admin surface's per-tenant stats.
        self.tenant_counters: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.synthetic_entries = 0
        self.fill_report: Dict[str, object] = {}
        self.listener: Optional[ChangeListener] = None  # persistence hooks in here (see nirvana.cache.persistence)
        if config.synthetic_entries:  # benchmark only (perf/cache_cost.py)
            self.fill_synthetic(config.synthetic_entries, steps=config.synthetic_steps or None)

    def __len__(self) -> int:
        return len(self._entries)

    def save_steps(self, steps: int) -> Tuple[int, ...]:
        """The steps whose states a run of ``steps`` steps should return for admission."""
        return scale_steps(self.config.cache_steps, self.config.base_steps, steps)

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, embedding: np.ndarray, key: CacheKey,
               k_cap: Optional[Callable[[CacheKey], int]] = None) -> LookupResult:
        """Find where a request can start.

        The ``lookup_k`` nearest entries of the request's namespace are candidates. A candidate's
        *usable K* is the largest step it actually holds that its similarity allows by the
        thresholds: an entry admitted from a hit at K holds only steps after K (and evicted states
        leave holes), so the nearest entry may hold nothing usable or only a smaller step while a
        farther one holds the K its own similarity allows. The candidate with the largest usable
        K wins; among equal K, the more similar one. ``lookup_k=1`` considers the nearest entry
        only.

        Args:
            k_cap: The largest K (at ``base_steps``) a candidate may give, from its key (e.g. the
                resume guard's token check: how much the new prompt adds to the candidate's);
                None: the thresholds alone decide.

        Returns:
            An exact hit (final latents, start_step == steps), an approximate hit (a cached
            state and its step; ``similarity`` is the chosen entry's, which need not be the
            nearest) or a miss (start_step 0, latents None: the caller makes noise; ``similarity``
            is the nearest entry's).
        """
        self._count(key, "lookups")
        save = self.save_steps(key.steps)
        if self.config.exact_hit:
            entry_id = self._by_digest.get(key.digest())
            if entry_id is not None:
                state = self._use(entry_id, FINAL)
                if state is not None:
                    self._count(key, "exact_hits")
                    return LookupResult(EXACT, key.steps, 1.0, state, key.prompt, ())
        best = 0.0
        # (usable step, similarity, entry) for every step a candidate holds within what its
        # similarity allows; tried best first, so a state the store lost falls back to the next.
        options: List[Tuple[int, float, _Entry]] = []
        for entry_id, similarity in self.index.search(key.namespace, embedding, k=self.config.lookup_k):
            entry = self._entries[entry_id]
            if entry.synthetic:
                continue  # benchmark filler: costs a search like a real entry, never matches
            best = max(best, similarity)
            wanted = start_step_for(similarity, self.config.thresholds, self.config.base_steps, key.steps)
            if wanted == 0:
                break  # results are sorted: later ones are less similar
            if k_cap is not None:
                wanted = min(wanted, scale_step(k_cap(entry.key), self.config.base_steps, key.steps))
            options.extend((step, similarity, entry) for step in self._held_steps(entry) if 0 < step <= wanted)
        options.sort(key=lambda option: (option[0], option[1]), reverse=True)
        for step, similarity, entry in options:
            state = self._use(entry.entry_id, step, key.steps)
            if state is not None:
                self._count(key, "approximate_hits")
                return self._approximate_hit(key, entry, step, similarity, state, save)
        self._count(key, "misses")
        # A miss still reports the nearest similarity seen, so clients can see how close it came.
        return LookupResult(MISS, 0, best, None, "", save)

    def _approximate_hit(self, key: CacheKey, entry: _Entry, step: int, similarity: float,
                         state: torch.Tensor, save: Tuple[int, ...]) -> LookupResult:
        """The hit on ``entry`` at ``step``, with what the latent check needs when a guard is on."""
        result = LookupResult(APPROXIMATE, step, similarity, unpack_state(state)[0], entry.key.prompt,
                              tuple(s for s in save if s > step))
        probe = self._probe_for(entry, step, key.steps)
        if probe is None:
            return result  # within unchecked_max_k (see _servable): served unchecked
        probe_step, (probe_latents, direction, uncond) = probe
        result.guard_bound = self.guard.bound_for(step, self.config.base_steps, key.steps)
        result.probe_step, result.probe_latents, result.direction = probe_step, probe_latents, direction
        # The cached unconditional prediction stands in for the probe's own only when it is the same.
        result.uncond = uncond if key.negative_prompt == entry.key.negative_prompt else None
        result.fallback_step = probe_step if self.guard.fallback == FALLBACK_PROBE else 0
        # A downgraded hit keeps every state after where it went on from.
        result.save_steps = tuple(s for s in save if s > result.fallback_step)
        return result

    def _probe_for(self, entry: _Entry, step: int, steps: int):
        """(probe step, unpacked probe state) the guard checks a hit at ``step`` with; None when
        the hit is served unchecked."""
        if self.guard is None or step <= self.guard.unchecked_limit(self.config.base_steps, steps):
            return None
        probe_step = self.guard.probe_step(self.config.base_steps, steps)
        if not 0 < probe_step < step:
            return None
        if probe_step in entry.steps:
            stored = self.store.get((entry.entry_id, probe_step))  # a peek: the probe is not a use
        elif probe_step in self._held_steps(entry):
            stored = self._fetch_shared(entry, probe_step)  # another replica admitted it: read through
        else:
            return None
        if stored is None or unpack_state(stored)[1] is None:
            return None
        return probe_step, unpack_state(stored)

    def _count(self, key: CacheKey, name: str) -> None:
        self.counters[name] += 1
        self.tenant_counters[key.tenant][name] += 1

    def _held_steps(self, entry: _Entry) -> set:
        """The steps a lookup may choose: local ones, and shared ones while the shared tier is up."""
        if entry.shared_steps and self.shared is not None and self.shared.available:
            return entry.steps | entry.shared_steps
        return entry.steps

    def _servable(self, entry: _Entry, step: int, steps: int) -> bool:
        """With the guard on, an approximate hit above the unchecked K needs the entry's probe
        state (with its direction) and a bound for its K."""
        if self.guard is None or step == FINAL:
            return True
        if step <= self.guard.unchecked_limit(self.config.base_steps, steps):
            return True
        return (self.guard.bound_for(step, self.config.base_steps, steps) is not None and
                self._probe_for(entry, step, steps) is not None)

    def _use(self, entry_id: int, step: int, steps: int = 0) -> Optional[torch.Tensor]:
        entry = self._entries.get(entry_id)
        if entry is None:
            return None
        state = self.store.get((entry_id, step))
        if state is None and step in entry.steps:
            self._forget_state(entry_id, step)  # the local tier lost it (a damaged disk file)
        if state is None:
            state = self._fetch_shared(entry, step)
            return state if state is None or self._servable(entry, step, steps or entry.key.steps) else None
        if not self._servable(entry, step, steps or entry.key.steps):
            return None  # not a use: the lookup goes on to the next option
        stats = self._stats[(entry_id, step)]
        stats.uses += 1
        stats.last_used = next(self._clock)
        stats.floor = self.store.inflation
        self.store.set_score((entry_id, step), self._score(stats))
        if step in entry.shared_steps and self.shared is not None:
            self.shared.record_use(entry.key.tenant, entry.key.digest(), step)
        return state

    def _entry_for(self, key: CacheKey, embedding: np.ndarray) -> _Entry:
        """``key``'s entry, indexed now if it is new."""
        entry_id = self._by_digest.get(key.digest())
        if entry_id is None:
            entry_id = next(self._ids)
            self._entries[entry_id] = _Entry(entry_id, key, np.asarray(embedding, dtype=np.float32))
            self._by_digest[key.digest()] = entry_id
            self.index.add(key.namespace, entry_id, self._entries[entry_id].embedding)
        return self._entries[entry_id]

    def _fresh_stats(self, key: CacheKey, step: int, uses: int = 0) -> StateStats:
        now = next(self._clock)
        return StateStats(policy_weight(key, step), inserted=now, last_used=now, uses=uses, floor=self.store.inflation)

    def _put_state(self, entry: _Entry, step: int, tensor: torch.Tensor, stats: StateStats) -> bool:
        """Put one state in the local store with ``stats``; False if the store had to drop it."""
        key = (entry.entry_id, step)
        self._stats[key] = stats
        entry.steps.add(step)
        # Final latents stay fp32 so an exact hit returns the very same image.
        dropped = self.store.put(key, tensor, self._score(stats), torch.float32 if step == FINAL else None)
        if self.listener is not None and key not in dropped:
            self.listener(("put", EntryRecord(entry.entry_id, entry.key, entry.embedding,
                                              [StateRecord(step, copy.copy(stats), self.store.get(key))])))
        for victim in dropped:
            self.counters["evicted_states"] += 1
            self._forget_state(*victim)
        return key not in dropped

    def _fetch_shared(self, entry: _Entry, step: int) -> Optional[torch.Tensor]:
        """A state from the shared tier, kept in the local store (read-through); None when the
        tier is down or no longer holds it."""
        if step not in entry.shared_steps or self.shared is None or not self.shared.available:
            return None
        try:
            state = self.shared.fetch(entry.key.tenant, entry.key.digest(), step)
        except SharedTierError:
            return None  # served without it; the sync thread reconnects
        if state is None:  # evicted or flushed, and the event not applied yet
            self._forget_shared(entry, step)
            return None
        self._put_state(entry, step, state, self._fresh_stats(entry.key, step, uses=1))  # read-through
        return state

    # -- admission ------------------------------------------------------------------------------

    def admit(self, embedding: np.ndarray, key: CacheKey, checkpoints: Mapping[int, torch.Tensor],
              final_latents: Optional[torch.Tensor] = None, was_hit: bool = False,
              guides: Optional[Mapping[int, Tuple[torch.Tensor, torch.Tensor]]] = None) -> int:
        """Store a finished request's states.

        Args:
            embedding: The request's prompt embedding.
            key: The request's identity.
            checkpoints: Step -> latents after that step, as computed by this request.
            final_latents: The request's final latents (for the exact-hit fast path).
            was_hit: The request started from a cached state; with ``admit_on_hit`` off,
                it admits only its final latents.
            guides: Step -> the request's (guidance direction, unconditional prediction) at that
                checkpoint: stored with the state the guard probes (its probe step).

        Returns:
            How many states were stored.
        """
        states: Dict[int, torch.Tensor] = {}
        if not was_hit or self.config.admit_on_hit:
            probe = None if self.guard is None else self.guard.probe_step(self.config.base_steps, key.steps)
            for step, latents in ((int(k), v) for k, v in checkpoints.items() if int(k) > 0):
                guide = (guides or {}).get(step) if step == probe else None
                states[step] = pack_state(latents, *guide) if guide is not None else latents
        if self.config.exact_hit and final_latents is not None:
            states[FINAL] = final_latents
        if not states:
            return 0
        entry = self._entry_for(key, embedding)
        stored = 0
        for step, tensor in states.items():
            stats = self._stats.get((entry.entry_id, step)) or self._fresh_stats(key, step)
            stored += self._put_state(entry, step, tensor, stats)
        self.counters["admitted_states"] += stored
        if self.shared is not None:
            self._publish(entry, states)
        return stored

    def _publish(self, entry: _Entry, states: Mapping[int, torch.Tensor]) -> bool:
        """Admit states to the shared tier too, in the dtypes the local store keeps them in (fp16
        states, fp32 final latents). False when the tier is down: the states stay local, marked
        for the next resync to publish."""
        key, evicted = entry.key, None
        if self.shared.available:
            payload = {step: (tensor.to(torch.float32 if step == FINAL else self.store.dtype), policy_weight(key, step))
                       for step, tensor in states.items()}
            try:
                evicted = self.shared.admit(key.tenant, key.digest(), dataclasses.asdict(key), entry.embedding, payload)
            except SharedTierError:
                pass
        if evicted is None:
            entry.unpublished |= set(states)
            return False
        entry.unpublished -= set(states)
        self.apply_shared_put(key, entry.embedding, tuple(states))
        for tenant, digest, step in evicted:
            self.apply_shared_forget(digest, (step,))
        return True

    # -- the shared tier's events (applied by nirvana.cache.sync under the cache's lock) --------

    def _wanted_steps(self, key: CacheKey) -> set:
        return set(self.save_steps(key.steps)) | ({FINAL} if self.config.exact_hit else set())

    def apply_shared_put(self, key: CacheKey, embedding: np.ndarray, steps: Iterable[int],
                         replace: bool = False) -> None:
        """The shared tier holds ``steps`` of ``key``'s entry (admitted by any replica): index it.
        ``replace``: these are all the steps it holds (a resync), not additions."""
        held = {int(s) for s in steps} & self._wanted_steps(key)  # another configuration's steps are ignored
        if not held and key.digest() not in self._by_digest:
            return
        entry = self._entry_for(key, embedding)
        if replace:
            entry.shared_steps = held
            self._drop_if_empty(entry)
        else:
            entry.shared_steps |= held

    def apply_shared_forget(self, digest: str, steps: Iterable[int]) -> None:
        """The shared tier evicted ``steps`` of an entry; a local copy stays until evicted locally."""
        entry_id = self._by_digest.get(digest)
        if entry_id is not None:
            for step in steps:
                self._forget_shared(self._entries[entry_id], int(step))

    def _forget_shared(self, entry: _Entry, step: int) -> None:
        entry.shared_steps.discard(step)
        self._drop_if_empty(entry)

    def _drop_if_empty(self, entry: _Entry) -> None:
        """Unindex an entry that no tier holds a state of any more."""
        if entry.steps or entry.shared_steps or self._entries.get(entry.entry_id) is not entry:
            return
        self.index.remove(entry.entry_id)
        del self._entries[entry.entry_id]
        if entry.synthetic:
            self.synthetic_entries -= 1
        elif self._by_digest.get(entry.key.digest()) == entry.entry_id:
            del self._by_digest[entry.key.digest()]

    def replace_shared_view(self, entries: Iterable[SharedEntry]) -> Dict[str, int]:
        """Make the entries' shared steps what the shared tier holds now (catch-up after start or
        an outage: events may have been missed), then admit to it the states admitted here while
        it was unreachable.

        Returns:
            shared entries seen, entries republished.
        """
        seen = set()
        for shared in entries:
            try:
                key = CacheKey(**shared.key)
            except TypeError:
                continue  # written by another version of this package: not comparable
            self.apply_shared_put(key, shared.embedding, shared.steps, replace=True)
            seen.add(key.digest())
        for entry in list(self._entries.values()):
            if entry.key.digest() not in seen and entry.shared_steps:
                entry.shared_steps = set()
                self._drop_if_empty(entry)
        return {"shared_entries": len(seen), "republished_entries": self.publish_unpublished()}

    def publish_unpublished(self) -> int:
        """Admit to the shared tier what was admitted here while it was unreachable (not local
        copies of states it evicted meanwhile: its policy decided against them).

        Returns:
            Entries published.
        """
        published = 0
        for entry in [e for e in self._entries.values() if e.unpublished]:
            local_only = {step: self.store.get((entry.entry_id, step))
                          for step in entry.unpublished & (entry.steps - entry.shared_steps)}
            local_only = {step: tensor for step, tensor in local_only.items() if tensor is not None}
            entry.unpublished = set(local_only)
            if local_only and self.shared is not None:
                published += self._publish(entry, local_only)
        return published

    def _forget_state(self, entry_id: int, step: int) -> None:
        known = self._stats.pop((entry_id, step), None) is not None
        self.store.remove((entry_id, step))
        if known and self.listener is not None:
            self.listener(("forget", entry_id, step))
        entry = self._entries.get(entry_id)
        if entry is None:
            return
        entry.steps.discard(step)
        self._drop_if_empty(entry)

    def flush(self, tenant: Optional[str] = None, shared: bool = True) -> int:
        """Drop every entry of ``tenant`` (all tenants when None), from the index and every tier.

        Args:
            shared: Flush the shared tier too, which tells every replica (False: applying a
                flush another replica made).

        Returns:
            How many entries were dropped here.

        Raises:
            SharedTierError: After the local flush, when the shared tier could not be flushed
                (the caller must retry: a replica would otherwise bring the entries back).
        """
        doomed = [e for e in self._entries.values() if tenant is None or e.key.tenant == tenant]
        listener, self.listener = self.listener, None  # one "flush" record instead of one per state
        try:
            self._flush_entries(doomed)
        finally:
            self.listener = listener
        if listener is not None:
            listener(("flush", tenant))
        if tenant is None:
            self.tenant_counters.clear()
        else:
            self.tenant_counters.pop(tenant, None)
        if shared and self.shared is not None:
            self.shared.flush(tenant)
        return len(doomed)

    def _flush_entries(self, doomed: List[_Entry]) -> None:
        for entry in doomed:
            entry.shared_steps = set()
            for step in list(entry.steps):
                self._forget_state(entry.entry_id, step)
                self.counters["flushed_states"] += 1
            self._drop_if_empty(entry)  # an entry only the shared tier held

    # -- persistence (public: snapshots, the journal and replicas use only this) ---------------

    @property
    def clock(self) -> int:
        """The logical clock of the usage statistics (last value handed out)."""
        return max([s.last_used for s in self._stats.values()] + [s.inserted for s in self._stats.values()] + [0])

    def export_entries(self) -> List[EntryRecord]:
        """Every real entry with its stored states (synthetic benchmark entries left out).

        Tensors are the stored ones, not copies: a memory tier never changes a stored tensor in
        place (a put stores a new one), so a caller may serialize them after releasing its lock.
        Statistics are copies."""
        out = []
        for entry in self._entries.values():
            if entry.synthetic:
                continue
            states = []
            for step in sorted(entry.steps):
                tensor = self.store.get((entry.entry_id, step))
                stats = self._stats.get((entry.entry_id, step))
                if tensor is not None and stats is not None:
                    states.append(StateRecord(step, copy.copy(stats), tensor))
            if states:
                out.append(EntryRecord(entry.entry_id, entry.key, entry.embedding, states))
        return out

    def import_entries(self, records: Iterable[EntryRecord], clock: int = 0, merge: bool = False) -> ImportReport:
        """Add entries written by another cache, possibly configured differently; never raises.

        What fits is kept in this cache's eviction order: states are offered best first by this
        cache's policy, so when budgets are smaller the lowest-scoring ones are the ones dropped.
        States at steps this configuration does not cache are skipped (final latents too, when
        exact hits are off); an entry whose exact-hit key is already cached is skipped as a whole,
        or with ``merge`` (journal replay) gets the offered states added. Entry ids are kept when
        free (so a journal written against them replays), else renumbered.

        Returns:
            An :class:`ImportReport`; its ``entries`` and ``states`` count what the cache holds
            afterwards of what was imported.
        """
        report = ImportReport()
        candidates: List[Tuple[Tuple, EntryRecord, StateRecord]] = []
        ids: Dict[int, int] = {}
        for record in records:
            try:
                report.offered_states += len(record.states)
                existing = self._by_digest.get(record.key.digest())
                if existing is not None and not merge:
                    report.duplicates += 1
                    continue
                if existing is not None:
                    ids[record.entry_id] = existing
                wanted = set(self.save_steps(record.key.steps)) | ({FINAL} if self.config.exact_hit else set())
                for state in record.states:
                    if state.step not in wanted:
                        report.dropped_other_steps += 1
                        continue
                    candidates.append((self._score(state.stats), record, state))
            except (AttributeError, TypeError, ValueError) as exc:
                report.problems.append(f"entry {getattr(record, 'entry_id', '?')}: {exc}; skipped")
        candidates.sort(key=lambda c: c[0], reverse=True)
        imported: set = set(ids.values())
        for score, record, state in candidates:
            try:
                entry_id = ids.get(record.entry_id)
                if entry_id is None or entry_id not in self._entries:  # new, or all its states evicted meanwhile
                    if entry_id is None:
                        entry_id = record.entry_id if record.entry_id not in self._entries else next(self._ids)
                        ids[record.entry_id] = entry_id
                    digest = record.key.digest()
                    self._entries[entry_id] = _Entry(entry_id, record.key, np.asarray(record.embedding, np.float32))
                    self._by_digest[digest] = entry_id
                    self.index.add(record.key.namespace, entry_id, self._entries[entry_id].embedding)
                    imported.add(entry_id)
                self._stats[(entry_id, state.step)] = copy.copy(state.stats)
                self._entries[entry_id].steps.add(state.step)
                dtype = torch.float32 if state.step == FINAL else None
                for victim in self.store.put((entry_id, state.step), state.tensor, score, dtype):
                    report.dropped_by_budget += 1
                    self._forget_state(*victim)
            except (KeyError, RuntimeError, TypeError, ValueError) as exc:
                report.problems.append(f"entry {record.entry_id} step {state.step}: {exc!r}; skipped")
                if ids.get(record.entry_id) in self._entries and state.step in self._entries[ids[record.entry_id]].steps:
                    self._forget_state(ids[record.entry_id], state.step)
        self._ids = itertools.count(max(self._entries, default=0) + 1)
        self._clock = itertools.count(max(self.clock, int(clock)) + 1)
        report.entries = sum(1 for e in imported if e in self._entries)
        report.states = sum(len(self._entries[e].steps) for e in imported if e in self._entries)
        return report

    def forget(self, entry_id: int, step: int) -> None:
        """Drop one state (the journal replays evictions with this); unknown ones are ignored."""
        self._forget_state(entry_id, step)

    # -- introspection --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop background index builds (model unload); the cache is unusable afterwards."""
        self.index.close()

    def stats(self) -> Dict[str, object]:
        """Entries, states, tiers and counters; ``index``: how it searches (kind, threads, each IVF
        shard's measured recall@1 and nprobe, see :meth:`EmbeddingIndex.stats`)."""
        stats = {"entries": len(self._entries), "states": len(self.store), "tiers": self.store.usage(),
                 **self.counters, "index": self.index.stats()}
        if self.shared is not None:
            stats["shared"] = {**self.shared.stats(),
                               "indexed_states": sum(len(e.shared_steps) for e in self._entries.values())}
        if self.synthetic_entries or self.fill_report:
            stats["synthetic_entries"] = self.synthetic_entries
            stats["synthetic_fill"] = self.fill_report
        return stats

    # -- benchmarking ---------------------------------------------------------------------------

    def fill_synthetic(self, n: int, steps: Optional[int] = None, tenant: str = "", seed: int = 0,
                       clusters: Optional[int] = None, chunk: int = 100_000) -> Dict[str, object]:
        """Benchmark only: add ``n`` synthetic entries to the namespace (``tenant``, ``steps``).

        Measures the cache's cost at a size without generating ``n`` images: the embeddings are
        random unit vectors around ``clusters`` random centers (prompt embeddings cluster by
        topic; the layout of ``nirvana-index-bench``), each entry holds one 2-byte state at the
        first cache step, and the index gets them in one bulk add (at most one IVF training).

        Synthetic entries are searched like real ones (the namespace real requests of ``steps``
        steps use, so their lookups pay for them) but never served: a lookup skips them (and they
        have no exact-hit key), so a real request cannot resume from a 2-byte state. They are
        evicted like any state with no use (first, under LCBFU) and dropped by ``flush``. Do not
        combine with snapshots: a snapshot would persist them.

        Args:
            steps: The STEPS of the requests that should search them (default ``base_steps``).
            clusters: Topic centers (default n/1000, at least 100).

        Returns:
            entries added, seconds taken (total; index part and its IVF training if any).
        """
        began = time.perf_counter()
        n = int(n)
        if n <= 0:
            return {"requested": n, "entries": 0, "seconds": 0.0}
        steps = int(steps or self.config.base_steps)
        step = self.save_steps(steps)[0]
        dim = self.index.dim
        rng = np.random.default_rng(seed)
        centers = rng.standard_normal((clusters or max(100, n // 1000), dim)).astype(np.float32)
        vectors = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            vectors[start:stop] = centers[rng.integers(0, len(centers), stop - start)] + \
                0.6 * rng.standard_normal((stop - start, dim)).astype(np.float32)
            vectors[start:stop] /= np.linalg.norm(vectors[start:stop], axis=1, keepdims=True)
        state = torch.zeros(1, dtype=self.store.dtype)
        ids: List[int] = []
        first = None
        for i in range(n):
            entry_id = next(self._ids)
            first = entry_id if first is None else first
            now = next(self._clock)
            key = CacheKey(f"\x00synthetic {seed}:{i}", "", i, steps, 0.0, tenant=tenant, model_id="synthetic")
            self._entries[entry_id] = _Entry(entry_id, key, vectors[i], {step}, synthetic=True)
            stats = self._stats[(entry_id, step)] = StateStats(step, inserted=now, last_used=now,
                                                              floor=self.store.inflation)
            for victim in self.store.put((entry_id, step), state, self._score(stats)):
                self.counters["evicted_states"] += 1
                if victim[0] < first:  # a real entry's state; this fill's own are sorted out below
                    self._forget_state(*victim)
            ids.append(entry_id)
        indexed = time.perf_counter()
        kept = [e for e in ids if (e, step) in self.store]
        keep_rows = np.fromiter((e - first for e in kept), dtype=np.int64, count=len(kept))
        for entry_id in set(ids) - set(kept):  # pushed out of a full store before being indexed
            self._stats.pop((entry_id, step), None)
            del self._entries[entry_id]
        # (tenant, steps) is CacheKey.namespace: the shard real requests of ``steps`` steps search.
        # Synchronous: an IVF training the fill makes due is done (and timed) here, so the reported
        # search and index_seconds are what the following requests get.
        self.index.add_many((tenant, steps), kept, vectors if len(kept) == n else vectors[keep_rows], sync_build=True)
        self.synthetic_entries += len(kept)
        # One full collection now: the fill leaves millions of young objects, and the first requests
        # would otherwise pay the full pass it is due (2 s at 1M entries) inside a lookup.
        gc.collect()
        done = time.perf_counter()
        self.fill_report = {"requested": n, "entries": len(kept), "steps": steps, "tenant": tenant, "state_step": step,
                            "seconds": done - began, "index_seconds": done - indexed,
                            "search": self.index.shard_stats((tenant, steps))}
        return self.fill_report

    def tenants(self) -> List[str]:
        """Tenants with cached entries or lookups since their last flush."""
        return sorted({e.key.tenant for e in self._entries.values()} | set(self.tenant_counters))

    def tenant_stats(self, tenant: str) -> Dict[str, object]:
        """Entries, states and bytes per tier of one tenant, and its lookup counters."""
        return self._tenant_stats(tenant, [e for e in self._entries.values() if e.key.tenant == tenant])

    def all_tenant_stats(self) -> Dict[str, Dict[str, object]]:
        """:meth:`tenant_stats` of every tenant, from one pass over the entries."""
        groups: Dict[str, List[_Entry]] = {tenant: [] for tenant in self.tenants()}
        for entry in self._entries.values():
            groups[entry.key.tenant].append(entry)
        return {tenant: self._tenant_stats(tenant, entries) for tenant, entries in groups.items()}

    def _tenant_stats(self, tenant: str, entries: List[_Entry]) -> Dict[str, object]:
        tiers: Dict[str, Dict[str, int]] = {}
        for entry in entries:
            for step in entry.steps:
                placed = self.store.placement((entry.entry_id, step))
                if placed is not None:
                    usage = tiers.setdefault(placed[0], {"used_bytes": 0, "states": 0})
                    usage["used_bytes"] += placed[1]
                    usage["states"] += 1
        counters = self.tenant_counters.get(tenant, {})
        return {"tenant": tenant, "entries": len(entries), "states": sum(len(e.steps) for e in entries),
                "tiers": tiers, **{name: int(counters.get(name, 0))
                                   for name in ("lookups", "exact_hits", "approximate_hits", "misses")}}
