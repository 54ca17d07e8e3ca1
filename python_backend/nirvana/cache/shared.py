"""The shared tier: noise states that every replica of a deployment sees, kept in Redis.

Each replica keeps its own faiss index and device/host tiers as a read-through cache; Redis
holds what the replicas share:

* ``{P}:t:{tenant}:e:{digest}`` (hash): an entry's exact-hit key (JSON), its embedding
  (float32 bytes) and per cached step ``n:{step}`` (bytes), ``u:``/``i:``/``l:``/``f:``
  (uses, inserted, last used, LCBFU floor: the statistics the eviction policy scores);
* ``{P}:t:{tenant}:s:{digest}:{step}`` (string): one state, serialized with safetensors;
* ``{P}:scores`` (sorted set ``{tenant}:{digest}:{step}`` -> eviction score), ``{P}:bytes``,
  ``{P}:clock`` and ``{P}:inflation``: the global eviction order within ``shared_bytes``;
* ``{P}:events`` (stream): every admission, eviction and flush, which every replica tails to
  keep its index in step (:mod:`nirvana.cache.sync`);
* ``{P}:replicas`` (hash): each replica's counters, for the admin surface's stats.

``{P}`` is ``shared_prefix:model_id``: states of different exported models never mix. Tenants
appear hex-encoded in the keys (any string is a valid tenant), so a tenant's keys are one
``SCAN`` pattern and a flush is local to them.

Admission and eviction run as one Lua script: Redis executes it atomically, so the byte
budget and the eviction order hold however many replicas admit at once. Durability is Redis's
own (run it with ``appendonly yes``); nothing here writes files.

The scripts build key names from their arguments, so the tier needs a single Redis (or a
primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

log = logging.getLogger(__name__)

PASSWORD_ENV = "NIRVANA_REDIS_PASSWORD"  # the password never sits in a model config
# Layout version of the keys and values below: a package writing another layout uses other keys.
# v2: a state may be [2, C, H, W] (latents and the resume guard's direction); v1 replicas would
# misread those, so the two never share keys (a v1 tier is left alone, and the cache starts empty).
FORMAT = "v2"
FINAL = -1  # step key of an entry's final latents (nirvana.cache.engine.FINAL)

# Lua: store one entry's states, score them by the policy, then evict (lowest score first) until
# the shared bytes fit the budget. Every change goes out on the stream in the same atomic step.
_SCORE_LUA = """
local function score(policy, weight, uses, inserted, last, floor)
  if policy == 'lcbfu' then return floor + weight * (uses + 1)
  elseif policy == 'lru' then return last
  elseif policy == 'lfu' then return uses
  else return inserted end
end
"""

# Bytes charged to the budget beyond the tensors, so that shared_bytes bounds Redis's memory and
# not just the blobs: per state its key, sorted-set member, six hash fields and allocator slack;
# per entry its hash (key JSON and embedding are charged at their size plus this). Measured on
# Redis 7.0 (used_memory, 3,000 entries of 8 fp16 4x8x8 states + fp32 final latents, 384-d
# embeddings, a short stream): 15.5 KB per entry used, 15.8 KB charged. The events stream is not
# charged: give Redis's maxmemory room for it (stream_maxlen, 100,000 events of about the
# embedding's size each) beside shared_bytes.
STATE_OVERHEAD = 896
ENTRY_OVERHEAD = 256
# Most states one admission evicts: a replica configured with a smaller shared_bytes (a rolling
# change) trims the tier over several admissions instead of blocking Redis in one script.
MAX_EVICTIONS = 256

ADMIT_LUA = _SCORE_LUA + """
-- KEYS: entry hash, scores, bytes, clock, inflation, events
-- ARGV: prefix, tenant, digest, key json, embedding, origin, policy, budget, maxlen, state overhead,
--       entry overhead, max evictions, then (step, weight, blob) per state
local prefix, tenant, digest = ARGV[1], ARGV[2], ARGV[3]
local policy, budget, maxlen = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local state_overhead, entry_overhead, max_evictions = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local first = 13
-- What this admission adds, so that room is made before anything is written: over maxmemory
-- Redis refuses writes but not deletions, so a full tier can still make room.
local incoming = 0
if redis.call('EXISTS', KEYS[1]) == 0 then incoming = #ARGV[4] + #ARGV[5] + entry_overhead end
for i = first, #ARGV, 3 do
  incoming = incoming + #ARGV[i + 2] + state_overhead - tonumber(redis.call('HGET', KEYS[1], 'n:' .. ARGV[i]) or '0')
end
local inflation = tonumber(redis.call('GET', KEYS[5]) or '0')
local evicted = {}
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
while total + incoming > budget and #evicted < max_evictions do
  local victim = redis.call('ZPOPMIN', KEYS[2])
  if #victim == 0 then break end
  local member, vscore = victim[1], tonumber(victim[2])
  local vt, vd, vs = string.match(member, '^([^:]*):([^:]*):([^:]*)$')
  local ekey = prefix .. ':t:' .. vt .. ':e:' .. vd
  local n = tonumber(redis.call('HGET', ekey, 'n:' .. vs) or '0')
  redis.call('DEL', prefix .. ':t:' .. vt .. ':s:' .. vd .. ':' .. vs)
  redis.call('HDEL', ekey, 'n:' .. vs, 'u:' .. vs, 'i:' .. vs, 'l:' .. vs, 'f:' .. vs, 'w:' .. vs)
  if redis.call('HLEN', ekey) <= 3 then  -- key, emb, o: no state left
    n = n + tonumber(redis.call('HGET', ekey, 'o') or '0')
    redis.call('DEL', ekey)
    if ekey == KEYS[1] then incoming = incoming + #ARGV[4] + #ARGV[5] + entry_overhead end
  end
  total = total - n
  redis.call('DECRBY', KEYS[3], n)
  if policy == 'lcbfu' and vscore > inflation then
    inflation = vscore
    redis.call('SET', KEYS[5], vscore)
  end
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', maxlen, '*', 'op', 'forget', 'origin', ARGV[6], 'tenant', vt,
             'digest', vd, 'steps', vs)
  evicted[#evicted + 1] = member
end
local now = redis.call('INCR', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  local o = #ARGV[4] + #ARGV[5] + entry_overhead
  redis.call('HSET', KEYS[1], 'key', ARGV[4], 'emb', ARGV[5], 'o', o)
  redis.call('INCRBY', KEYS[3], o)
end
local steps = {}
for i = first, #ARGV, 3 do
  local step, weight, blob = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local skey = prefix .. ':t:' .. tenant .. ':s:' .. digest .. ':' .. step
  local old = tonumber(redis.call('HGET', KEYS[1], 'n:' .. step) or '0')
  redis.call('SET', skey, blob)
  redis.call('INCRBY', KEYS[3], #blob + state_overhead - old)
  redis.call('HSETNX', KEYS[1], 'i:' .. step, now)
  redis.call('HSETNX', KEYS[1], 'u:' .. step, 0)
  redis.call('HSET', KEYS[1], 'n:' .. step, #blob + state_overhead, 'l:' .. step, now, 'f:' .. step, inflation,
             'w:' .. step, weight)
  local uses = tonumber(redis.call('HGET', KEYS[1], 'u:' .. step))
  local inserted = tonumber(redis.call('HGET', KEYS[1], 'i:' .. step))
  redis.call('ZADD', KEYS[2], score(policy, weight, uses, inserted, now, inflation), tenant .. ':' .. digest .. ':' .. step)
  steps[#steps + 1] = step
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', maxlen, '*', 'op', 'put', 'origin', ARGV[6], 'tenant', tenant,
           'digest', digest, 'steps', table.concat(steps, ','), 'key', ARGV[4], 'emb', ARGV[5])
return evicted
"""

# Lua: count one use of a state in its global statistics and rescore it.
_TOUCH_LUA = _SCORE_LUA + """
local function touch(entry, scores, clock, inflation_key, step, member, policy)
  if redis.call('HEXISTS', entry, 'n:' .. step) == 0 then return end
  local weight = tonumber(redis.call('HGET', entry, 'w:' .. step) or '0')
  local now = redis.call('INCR', clock)
  local uses = redis.call('HINCRBY', entry, 'u:' .. step, 1)
  local inflation = tonumber(redis.call('GET', inflation_key) or '0')
  local inserted = tonumber(redis.call('HGET', entry, 'i:' .. step) or now)
  redis.call('HSET', entry, 'l:' .. step, now, 'f:' .. step, inflation)
  redis.call('ZADD', scores, 'XX', score(policy, weight, uses, inserted, now, inflation), member)
end
"""

# Lua: read one state and count the use (one round trip per fetch).
FETCH_LUA = _TOUCH_LUA + """
-- KEYS: state, entry hash, scores, clock, inflation;  ARGV: step, member, policy
local blob = redis.call('GET', KEYS[1])
if not blob then return false end
touch(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3])
return blob
"""

# Lua: count uses served from replicas' local copies.
TOUCH_LUA = _TOUCH_LUA + """
-- KEYS: scores, clock, inflation;  ARGV: policy, then (entry hash, step, member) per use
for i = 2, #ARGV, 3 do
  touch(ARGV[i], KEYS[1], KEYS[2], KEYS[3], ARGV[i + 1], ARGV[i + 2], ARGV[1])
end
return 0
"""

# Lua: drop whole entries (a flush): their states, scores and bytes.
DROP_LUA = """
-- KEYS: scores, bytes;  ARGV: prefix, then entry hash keys
local dropped = 0
for i = 2, #ARGV do
  local ekey = ARGV[i]
  local tenant, digest = string.match(ekey, ':t:([^:]*):e:([^:]*)$')
  local fields = redis.call('HKEYS', ekey)
  for _, f in ipairs(fields) do
    local step = string.match(f, '^n:(.*)$')
    if step then
      local n = tonumber(redis.call('HGET', ekey, f))
      redis.call('DEL', ARGV[1] .. ':t:' .. tenant .. ':s:' .. digest .. ':' .. step)
      redis.call('ZREM', KEYS[1], tenant .. ':' .. digest .. ':' .. step)
      redis.call('DECRBY', KEYS[2], n)
    end
  end
  redis.call('DECRBY', KEYS[2], tonumber(redis.call('HGET', ekey, 'o') or '0'))
  redis.call('DEL', ekey)
  dropped = dropped + 1
end
return dropped
"""


class SharedTierError(RuntimeError):
    """Redis is unreachable, too slow or answered an error; the caller serves without it."""


@dataclass
class SharedEntry:
    """An entry as the shared tier knows it: what a replica needs to index it."""

    tenant: str
    digest: str
    key: Dict[str, object]  # CacheKey fields
    embedding: np.ndarray
    steps: Tuple[int, ...]


@dataclass
class SharedEvent:
    """One record of the events stream."""

    event_id: str
    op: str  # put | forget | flush
    origin: str  # the replica that wrote it
    tenant: Optional[str]  # None: a flush of every tenant
    digest: str = ""
    steps: Tuple[int, ...] = ()
    key: Optional[Dict[str, object]] = None
    embedding: Optional[np.ndarray] = None


@dataclass
class SharedCounters:
    """What this replica's shared tier did (mirrored into Prometheus by nirvana.metrics)."""

    admitted_states: int = 0
    evicted_states: int = 0  # evicted by this replica's admissions (global policy)
    fetches: int = 0
    fetch_misses: int = 0  # the stream said a state was there; Redis no longer had it
    errors: int = 0
    reconnects: int = 0
    events_applied: int = 0
    resyncs: int = 0
    touches: int = 0
    malformed: int = 0  # entries or states Redis holds that this package cannot read (skipped)
    fetch_seconds: "collections.deque[float]" = field(default_factory=lambda: collections.deque(maxlen=10_000))


def encode_tenant(tenant: str) -> str:
    return tenant.encode("utf-8").hex()


def decode_tenant(text: str) -> str:
    return bytes.fromhex(text).decode("utf-8")


def serialize_state(tensor: torch.Tensor) -> bytes:
    return save_tensors({"state": tensor.detach().to("cpu").contiguous()})


def deserialize_state(blob: bytes) -> torch.Tensor:
    return load_tensors(blob)["state"]


def score_member(tenant: str, digest: str, step: int) -> str:
    """A state's member in the scores sorted set (the Lua scripts parse it back)."""
    return f"{encode_tenant(tenant)}:{digest}:{step}"


def percentiles(values: Iterable[float], scale: float = 1.0) -> Dict[str, float]:
    """p50 and p99 of ``values`` (times ``scale``); empty without values."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"p50": scale * ordered[len(ordered) // 2], "p99": scale * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def key_prefix(shared_prefix: str, model_id: str) -> str:
    """The prefix of every key of one exported model's shared tier."""
    return f"{shared_prefix}:{model_id}:{FORMAT}"


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class SharedTier:
    """A Redis-backed store of noise states shared by every replica (see the module docstring).

    Thread-safe (redis-py pools its connections). Every call either succeeds or raises
    :class:`SharedTierError`; after a failure, calls fail fast (without waiting on Redis) until
    :meth:`reconnect` succeeds, so a dead Redis costs a request at most one timeout.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``); the password, if any, from
            the URL or the ``NIRVANA_REDIS_PASSWORD`` environment variable.
        prefix: Key prefix (:func:`key_prefix`: one exported model's, in this key layout).
        budget_bytes: Bytes of states the shared tier keeps; the global policy evicts beyond it.
        policy: Eviction policy (lcbfu, lru, lfu, fifo), scored in Redis.
        timeout_s: Socket timeout of every request-path call.
        replica_id: Names this replica in the stream (events it wrote) and in the cross-replica stats.
        stream_maxlen: Events kept in the stream (approximately); a replica further behind resyncs.
    """

    def __init__(self, url: str, prefix: str, budget_bytes: int, policy: str = "lcbfu", timeout_s: float = 0.1,
                 replica_id: str = "", stream_maxlen: int = 100_000, client=None):
        import redis  # optional at import time: a server without the shared tier never needs it

        self.url, self.prefix, self.budget_bytes, self.policy = url, prefix, int(budget_bytes), policy
        self.timeout_s = float(timeout_s)
        self.replica_id = replica_id or default_replica_id()
        self.stream_maxlen = int(stream_maxlen)
        self.counters = SharedCounters()
        self._errors = (redis.exceptions.RedisError, OSError)
        # Errors that mean Redis cannot be reached (or cannot take writes): the tier is down until a
        # ping answers. Others (out of memory, a script error) fail the one call.
        self._unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                             redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError, OSError)
        self.client = client or self._connect(self.timeout_s)
        self._admit = self.client.register_script(ADMIT_LUA)
        self._fetch = self.client.register_script(FETCH_LUA)
        self._touch = self.client.register_script(TOUCH_LUA)
        self._drop = self.client.register_script(DROP_LUA)
        self._up = False
        self._warned: Dict[Tuple[str, str], float] = {}
        self._state_lock = threading.Lock()
        self._uses: "collections.deque[Tuple[str, str, int]]" = collections.deque(maxlen=100_000)
        self.last_error = ""
        self.down_since: Optional[float] = None

    # -- keys -----------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    def entry_key(self, tenant: str, digest: str) -> str:
        return self._key("t", encode_tenant(tenant), "e", digest)

    def state_key(self, tenant: str, digest: str, step: int) -> str:
        return self._key("t", encode_tenant(tenant), "s", digest, str(step))

    @property
    def events_key(self) -> str:
        return self._key("events")

    # -- health ---------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether request-path calls go to Redis (False after a failure, until reconnected)."""
        return self._up

    def _connect(self, socket_timeout: float):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a request waits at most one timeout, then the tier is down until a ping answers.
        return redis.Redis.from_url(self.url, socket_timeout=socket_timeout,
                                    socket_connect_timeout=max(self.timeout_s, 0.1), retry=Retry(NoBackoff(), 0),
                                    password=os.environ.get(PASSWORD_ENV) or None)

    def _failed(self, exc: BaseException, what: str, mark_down: bool = True) -> SharedTierError:
        with self._state_lock:
            self.counters.errors += 1
            self.last_error = f"{what}: {exc!r}"
            was_up = self._up
            if mark_down and isinstance(exc, self._unreachable):
                self._up = False
                if was_up or self.down_since is None:
                    self.down_since = time.monotonic()
            else:
                was_up = False  # still up: the one call failed
                kind = (what, type(exc).__name__)
                if time.monotonic() - self._warned.get(kind, -1e9) > 60:  # once a minute per kind
                    self._warned[kind] = time.monotonic()
                    log.warning("shared tier %s: %s failed (%r); served without it (further such failures "
                                "this minute are counted, not logged)", self.redact(self.url), what, exc)
        if was_up and not self._up:
            log.warning("shared tier %s unavailable (%s); serving from the local cache until it returns",
                        self.redact(self.url), self.last_error)
        return SharedTierError(self.last_error)

    def _check(self) -> None:
        if not self._up:
            raise SharedTierError(f"shared tier down since {self.last_error or 'start'}")

    def reconnect(self) -> bool:
        """Ping Redis; True (and calls go to Redis again) when it answers."""
        try:
            self.client.ping()
        except self._errors as exc:
            self._failed(exc, "ping")
            return False
        with self._state_lock:
            came_back = not self._up
            self._up = True
            if came_back:
                self.counters.reconnects += 1
                if self.down_since is not None:
                    log.warning("shared tier %s is back after %.1f s", self.redact(self.url),
                                time.monotonic() - self.down_since)
                self.down_since = None
        return True

    # -- request path ---------------------------------------------------------------------------

    def admit(self, tenant: str, digest: str, key: Mapping[str, object], embedding: np.ndarray,
              states: Mapping[int, Tuple[torch.Tensor, int]]) -> List[Tuple[str, str, int]]:
        """Store an entry's states (step -> (tensor, policy weight)) and evict to the budget.

        Returns:
            The states the global policy evicted to make room: (tenant, digest, step) each.
        """
        self._check()
        args: List[object] = [self.prefix, encode_tenant(tenant), digest, json.dumps(dict(key), sort_keys=True),
                              np.asarray(embedding, np.float32).tobytes(), self.replica_id, self.policy,
                              self.budget_bytes, self.stream_maxlen, STATE_OVERHEAD, ENTRY_OVERHEAD, MAX_EVICTIONS]
        for step, (tensor, weight) in states.items():
            args += [int(step), int(weight), serialize_state(tensor)]
        keys = [self.entry_key(tenant, digest), self._key("scores"), self._key("bytes"), self._key("clock"),
                self._key("inflation"), self.events_key]
        try:
            evicted = self._admit(keys=keys, args=args)
        except self._errors as exc:
            raise self._failed(exc, "admit") from exc
        self.counters.admitted_states += len(states)
        self.counters.evicted_states += len(evicted)
        return [self._member(m) for m in evicted]

    @staticmethod
    def _member(member: bytes) -> Tuple[str, str, int]:
        tenant, digest, step = member.decode().split(":")
        return decode_tenant(tenant), digest, int(step)

    def fetch(self, tenant: str, digest: str, step: int) -> Optional[torch.Tensor]:
        """One state, or None when Redis no longer holds it; counts the use in the global statistics."""
        self._check()
        began = time.perf_counter()
        keys = [self.state_key(tenant, digest, step), self.entry_key(tenant, digest), self._key("scores"),
                self._key("clock"), self._key("inflation")]
        member = score_member(tenant, digest, step)
        try:
            blob = self._fetch(keys=keys, args=[step, member, self.policy])
        except self._errors as exc:
            raise self._failed(exc, "fetch") from exc
        self.counters.fetches += 1
        self.counters.fetch_seconds.append(time.perf_counter() - began)
        if blob is None:
            self.counters.fetch_misses += 1
            return None
        try:
            return deserialize_state(blob)
        except Exception as exc:  # noqa: BLE001 - an unreadable state is a miss, never a failed request
            self.counters.malformed += 1
            log.warning("shared tier: state %s:%s is unreadable (%r); treated as gone", digest, step, exc)
            return None

    def record_use(self, tenant: str, digest: str, step: int) -> None:
        """A use served from this replica's local copy of a shared state: counted in the global
        statistics by the next :meth:`flush_uses` (the sync thread's), off the request path."""
        self._uses.append((tenant, digest, int(step)))

    def flush_uses(self) -> int:
        """Send the recorded uses to Redis in one call; returns how many. Uses recorded while
        Redis is down are dropped: they only refine the eviction order."""
        uses = []
        while self._uses:
            uses.append(self._uses.popleft())
        if self._up:
            for start in range(0, len(uses), 1000):  # short scripts: Redis serves others between them
                self.touch(uses[start:start + 1000])
        return len(uses)

    def touch(self, uses: Iterable[Tuple[str, str, int]]) -> None:
        """Count uses served from replicas' local copies in the global statistics (one script call)."""
        uses = list(uses)
        if not uses:
            return
        self._check()
        args: List[object] = [self.policy]
        for tenant, digest, step in uses:
            args += [self.entry_key(tenant, digest), int(step), score_member(tenant, digest, step)]
        try:
            self._touch(keys=[self._key("scores"), self._key("clock"), self._key("inflation")], args=args)
        except self._errors as exc:
            raise self._failed(exc, "touch") from exc
        self.counters.touches += len(uses)

    def flush(self, tenant: Optional[str]) -> int:
        """Drop every entry of ``tenant`` (all tenants when None) and tell every replica.

        Returns:
            How many entries Redis dropped.
        """
        self._check()
        pattern = self._key("t", "*" if tenant is None else encode_tenant(tenant), "e", "*")
        dropped = 0
        try:
            batch: List[str] = []
            for name in self.client.scan_iter(match=pattern, count=1000):
                batch.append(name.decode() if isinstance(name, bytes) else name)
                if len(batch) >= 500:
                    dropped += int(self._drop(keys=[self._key("scores"), self._key("bytes")], args=[self.prefix] + batch))
                    batch = []
            if batch:
                dropped += int(self._drop(keys=[self._key("scores"), self._key("bytes")], args=[self.prefix] + batch))
            self.client.xadd(self.events_key, {"op": "flush", "origin": self.replica_id,
                                               "tenant": "*" if tenant is None else encode_tenant(tenant)},
                             maxlen=self.stream_maxlen, approximate=True)
        except self._errors as exc:
            raise self._failed(exc, "flush") from exc
        return dropped

    # -- catching up (the sync thread) ----------------------------------------------------------

    def server_id(self) -> str:
        """Redis's run_id: it changes when Redis restarts."""
        try:
            return str(self.client.info("server").get("run_id", ""))
        except self._errors as exc:
            raise self._failed(exc, "info") from exc

    def last_event_id(self) -> str:
        """The newest event's id ("0-0" for an empty stream): where tailing starts after a resync."""
        try:
            newest = self.client.xrevrange(self.events_key, count=1)
        except self._errors as exc:
            raise self._failed(exc, "xrevrange") from exc
        return newest[0][0].decode() if newest else "0-0"

    def first_event_id(self) -> Optional[str]:
        try:
            oldest = self.client.xrange(self.events_key, count=1)
        except self._errors as exc:
            raise self._failed(exc, "xrange") from exc
        return oldest[0][0].decode() if oldest else None

    def entries(self) -> Iterator[SharedEntry]:
        """Every entry Redis holds, with the steps it holds (a replica's catch-up)."""
        pattern = self._key("t", "*", "e", "*")
        try:
            names = list(self.client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(names), 500):
                chunk = names[start:start + 500]
                with self.client.pipeline(transaction=False) as pipe:
                    for name in chunk:
                        pipe.hgetall(name)
                    values = pipe.execute()
                for name, fields in zip(chunk, values):
                    try:
                        entry = self._entry_from(name.decode(), fields)
                    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
                        self.counters.malformed += 1
                        log.warning("shared tier: entry %r is unreadable (%r); skipped", name, exc)
                        continue
                    if entry is not None:
                        yield entry
        except self._errors as exc:
            raise self._failed(exc, "scan") from exc

    def _entry_from(self, name: str, fields: Mapping[bytes, bytes]) -> Optional[SharedEntry]:
        if b"key" not in fields or b"emb" not in fields:
            return None
        parts = name.split(":")
        steps = tuple(sorted(int(f[2:]) for f in (k.decode() for k in fields) if f.startswith("n:")))
        if not steps:
            return None
        return SharedEntry(decode_tenant(parts[-3]), parts[-1], json.loads(fields[b"key"]),
                           np.frombuffer(fields[b"emb"], dtype=np.float32).copy(), steps)

    def read_events(self, after: str, block_ms: int, count: int = 1000, client=None) -> List[SharedEvent]:
        """Events after ``after`` (waiting up to ``block_ms`` for the first); ``client``: a
        connection whose socket timeout outlasts the block."""
        try:
            answer = (client or self.client).xread({self.events_key: after}, count=count, block=block_ms)
        except self._errors as exc:
            raise self._failed(exc, "xread") from exc
        events = []
        for _stream, records in answer or ():
            for event_id, fields in records:
                events.append(self._event_from(event_id.decode(), fields))
        return events

    @staticmethod
    def _event_from(event_id: str, fields: Mapping[bytes, bytes]) -> SharedEvent:
        text = {k.decode(): v for k, v in fields.items()}
        op = text[("op")].decode()
        tenant_field = text.get("tenant", b"").decode()
        tenant = None if tenant_field == "*" else decode_tenant(tenant_field)
        steps = tuple(int(s) for s in text.get("steps", b"").decode().split(",") if s)
        key = json.loads(text["key"]) if "key" in text else None
        embedding = np.frombuffer(text["emb"], dtype=np.float32).copy() if "emb" in text else None
        return SharedEvent(event_id, op, text.get("origin", b"").decode(), tenant, text.get("digest", b"").decode(),
                           steps, key, embedding)

    def blocking_client(self, block_ms: int):
        """A separate connection for blocking stream reads (its timeout outlasts ``block_ms``)."""
        # The block plus a second: a busy server may answer a block's end late, and a timeout here
        # marks the tier down for every request.
        return self._connect(max(self.timeout_s, 1.0) + block_ms / 1000.0)

    # -- admin ----------------------------------------------------------------------------------

    def publish_replica_stats(self, stats: Mapping[str, object]) -> None:
        """This replica's counters, for :meth:`replica_stats` on any replica."""
        try:
            self.client.hset(self._key("replicas"), self.replica_id,
                             json.dumps({**stats, "published": time.time()}, sort_keys=True, default=str))
        except self._errors as exc:
            raise self._failed(exc, "hset replicas", mark_down=False) from exc

    def replica_stats(self, max_age_s: float = 60.0) -> Dict[str, Dict[str, object]]:
        """Every replica's last published counters (those silent for ``max_age_s`` are dropped)."""
        self._check()
        try:
            raw = self.client.hgetall(self._key("replicas"))
        except self._errors as exc:
            raise self._failed(exc, "hgetall replicas", mark_down=False) from exc
        now, out, stale = time.time(), {}, []
        for name, value in raw.items():
            record = json.loads(value)
            age = now - float(record.get("published", 0))
            if age > max_age_s:
                stale.append(name)
                continue
            out[name.decode()] = {**record, "age_s": round(age, 3)}
        if stale:
            try:
                self.client.hdel(self._key("replicas"), *stale)
            except self._errors:
                pass  # best effort: the next reader drops them again
        return out

    def usage(self) -> Dict[str, object]:
        """Bytes and states held in Redis, the budget and Redis's own persistence status."""
        self._check()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self._key("bytes"))
                pipe.zcard(self._key("scores"))
                pipe.info("persistence")
                used, states, persistence = pipe.execute()
        except self._errors as exc:
            raise self._failed(exc, "usage", mark_down=False) from exc
        return {"used_bytes": int(used or 0), "budget_bytes": self.budget_bytes, "states": int(states),
                "aof_enabled": bool(persistence.get("aof_enabled")),
                "aof_last_write_status": persistence.get("aof_last_write_status")}

    def stats(self) -> Dict[str, object]:
        """This replica's view of the tier: reachable or not, and its counters."""
        counters = {name: value for name, value in vars(self.counters).items() if name != "fetch_seconds"}
        counters.update({f"fetch_ms_{q}": round(v, 3) for q, v in percentiles(self.counters.fetch_seconds, 1000).items()})
        return {"url": self.redact(self.url), "replica_id": self.replica_id, "up": self._up,
                "last_error": self.last_error, **counters}

    @staticmethod
    def redact(url: str) -> str:
        """``url`` without its password (for logs and stats)."""
        if "@" not in url:
            return url
        scheme, rest = url.split("://", 1) if "://" in url else ("", url)
        return f"{scheme}://***@{rest.split('@', 1)[1]}" if scheme else "***@" + rest.split("@", 1)[1]

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not fail an unload
            pass
