"""Model configuration: the one place where config.pbtxt ``parameters`` are parsed.

Each Triton model of the pipeline has a dataclass here. Its fields are the
``parameters`` keys its config.pbtxt may set; anything not set keeps the
default below. Facts about the exported model itself (latent shape, scheduler
config) are not configuration: the export writes them to ``pipeline.json``
next to the model (see :class:`PipelineSpec`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Type, TypeVar

T = TypeVar("T")

PIPELINE_FILE = "pipeline.json"

# NIRVANA's similarity -> K thresholds at 50 steps, measured on CLIP text embeddings.
PAPER_THRESHOLDS = ((0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5))
# Most candidates one lookup weighs: a search asks faiss for lookup_k plus room for removed entries,
# and faiss's GPU indexes select at most 2,048 results per query.
MAX_LOOKUP_K = 1024
# The latent_cache's resume guard settings (nirvana.guard).
GUARDS = ("latent", "off")


class ConfigError(ValueError):
    """A config.pbtxt parameter or pipeline.json value is missing or malformed."""


def _parse_thresholds(text: str) -> Tuple[Tuple[float, int], ...]:
    """Parse ``"0.95:25,0.90:20"`` into ``((0.95, 25), (0.90, 20))``, highest first."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            sim, step = item.split(":")
            pairs.append((float(sim), int(step)))
        except ValueError as exc:
            raise ConfigError(f"bad threshold {item!r}; expected SIMILARITY:STEP") from exc
    return tuple(sorted(pairs, reverse=True))


def _convert(name: str, text: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
        if name == "thresholds":
            return _parse_thresholds(text)
        if origin is tuple:
            item_type = typing.get_args(annotation)[0]
            return tuple(item_type(v.strip()) for v in text.split(",") if v.strip())
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"parameter {name!r}: cannot parse {text!r} as {annotation}") from exc
    raise ConfigError(f"parameter {name!r}: unsupported type {annotation}")


def read_model_config(path: Path):
    """A config.pbtxt file as Triton's ``ModelConfig`` protobuf, parsed the way the server parses it.

    tritonclient (and protobuf) are imported here, not at module level: the nirvana package is
    also imported inside the Triton server container, which has no tritonclient.

    Raises:
        ConfigError: Naming the file, when it is not a valid model config.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: not a valid model config: {exc}") from exc


def read_pbtxt_parameters(path: Path) -> Dict[str, Any]:
    """The ``parameters`` of a config.pbtxt file, in the form Triton hands to a model.

    Tools outside Triton (the simulator, tests) use it to see what the server is configured with;
    the file is parsed as Triton's ``ModelConfig`` protobuf (:func:`read_model_config`), so any
    valid config.pbtxt layout reads the same as in the server.
    """
    config = read_model_config(path)
    return {"parameters": {key: {"string_value": value.string_value} for key, value in config.parameters.items()}}


def parse_parameters(cls: Type[T], model_config: Mapping[str, Any] | str) -> T:
    """Build ``cls`` from a Triton model config's ``parameters`` section.

    Args:
        cls: A dataclass whose fields name the accepted parameters.
        model_config: The model config as Triton hands it to a Python backend model
            (JSON text or the decoded dict).

    Returns:
        An instance of ``cls``; unset fields keep their defaults.

    Raises:
        ConfigError: On an unknown key or a value that does not parse.
    """
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    raw = model_config.get("parameters", {}) or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        text = value.get("string_value", "") if isinstance(value, Mapping) else str(value)
        if key not in fields:
            raise ConfigError(f"unknown parameter {key!r} for {cls.__name__}; known: {sorted(fields)}")
        values[key] = _convert(key, text, hints[key])
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config


@dataclasses.dataclass(frozen=True)
class RequestDefaults:
    """Defaults and limits of the per-request inputs (``tokenizer`` model, the pipeline's entry)."""

    default_steps: int = 50
    max_steps: int = 200
    default_guidance_scale: float = 7.5
    max_guidance_scale: float = 50.0
    max_prompt_bytes: int = 1 << 20
    max_timeout_ms: int = 3_600_000

    def validate(self) -> None:
        if not 1 <= self.default_steps <= self.max_steps:
            raise ConfigError("default_steps must be within 1..max_steps")
        if self.max_timeout_ms < 1:
            raise ConfigError("max_timeout_ms must be >= 1")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The ``latent_cache`` model: which states are kept and when they are reused.

    Thresholds map the cosine similarity of prompt embeddings to the step K to
    resume from, at ``base_steps`` denoising steps; both scale with a request's
    STEPS (see :func:`nirvana.steps.scale_steps`). Similarity scales differ between
    embedders, so empty ``thresholds`` means the exported model's own
    (``PipelineSpec.thresholds``: the paper's for CLIP, calibrated ones for the
    embedded all-MiniLM-L6-v2).
    """

    cache_steps: Tuple[int, ...] = (5, 10, 15, 20, 25)
    base_steps: int = 50
    thresholds: Tuple[Tuple[float, int], ...] = PAPER_THRESHOLDS
    eviction: str = "lcbfu"
    host_bytes: int = 1 << 30
    device_bytes: int = 0
    disk_bytes: int = 0
    disk_path: str = ""
    store_dtype: str = "float16"
    exact_hit: bool = True
    admit_on_hit: bool = True
    # Similarity index: "auto" = exact search below nirvana.cache.index.AUTO_IVF_MIN entries per
    # namespace, recall-checked IVF above; or "flat", "ivf", "hnsw" (see nirvana.cache.index).
    index: str = "auto"
    # faiss OpenMP threads in this process: 1, so the cache does not fight the UNet loop for the cores.
    index_threads: int = 1
    # How many nearest entries a lookup weighs (LatentCache.lookup): it resumes from the one whose
    # usable K (the largest step the entry holds that its similarity allows) is largest. 1: the
    # nearest entry only (the engine before this searched 4 and took the first holding a usable
    # state: the same answer as 4 here unless evictions left holes). 16: where steps saved stop
    # growing. nirvana-simulate, unbounded cache, first 20,000 requests of the SD Discord
    # W1-dream-2 log, thresholds 0.95:25,0.91:20,0.87:15,0.8:10,0.72:5, k = 1/2/4/8/16/32: hit
    # rate 39.4/45.2/48.6/50.3/50.8/51.0%, UNet steps saved 14.6/16.5/17.5/17.9/18.1/18.1% (paper
    # thresholds: 15.9/18.0/19.2/19.7/19.9/20.0%); the 2,000-prompt DiffusionDB sample saturates
    # at 8. Cost: a lookup at 4,900 entries takes 114/130/131/144/157 us (p50) at k = 1/4/8/16/32,
    # at 19,700 entries 1.1-1.3 ms for every k up to 64 (the exact search dominates; candidates
    # are a few us each).
    lookup_k: int = 16
    use_gpu: bool = True
    # Persistence (nirvana.cache.persistence): snapshots + a journal of every change under
    # snapshot_path ("" = off); a background compaction every snapshot_interval_s (< 0: only at
    # unload); appendfsync always | everysec | off, as Redis's (always: an acknowledged admission
    # survives kill -9; everysec: at most the last second is lost).
    snapshot_path: str = ""
    snapshot_interval_s: float = 60.0
    appendfsync: str = "everysec"
    # Benchmark only: fill the cache at load with this many synthetic entries (random clustered
    # embeddings, one 2-byte state each, searched but never served) in the namespace of tenant ""
    # at synthetic_steps STEPS (0: base_steps), to measure the cache's cost at a size
    # (LatentCache.fill_synthetic, perf/cache_cost.py). 0 in any real deployment.
    synthetic_entries: int = 0
    synthetic_steps: int = 0
    # Shared tier (nirvana.cache.shared): replicas share their states through Redis at redis_url
    # ("" = off; redis://host:port/db, rediss://, unix://; the password from the environment,
    # NIRVANA_REDIS_PASSWORD). Redis then is the durable store (run it with appendonly yes), so
    # snapshot_path must be empty. shared_bytes: the states Redis keeps, evicted by the same
    # policy over every replica's states (set Redis's maxmemory above it, policy noeviction).
    # shared_timeout_ms: the longest a request waits on Redis; past it (or with Redis down) the
    # replica serves from its local tiers and reconnects in the background. 100 ms: a loopback or
    # in-cluster fetch takes well under 1 ms, and one timeout per outage is what a request pays.
    # replica_id: this server in the events stream and the cross-replica stats ("": host:pid;
    # the pod name under Kubernetes).
    redis_url: str = ""
    shared_bytes: int = 4 << 30
    shared_prefix: str = "nirvana"
    shared_timeout_ms: int = 100
    replica_id: str = ""
    # Resume guard (nirvana.guard): "latent" checks every approximate hit in the step loop's first
    # UNet call and downgrades one whose new prompt moves the cached state too far; "off" serves
    # hits unchecked (the paper's design). false_hit_target: the share of served hits the operator
    # accepts losing an attribute the prompt names; the model's calibration for it supplies the
    # thresholds and the guard's bounds (a model calibrated for no target gets the conservative
    # defaults of nirvana.guard.CONSERVATIVE).
    guard: str = "latent"
    false_hit_target: float = 0.1

    def with_model_thresholds(self, spec: "PipelineSpec") -> "CacheConfig":
        """This config, with the model's thresholds where none are configured.

        A model's calibrated thresholds may resume past the configured cache steps
        (K = 30..40 of 50 for near-duplicates, where measured quality allows it); those
        steps are then kept too, or the thresholds could never be used.
        """
        if self.thresholds or not spec.thresholds:
            return self
        from nirvana.guard import calibration_for

        calibrated = calibration_for(spec, self) if self.guard != "off" else None
        table = calibrated.thresholds if calibrated is not None else spec.thresholds
        thresholds = tuple(sorted(((float(s), int(k)) for s, k in table), reverse=True))
        cache_steps = tuple(sorted(set(self.cache_steps) | {k for _, k in thresholds}))
        config = dataclasses.replace(self, thresholds=thresholds, cache_steps=cache_steps)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.cache_steps or any(k <= 0 or k >= self.base_steps for k in self.cache_steps):
            raise ConfigError("cache_steps must be within 1..base_steps-1")
        unknown = [k for _, k in self.thresholds if k not in self.cache_steps]
        if unknown:
            raise ConfigError(f"thresholds name steps {unknown} that are not in cache_steps")
        if self.eviction not in ("lcbfu", "lru", "lfu", "fifo"):
            raise ConfigError(f"eviction must be lcbfu, lru, lfu or fifo, not {self.eviction!r}")
        if self.index not in ("auto", "flat", "ivf", "hnsw"):
            raise ConfigError(f"index must be auto, flat, ivf or hnsw, not {self.index!r}")
        if not 1 <= self.lookup_k <= MAX_LOOKUP_K:
            raise ConfigError(f"lookup_k must be within 1..{MAX_LOOKUP_K} (1: the nearest entry only)")
        if self.index_threads < 0:
            raise ConfigError("index_threads must be >= 0 (0: faiss's default, one per core)")
        if self.synthetic_entries < 0 or self.synthetic_steps < 0:
            raise ConfigError("synthetic_entries and synthetic_steps must be >= 0")
        if self.synthetic_entries and self.snapshot_path:
            raise ConfigError("synthetic_entries (benchmark-only) cannot be combined with snapshot_path")
        if self.appendfsync not in ("always", "everysec", "off"):
            raise ConfigError(f"appendfsync must be always, everysec or off, not {self.appendfsync!r}")
        if self.store_dtype not in ("float16", "float32", "bfloat16"):
            raise ConfigError("store_dtype must be float16, bfloat16 or float32")
        if self.redis_url:
            if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(f"redis_url must start with redis://, rediss:// or unix://, not {self.redis_url!r}")
            if self.snapshot_path:
                raise ConfigError("redis_url and snapshot_path are exclusive: with the shared tier on, Redis "
                                  "(appendonly yes) is the durable store")
            if self.synthetic_entries:
                raise ConfigError("synthetic_entries (benchmark-only) cannot be combined with redis_url")
        if self.shared_bytes < 1 or self.shared_timeout_ms < 1:
            raise ConfigError("shared_bytes and shared_timeout_ms must be >= 1")
        if not self.shared_prefix.strip(":"):
            raise ConfigError("shared_prefix must not be empty")
        if self.guard not in GUARDS:
            raise ConfigError(f"guard must be one of {', '.join(GUARDS)}, not {self.guard!r}")
        if not 0.0 < self.false_hit_target < 1.0:
            raise ConfigError("false_hit_target must be within (0, 1), e.g. 0.02 for 2% of served hits")


BATCHING_MODES = ("step", "execute")


@dataclasses.dataclass(frozen=True)
class UNetLoopConfig:
    """The ``unet_loop`` model: scheduler, execution provider and how requests share UNet calls.

    Attributes:
        batching: "step" (default): one running batch per instance; a request joins at the next
            UNet call ("tick") and is answered as soon as its own steps are done (see
            :mod:`nirvana.step_engine`). "execute": the batch Triton hands to one ``execute`` runs
            to its longest member's last step while later requests queue (kept for comparison).
        max_active_rows: Most rows (images) denoised in one tick; the UNet batch is up to twice
            that with classifier-free guidance. Rows beyond it wait in the pending queue.
        max_pending_rows: Most rows waiting to join; past it a request is answered UNAVAILABLE.
        cancel_check_ticks: Ask Triton whether a held request was cancelled every this many ticks
            (each ask is a round trip to the server).
        stuck_tick_s: A tick running longer than this fails every held request (the engine is
            considered stuck) instead of letting clients hang; 0 turns the check off.
        default_timeout_ms: Deadline of requests that send no TIMEOUT_MS; 0 = none.
    """

    scheduler: str = "ddim"
    execution_provider: str = "auto"
    io_binding: bool = True
    intra_op_threads: int = 0
    batching: str = "step"
    max_active_rows: int = 8
    max_pending_rows: int = 64
    cancel_check_ticks: int = 4
    stuck_tick_s: float = 120.0
    default_timeout_ms: int = 0

    def validate(self) -> None:
        from nirvana.schedulers import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {sorted(SCHEDULERS)}, not {self.scheduler!r}")
        if self.execution_provider not in ("auto", "cpu", "cuda", "tensorrt"):
            raise ConfigError("execution_provider must be auto, cpu, cuda or tensorrt")
        if self.batching not in BATCHING_MODES:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {self.batching!r}")
        if self.max_active_rows < 1 or self.max_pending_rows < 0:
            raise ConfigError("max_active_rows must be >= 1 and max_pending_rows >= 0")
        if self.cancel_check_ticks < 1:
            raise ConfigError("cancel_check_ticks must be >= 1")
        if self.stuck_tick_s < 0 or self.default_timeout_ms < 0:
            raise ConfigError("stuck_tick_s and default_timeout_ms must be >= 0")


@dataclasses.dataclass(frozen=True)
class OnnxModelConfig:
    """A Python-backend model that runs one ONNX graph (text_encoder, vae_decoder on the CPU path).

    Attributes:
        memo_rows: Keep the outputs of this many most recently seen input rows and answer a
            repeated row from them (0: off). For the text encoder: the negative prompt is the
            same (usually empty) for most requests, and exact hits repeat their prompt, so half
            or more of its rows repeat; each kept row costs its outputs' size (~120 KB at 77x384).
    """

    execution_provider: str = "auto"
    intra_op_threads: int = 0
    memo_rows: int = 0

    def validate(self) -> None:
        if self.execution_provider not in ("auto", "cpu", "cuda", "tensorrt"):
            raise ConfigError("execution_provider must be auto, cpu, cuda or tensorrt")
        if self.memo_rows < 0:
            raise ConfigError("memo_rows must be >= 0")


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Facts about an exported model, written by the export next to each model.

    Attributes:
        model_id: Identifies the weights; part of the exact-hit key.
        latent_channels: UNet input channels.
        latent_height: Latent rows (image height / vae_scale_factor).
        latent_width: Latent columns.
        vae_scale_factor: Image pixels per latent pixel.
        embedding_dim: Width of the pooled prompt embedding (the cache key).
        hidden_dim: Width of the per-token hidden states that condition the UNet.
        max_length: Tokens per prompt.
        scheduler_config: The diffusers scheduler config of the checkpoint.
        thresholds: (similarity, K) pairs suited to this model's embedder, used when the
            latent_cache config sets none and the resume guard is off.
        guard: The resume guard's calibration for this model (see
            :func:`nirvana.guard.calibration_for`): per false-hit target, the thresholds and the
            guard's bounds; empty for an uncalibrated checkpoint.
    """

    model_id: str
    latent_channels: int
    latent_height: int
    latent_width: int
    vae_scale_factor: int
    embedding_dim: int
    hidden_dim: int
    max_length: int
    scheduler_config: dict = dataclasses.field(default_factory=dict)
    thresholds: list = dataclasses.field(default_factory=lambda: [list(p) for p in PAPER_THRESHOLDS])
    guard: dict = dataclasses.field(default_factory=dict)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return (self.latent_channels, self.latent_height, self.latent_width)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / PIPELINE_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory: Path) -> "PipelineSpec":
        path = Path(directory) / PIPELINE_FILE
        if not path.exists():
            raise ConfigError(f"{path} is missing: run the export first (make export)")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
