"""Cosine-similarity index over L2-normalized prompt embeddings (faiss inner product).

Each namespace (tenant and step count) has its own shard, so a search can never
return another namespace's entry. Entries come and go all the time, and faiss
GPU indexes (and HNSW) have no ``remove_ids``; so every shard keeps its vectors
on the CPU as the source of truth, removal marks a tombstone that searches
filter out, and a shard is rebuilt from its live vectors once tombstones reach
a quarter of it. One code path serves CPU and GPU.

Kinds:
    auto (default): exact (flat) search while a shard holds fewer than
        ``AUTO_IVF_MIN`` vectors, IVF-Flat above, with the recall check below.
    flat: exact search always; on the GPU when faiss has one.
    ivf: like auto but switching at ``IVF_MIN`` (kept for configs that name it).
    hnsw: approximate search (HNSW, M=32), CPU.

IVF shards have 4*sqrt(n) lists and are retrained whenever the shard has doubled
since the last training or is rebuilt (a shard that shrinks below the threshold
goes back to exact search). On every (re)training a **recall check** runs:
``RECALL_SAMPLE`` stored vectors, slightly perturbed (like near-duplicate
prompts), are searched with the IVF and exactly; nprobe starts at
``IVF_NPROBE`` and doubles (up to ``IVF_MAX_NPROBE``) until recall@1 reaches
``RECALL_TARGET``. The measured recall and nprobe are in :meth:`EmbeddingIndex.stats`.

**Background builds** (``background_build=True``, the default): the ``add`` (or ``remove``) that
makes an IVF (re)training due only takes a snapshot of the shard's live vectors (a view of its
buffer when nothing is dead, else a compacted copy that later becomes the buffer) and starts a
thread that trains, fills and recall-checks a CPU IVF over it (:func:`build_ivf`; faiss releases
the GIL, and the thread sets ``threads`` for itself: OpenMP's setting is per thread). Until it is
ready the shard serves searches from its current index and keeps taking adds and removals; at
most one build per shard runs, and compaction waits for it, so positions stay stable. The
shard's next add, search or remove (or ``stats``/``finish_builds``) on the caller's thread swaps it
in: the snapshot's rows keep their order, entries removed since stay tombstoned, the vectors
added since are added to the new index, then it goes to the GPU if there is one, and a
compaction or doubling that fell due meanwhile starts the next build. A shard that empties or
shrinks back to exact search, and :meth:`EmbeddingIndex.close`, drop a running build's result.
``background_build=False`` (and ``add_many(sync_build=True)``, used by
``LatentCache.fill_synthetic``) trains inside the ``add`` instead.

Why ``AUTO_IVF_MIN`` = 32,768 (``nirvana-index-bench --threads 1``, 384-d
clustered vectors, one core of the 2-core development machine):

- Exact search costs about 0.04 µs per stored vector per lookup on an idle core
  (p50 0.08 ms at 4k, 0.6 ms at 16k, 1.5-1.8 ms at 32k, 3.6-5.9 ms at 64k) and 3-4x more
  on a busy machine (2.4 ms at 17k, seen replaying a real log). Below 32k it stays
  under ~1.5 ms idle / ~5 ms busy: under 0.5% of a miss (0.9-2 s), with recall 1.
- IVF answers in 0.02-0.1 ms at 16k-64k but must be trained (in the background) on
  every doubling: 0.5 s at 16k, 1.9 s at 32k, 5.3 s at 64k (about 80-150 µs per
  vector: 8.5 s at 100k, 150-185 s at 1M); below 32k that stall buys little.
- With 4*sqrt(n) lists, k-means gets sqrt(n)/4 training points per list; faiss
  asks for at least 39, i.e. n >= 24.3k. At 32k there are 45.
- At 100k (1M) entries exact search costs 5.4 (116) ms p50 against 0.11 (0.35)
  ms for IVF at recall@1 1.000 (README, "Measured figures").

Threads: faiss's OpenMP pool is per process and defaults to one thread per core;
every Python-backend process sizing its own pool makes them fight (one search
over 17k vectors took 8 ms with 2 threads on a busy 2-core machine, 2.4 ms with 1).
``threads`` (the latent_cache ``index_threads`` parameter, default 1) sets it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Hashable, List, Optional, Tuple

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_IVF_MIN = 32_768  # "auto": exact below this many vectors per shard, IVF above (reasons above)
IVF_MIN = 20_000  # "ivf": the same switch, at the size it always had
IVF_NPROBE = 16  # first nprobe the recall check tries
IVF_MAX_NPROBE = 256  # the recall check's cap
RECALL_TARGET = 0.99  # recall@1 against exact search the recall check asks for
RECALL_SAMPLE = 200  # stored vectors used as queries by the recall check
RECALL_NOISE = 0.15  # relative perturbation of those queries (cosine ~0.99 to the stored vector)
GPU_MAX_K = 2048  # most results a faiss GPU index returns per query (GPU_MAX_SELECTION_K)


def normalize(vector: np.ndarray) -> np.ndarray:
    """L2-normalize a 1-D or 2-D float array (rows), as float32."""
    vector = np.asarray(vector, dtype=np.float32)
    norms = np.linalg.norm(vector, axis=-1, keepdims=True)
    return vector / np.maximum(norms, 1e-12)


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get and hasattr(faiss, "StandardGpuResources") else 0


def recall_check(index, vectors: np.ndarray, target: float = None, start_nprobe: int = None,
                 max_nprobe: int = None, sample: int = None, seed: int = 0) -> Dict[str, float]:
    """Set ``index.nprobe`` (a CPU IVF index holding ``vectors``) to the smallest doubling of
    ``start_nprobe`` whose recall@1 against exact search reaches ``target``.

    Queries are ``sample`` stored vectors perturbed by ``RECALL_NOISE``; a query counts as found
    when the IVF's best similarity equals the exact best (ties between duplicates count).

    Returns:
        nprobe, recall_at_1 (at that nprobe), the recall at the first nprobe tried, and seconds taken.
    """
    target = RECALL_TARGET if target is None else target
    nprobe = IVF_NPROBE if start_nprobe is None else start_nprobe
    cap = min(IVF_MAX_NPROBE if max_nprobe is None else max_nprobe, index.nlist)
    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(vectors), size=min(len(vectors), RECALL_SAMPLE if sample is None else sample),
                       replace=False)
    dim = vectors.shape[1]
    queries = normalize(vectors[picks] + RECALL_NOISE * rng.standard_normal((len(picks), dim)).astype(np.float32)
                        / np.sqrt(dim))
    exact, _ = faiss.knn(queries, vectors, 1, faiss.METRIC_INNER_PRODUCT)
    nprobe = max(1, min(nprobe, cap))
    first = None
    while True:
        index.nprobe = nprobe
        sims, _ = index.search(queries, 1)
        recall = float(np.mean(sims[:, 0] >= exact[:, 0] - 1e-5))
        first = recall if first is None else first
        if recall >= target or nprobe >= cap:
            break
        nprobe = min(cap, 2 * nprobe)
    return {"nprobe": nprobe, "recall_at_1": recall, "first_recall_at_1": first,
            "recall_check_s": time.perf_counter() - began}


def ivf_threshold(kind: str, ivf_min: Optional[int] = None) -> Optional[int]:
    """Shard size at which ``kind`` switches to IVF (None: never); read at call time (tests change it)."""
    if kind not in ("auto", "ivf"):
        return None
    if ivf_min is not None:
        return int(ivf_min)
    return IVF_MIN if kind == "ivf" else AUTO_IVF_MIN


def build_ivf(vectors: np.ndarray, recall_target: Optional[float] = None) -> Tuple[object, Dict[str, float]]:
    """A trained, filled and recall-checked CPU IVF-Flat over ``vectors`` (4*sqrt(n) lists) and its
    stats (size, nlist, train_s, and :func:`recall_check`'s). Thread-safe: it reads ``vectors`` only
    (faiss releases the GIL while it trains, adds and searches)."""
    began = time.perf_counter()
    dim = vectors.shape[1]
    nlist = int(4 * np.sqrt(len(vectors)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[np.random.default_rng(0).permutation(len(vectors))[:64 * nlist]])
    index.add(vectors)
    trained = time.perf_counter() - began
    return index, {"size": len(vectors), "nlist": nlist, "train_s": trained,
                   **recall_check(index, vectors, recall_target)}


class _Build:
    """One IVF (re)build of a shard, over a snapshot of its live vectors.

    ``source`` is the shard's buffer at the snapshot: its rows below ``positions`` are never
    written while a build runs (adds write above them, and compaction waits for the build), so the
    thread may read them. ``keep`` are the live positions at the snapshot (None: all of
    0..size-1, read in place); otherwise the thread first copies their rows, in chunks, into
    ``vectors``, a compacted copy with room to grow that becomes the shard's buffer at the swap.
    The thread writes ``vectors``/``index``/``info``/``error`` before setting ``done``; the shard
    reads them after ``done``.
    """

    def __init__(self, keep: Optional[List[int]], source: np.ndarray, size: int, positions: int,
                 recall_target, threads: int):
        self.keep, self.source, self.size = keep, source, size
        self.vectors: Optional[np.ndarray] = source if keep is None else None
        self.positions = positions  # the shard's positions at the snapshot; later ones were added since
        self.began = time.perf_counter()
        self.recall_target, self.threads = recall_target, threads
        self.index = self.info = self.error = None
        self.seconds = 0.0
        self.done = threading.Event()
        self.cancelled = False
        self.thread: Optional[threading.Thread] = None

    def run(self) -> None:
        began = time.perf_counter()
        try:
            if self.threads and self.thread is not None:  # OpenMP's thread count is per calling thread
                faiss.omp_set_num_threads(self.threads)
            if self.keep is not None:
                copy = np.zeros((max(16, 2 * self.size), self.source.shape[1]), dtype=np.float32)
                for start in range(0, self.size, 16_384):  # short steps: the caller's thread wants the GIL
                    stop = min(self.size, start + 16_384)
                    copy[start:stop] = self.source[np.asarray(self.keep[start:stop], dtype=np.int64)]
                self.vectors = copy
            self.index, self.info = build_ivf(self.vectors[:self.size], self.recall_target)
        except BaseException as error:  # reported by the shard at the swap
            self.error = error
        self.seconds = time.perf_counter() - began
        self.source = None
        if self.cancelled:  # the shard is gone or gave up on this build: hold nothing
            self.index = self.vectors = None
        self.done.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="nirvana-ivf-build", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self.cancelled = True
        if self.done.is_set():
            self.index = self.vectors = self.source = None


class _Shard:
    """One namespace: faiss index over positions, with the vectors kept on the CPU."""

    def __init__(self, dim: int, kind: str, gpu_resources, hnsw_m: int, ef_search: int,
                 ivf_min: Optional[int] = None, recall_target: Optional[float] = None,
                 background_build: bool = True, threads: int = 0):
        self.dim, self.kind = dim, kind
        self.gpu_resources = gpu_resources
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self._ivf_min, self.recall_target = ivf_min, recall_target
        self.background_build, self.threads = background_build, threads
        self._buffer = np.zeros((16, dim), dtype=np.float32)  # grows by doubling
        self.ids: List[int] = []  # position -> entry id (-1 once removed)
        self.position: Dict[int, int] = {}
        self.dead = 0
        self.built_size = 0
        self.ivf: Optional[Dict[str, float]] = None  # the last training and recall check, while IVF
        self._build: Optional[_Build] = None  # the IVF build in flight (at most one)
        self._retry_at = 0  # after a failed build: no new one before the shard holds this many
        self.builds = 0
        self.last_build_s: Optional[float] = None  # the last build's time in its thread (train, add, check)
        self.last_swap_s: Optional[float] = None  # and its swap, on the caller's thread
        self.finished_at = 0.0
        self.last_build_error: Optional[str] = None
        self.index = self._exact(self.vectors)

    @property
    def ivf_min(self) -> Optional[int]:
        return ivf_threshold(self.kind, self._ivf_min)

    @property
    def building(self) -> bool:
        return self._build is not None

    def _exact(self, vectors: np.ndarray):
        """A new flat (or HNSW, for that kind) index holding ``vectors``."""
        self.ivf = None
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
            if len(vectors):
                index.add(vectors)
            return index
        index = faiss.IndexFlatIP(self.dim)
        if len(vectors):
            index.add(vectors)
        if self.gpu_resources is not None:
            index = faiss.index_cpu_to_gpu(self.gpu_resources, 0, index)
        return index

    @property
    def vectors(self) -> np.ndarray:
        return self._buffer[:len(self.ids)]

    @property
    def live(self) -> int:
        return len(self.position)

    def add(self, entry_ids: List[int], vectors: np.ndarray, sync_build: Optional[bool] = None) -> None:
        """Add rows of ``vectors`` (normalized, 2-D) under ``entry_ids``; an IVF (re)training that
        falls due starts in the background (or runs now: ``sync_build``, or the shard's default)."""
        sync = (not self.background_build) if sync_build is None else sync_build
        if sync and self._build is not None:
            self.finish_build()  # a synchronous add leaves no build behind, even an older one
        self.poll()
        start, stop = len(self.ids), len(self.ids) + len(entry_ids)
        if start == 0 and stop > len(self._buffer) and vectors.flags.c_contiguous:
            self._buffer = vectors  # a bulk add into an empty shard: adopt the (normalized, owned) copy
        elif stop > len(self._buffer):
            grown = np.zeros((max(stop, 2 * len(self._buffer)), self.dim), dtype=np.float32)
            grown[:start] = self._buffer[:start]
            self._buffer = grown  # a running build keeps the old array (its snapshot view) alive
        if self._buffer is not vectors:
            self._buffer[start:stop] = vectors
        for pos, entry_id in enumerate(entry_ids, start):
            self.position[entry_id] = pos
        self.ids.extend(entry_ids)
        if sync and self.ivf_min is not None and self._build is None and self._ivf_due():
            self.rebuild(sync=True)  # the old index is replaced now: no need to add to it first
            return
        self.index.add(vectors)
        if self.ivf_min is not None and self._build is None and self._ivf_due():
            self.rebuild(sync=sync)  # (re)train the coarse quantizer on what the shard holds now

    def _ivf_due(self) -> bool:
        if len(self.ids) < self._retry_at:
            return False
        if self.ivf is None:  # exact for now: switch once the shard reaches the threshold
            return len(self.ids) >= self.ivf_min
        return len(self.ids) >= 2 * self.built_size  # retrain on every doubling

    def remove(self, entry_id: int) -> None:
        self.poll()
        pos = self.position.pop(entry_id)
        self.ids[pos] = -1
        self.dead += 1
        if self.dead >= max(16, len(self.ids) // 4):
            if self._build is None:
                self.rebuild(sync=not self.background_build)
            elif self.live < self.ivf_min:  # the build in flight would be too big: go exact now
                self.rebuild(sync=True)
            # else the swap compacts the shard, and rebuilds again if tombstones are still due

    def rebuild(self, sync: bool = True) -> None:
        """Compact the shard and rebuild its index: exact right away, or an IVF (trained in the
        background unless ``sync``) once the live vectors reach the threshold."""
        self.cancel_build()
        keep = [pos for pos, entry in enumerate(self.ids) if entry >= 0]
        if self.ivf_min is not None and len(keep) >= self.ivf_min:
            # Nothing dead: the build reads the buffer's rows in place; else it copies the live ones.
            build = _Build(None if len(keep) == len(self.ids) else keep, self._buffer, len(keep), len(self.ids),
                           self.recall_target, self.threads)
            self._build = build
            if sync:
                build.run()
                self.poll()
            else:
                build.start()
            return
        live = self.vectors[keep]
        self._buffer = np.zeros((max(16, 2 * len(keep)), self.dim), dtype=np.float32)
        self._buffer[:len(keep)] = live
        self.ids = [self.ids[pos] for pos in keep]
        self.position = {entry: pos for pos, entry in enumerate(self.ids)}
        self.dead = 0
        self.built_size = len(self.ids)
        self.index = self._exact(self.vectors)

    def poll(self) -> None:
        """Swap in the IVF built in the background once it is ready (on the caller's thread)."""
        build = self._build
        if build is None or not build.done.is_set():
            return
        began = time.perf_counter()
        self._build = None
        self.builds += 1
        self.last_build_s, self.finished_at = build.seconds, began
        if build.error is not None:
            self.last_build_error = repr(build.error)
            self._retry_at = 2 * build.size  # do not retrain on every add
            LOG.warning("IVF build over %d vectors failed (%s); kept the current index", build.size,
                        self.last_build_error)
            return
        self.last_build_error = None
        # Positions are stable while a build runs (compaction waits for it): the build's rows are
        # the snapshot's positions ``keep`` (0..size-1 when nothing was dead), and everything
        # after ``tail`` was added since. Entries removed since stay in the new index, tombstoned.
        added = [pos for pos in range(build.positions, len(self.ids)) if self.ids[pos] >= 0]
        rows = self._buffer[added] if added else np.zeros((0, self.dim), dtype=np.float32)
        count = build.size + len(rows)
        base = self._buffer if build.keep is None else build.vectors  # rows 0..size-1: the build's
        if count > len(base):
            grown = np.zeros((max(16, 2 * count), self.dim), dtype=np.float32)
            grown[:build.size] = base[:build.size]
            base = grown
        base[build.size:count] = rows  # (rows is a copy: base may be the buffer it came from)
        index = build.index
        if len(rows):
            index.add(rows)
        if self.gpu_resources is not None:  # on this thread: GPU resources are not shared with the builder
            index = faiss.index_cpu_to_gpu(self.gpu_resources, 0, index)
        if build.keep is None:  # positions below the snapshot stay; only the tail may close up
            if len(added) != len(self.ids) - build.positions:
                self.ids[build.size:] = [self.ids[pos] for pos in added]
                for pos in range(build.size, count):
                    self.position[self.ids[pos]] = pos
        else:
            self.ids = [self.ids[pos] for pos in build.keep] + [self.ids[pos] for pos in added]
            self.position = {entry: pos for pos, entry in enumerate(self.ids) if entry >= 0}
        self._buffer = base
        self.dead = len(self.ids) - len(self.position)
        self.built_size = build.size
        self.index, self.ivf = index, build.info
        build.index = build.vectors = None
        self.last_swap_s = time.perf_counter() - began
        if self.dead >= max(16, len(self.ids) // 4):  # removals during the build: compact again
            self.rebuild(sync=not self.background_build)
        elif self.ivf_min is not None and self._ivf_due():  # doubled during the build
            self.rebuild(sync=not self.background_build)

    def finish_build(self, timeout: Optional[float] = None) -> bool:
        """Wait for the build in flight (and any its swap starts) and swap it in; False if one is
        still running after ``timeout`` seconds."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while self._build is not None:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if not self._build.done.wait(left):
                return False
            self.poll()
        return True

    def cancel_build(self) -> None:
        """Forget the build in flight: its thread finishes on its own and its result is dropped."""
        if self._build is not None:
            self._build.cancel()
            self._build = None

    def search(self, query: np.ndarray, k: int) -> List[Tuple[int, float]]:
        """The ``k`` nearest live entries (fewer when the shard, or what an approximate index
        reaches, holds fewer), best first.

        faiss is asked for ``k`` plus some room for tombstones, not for every tombstone: a shard
        may hold a quarter of its size dead, and asking for all of them costs (1.7x the search at
        30k vectors, 7.5k dead) and exceeds what a GPU index selects (``GPU_MAX_K``). When the
        tombstones among the results leave fewer than ``k`` live ones, the search is repeated with
        twice the room; faiss's -1 ids (fewer neighbours than asked: a small shard, or an IVF's
        probed lists running out) end it.
        """
        self.poll()
        size = len(self.ids)
        if k <= 0 or size == 0:
            return []
        wanted = min(size, k + min(self.dead, max(k, 32)))
        while True:
            sims, positions = self._search(query, wanted)
            hits = []
            for pos, sim in zip(positions[0], sims[0]):
                if pos >= 0 and self.ids[pos] >= 0:
                    hits.append((self.ids[pos], float(sim)))
                    if len(hits) == k:
                        return hits
            if wanted >= size or not self.dead or (positions[0] < 0).any():
                return hits  # nothing more to find: every vector asked for, or all the index reaches
            wanted = min(size, 2 * wanted)

    def _search(self, query: np.ndarray, wanted: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.gpu_resources is not None and wanted > GPU_MAX_K:
            # Beyond what the GPU index selects: exact search over the CPU copy (rare: a shard
            # with thousands of tombstones among a query's nearest).
            return faiss.knn(query, self.vectors, wanted, faiss.METRIC_INNER_PRODUCT)
        return self.index.search(query, wanted)

    def stats(self) -> Dict[str, object]:
        out: Dict[str, object] = {"vectors": self.live, "search": "ivf" if self.ivf else
                                  ("hnsw" if self.kind == "hnsw" else "flat"),
                                  "building": self.building, "builds": self.builds,
                                  "last_build_s": self.last_build_s, "last_swap_s": self.last_swap_s}
        if self.ivf:
            out.update(self.ivf)
        if self.last_build_error:
            out["last_build_error"] = self.last_build_error
        return out


class EmbeddingIndex:
    """Inner-product search per namespace, with add and remove by id.

    Args:
        dim: Embedding width.
        kind: "auto" (exact below ``ivf_min`` vectors per shard, recall-checked IVF above),
            "flat" (exact), "ivf" or "hnsw" (approximate).
        use_gpu: Put flat and IVF shards on the GPU when faiss has one.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search breadth (recall vs latency).
        threads: faiss OpenMP threads for this process (``faiss.omp_set_num_threads``); 0 leaves
            faiss's default (one per core).
        ivf_min: Shard size where "auto"/"ivf" switch to IVF (default ``AUTO_IVF_MIN`` / ``IVF_MIN``).
        recall_target: recall@1 the recall check asks of a newly trained IVF (default ``RECALL_TARGET``).
        background_build: Train (and recall-check) a due IVF in a background thread while the shard
            keeps serving from its current index, and swap it in at the shard's next add, search or
            remove; False trains inside the ``add`` that makes it due (tests, benchmarks).
    """

    def __init__(self, dim: int, kind: str = "auto", use_gpu: bool = True, hnsw_m: int = 32, ef_search: int = 64,
                 threads: int = 0, ivf_min: Optional[int] = None, recall_target: Optional[float] = None,
                 background_build: bool = True):
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, not {kind!r}")
        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.dim, self.kind, self.threads = dim, kind, int(threads)
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.ivf_min, self.recall_target = ivf_min, recall_target
        self.background_build = bool(background_build)
        self.closed = False
        self.gpu_resources = faiss.StandardGpuResources() if use_gpu and kind != "hnsw" and gpu_count() else None
        self._shards: Dict[Hashable, _Shard] = {}
        self._namespace_of: Dict[int, Hashable] = {}

    @property
    def on_gpu(self) -> bool:
        return self.gpu_resources is not None

    def __len__(self) -> int:
        return len(self._namespace_of)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._namespace_of

    def namespaces(self) -> List[Hashable]:
        return list(self._shards)

    def vector(self, entry_id: int) -> np.ndarray:
        shard = self._shards[self._namespace_of[entry_id]]
        return shard.vectors[shard.position[entry_id]]

    def add(self, namespace: Hashable, entry_id: int, embedding: np.ndarray) -> None:
        self.add_many(namespace, [entry_id], np.asarray(embedding).reshape(1, -1))

    def add_many(self, namespace: Hashable, entry_ids: List[int], embeddings: np.ndarray,
                 sync_build: Optional[bool] = None) -> None:
        """Add many entries to one namespace at once (one faiss add, at most one IVF training).

        ``sync_build`` True: any IVF training this makes due (or one already running for the
        namespace) is done and swapped in before returning; None: the index's ``background_build``.
        """
        self._check_open()
        entry_ids = [int(e) for e in entry_ids]
        if any(e in self._namespace_of for e in entry_ids) or len(set(entry_ids)) != len(entry_ids):
            raise KeyError("an entry is already indexed")
        vectors = normalize(embeddings)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"embedding has width {vectors.shape[-1]}, index expects {self.dim}")
        if len(vectors) != len(entry_ids):
            raise ValueError(f"{len(entry_ids)} ids for {len(vectors)} embeddings")
        if not entry_ids:
            return
        shard = self._shards.get(namespace)
        if shard is None:
            shard = self._shards[namespace] = _Shard(self.dim, self.kind, self.gpu_resources, self.hnsw_m,
                                                     self.ef_search, self.ivf_min, self.recall_target,
                                                     self.background_build, self.threads)
        shard.add(entry_ids, vectors, sync_build)
        for entry_id in entry_ids:
            self._namespace_of[entry_id] = namespace

    def remove(self, entry_id: int) -> None:
        self._check_open()
        namespace = self._namespace_of.pop(entry_id)
        shard = self._shards[namespace]
        shard.remove(entry_id)
        if shard.live == 0:
            shard.cancel_build()  # a build still running for it is dropped when it ends
            del self._shards[namespace]

    def search(self, namespace: Hashable, embedding: np.ndarray, k: int = 4) -> List[Tuple[int, float]]:
        """The ``k`` nearest live entries of ``namespace`` as (entry_id, cosine similarity), best first;
        fewer when the namespace holds fewer (or an approximate index reaches fewer): any ``k``
        is valid, faiss's -1 ids for missing neighbours never come out."""
        self._check_open()
        shard: Optional[_Shard] = self._shards.get(namespace)
        if shard is None or shard.live == 0:
            return []
        return shard.search(normalize(embedding).reshape(1, -1), k)

    def shard_stats(self, namespace: Hashable) -> Optional[Dict[str, object]]:
        """How one namespace is searched: vectors, "flat"/"ivf"/"hnsw", whether an IVF build is
        running and how long the last one took (in its thread; and its swap), and for IVF its
        lists, training time and the recall check's nprobe and recall@1; None without a shard."""
        shard = self._shards.get(namespace)
        if shard is None:
            return None
        shard.poll()
        return shard.stats()

    def finish_builds(self, timeout: Optional[float] = None) -> bool:
        """Wait for every IVF build in flight and swap them in (on this thread); False if one is
        still running after ``timeout`` seconds."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        for shard in list(self._shards.values()):
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if not shard.finish_build(left):
                return False
        return True

    def close(self) -> None:
        """Drop every shard; builds still running finish on their own and their results are dropped.
        The index cannot be used afterwards."""
        for shard in self._shards.values():
            shard.cancel_build()
        self._shards.clear()
        self._namespace_of.clear()
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the index is closed")

    def stats(self) -> Dict[str, object]:
        """Kind, threads, threshold, shard counts, IVF builds (running; the last one's seconds),
        and every IVF shard's last recall check."""
        shards = list(self._shards.values())
        for shard in shards:
            shard.poll()
        ivf = [s for s in shards if s.ivf]
        last = max((s for s in shards if s.builds), key=lambda s: s.finished_at, default=None)
        return {"kind": self.kind, "threads": self.threads or faiss.omp_get_max_threads(),
                "ivf_min": ivf_threshold(self.kind, self.ivf_min), "background_build": self.background_build,
                "builds_running": sum(s.building for s in shards),
                "last_build_s": None if last is None else last.last_build_s,
                "shards": len(shards), "ivf_shards": len(ivf),
                "largest_shard": max((s.live for s in shards), default=0),
                "min_recall_at_1": min((s.ivf["recall_at_1"] for s in ivf), default=None),
                "max_nprobe": max((s.ivf["nprobe"] for s in ivf), default=None),
                "ivf": [s.stats() for s in sorted(ivf, key=lambda s: -s.live)[:8]]}

