"""Prometheus metrics of the latent cache, through the Python backend's custom metrics API.

Triton serves them on its metrics port (8002) next to its own. ``pb_utils`` is
passed in by the model adapter, so this module imports nothing from Triton.
"""

from __future__ import annotations

from typing import Dict, Tuple

from nirvana.cache.engine import APPROXIMATE, DISABLED, EXACT, MISS
from nirvana.guard import DOWNGRADED, FALLBACK_REASONS, PASSED


class CacheMetrics:
    """Mirrors a :class:`nirvana.cache_step.CacheStep`'s counters into Triton metric families."""

    def __init__(self, pb_utils, model: str = "latent_cache"):
        family = pb_utils.MetricFamily
        self._labels = {"model": model}

        def make(name, text, kind):
            return family(name=name, description=text, kind=kind)

        self._counter = family.COUNTER
        self.families = {
            "lookups": make("nirvana_cache_lookups_total",
                            "Cache lookups by result (miss, approximate, exact, disabled)", family.COUNTER),
            "hits_by_k": make("nirvana_cache_approximate_hits_total", "Approximate hits by resumed step K",
                              family.COUNTER),
            "steps": make("nirvana_unet_steps_total", "UNet denoising steps, run or saved by the cache",
                          family.COUNTER),
            "admitted": make("nirvana_cache_admitted_states_total", "Noise states admitted", family.COUNTER),
            "evictions": make("nirvana_cache_evictions_total", "States pushed out of a tier (to the next, or "
                              "dropped from the last)", family.COUNTER),
            "flushed": make("nirvana_cache_flushed_states_total", "States dropped by admin flushes", family.COUNTER),
            "bytes": make("nirvana_cache_bytes", "Bytes held per store tier", family.GAUGE),
            "budget": make("nirvana_cache_budget_bytes", "Byte budget per store tier", family.GAUGE),
            "entries": make("nirvana_cache_entries", "Cached prompts (index entries)", family.GAUGE),
            "lookup_seconds": make("nirvana_cache_lookup_seconds_total", "Time spent in cache lookups",
                                   family.COUNTER),
            "coalesced": make("nirvana_cache_coalesced_total", "Requests answered with an identical in-flight "
                              "request's result (not admitted again)", family.COUNTER),
            "guard_checks": make("nirvana_guard_checks_total", "Approximate hits the resume guard checked, by "
                                 "outcome (passed, downgraded)", family.COUNTER),
            "guard_fallbacks": make("nirvana_guard_fallbacks_total", "Approximate hits the resume guard "
                                    "downgraded, by reason (divergence, unguided)", family.COUNTER),
            # The shared tier (Redis), when redis_url is set.
            "shared_up": make("nirvana_shared_tier_up", "1 while the shared tier (Redis) answers, 0 while this "
                              "replica serves from its local tiers alone", family.GAUGE),
            "shared_errors": make("nirvana_shared_tier_errors_total", "Shared tier calls that failed or timed out "
                                  "(each served without it)", family.COUNTER),
            "shared_reconnects": make("nirvana_shared_tier_reconnects_total", "Times the shared tier came back",
                                      family.COUNTER),
            "shared_fetches": make("nirvana_shared_tier_fetches_total", "States fetched from the shared tier by "
                                   "result (hit, gone: evicted or flushed meanwhile)", family.COUNTER),
            "shared_events": make("nirvana_shared_tier_events_applied_total", "Other replicas' admissions, "
                                  "evictions and flushes applied to this replica's index", family.COUNTER),
        }
        self._metrics: Dict[Tuple[str, Tuple], object] = {}
        self._published: Dict[Tuple[str, Tuple], float] = {}

    def _metric(self, family: str, **labels):
        key = (family, tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = self.families[family].Metric(labels={**self._labels, **labels})
        return key, self._metrics[key]

    def _count(self, family: str, total: float, **labels) -> None:
        key, metric = self._metric(family, **labels)
        delta = total - self._published.get(key, 0.0)
        if delta > 0:
            metric.increment(delta)
            self._published[key] = total

    def _set(self, family: str, value: float, **labels) -> None:
        self._metric(family, **labels)[1].set(value)

    def publish(self, step) -> None:
        """Bring every metric up to date with ``step`` (a CacheStep)."""
        counters = step.counters  # a nirvana.cache_step.CacheCounters
        for result in (MISS, APPROXIMATE, EXACT, DISABLED):
            self._count("lookups", counters.lookups.get(result, 0), result=result)
        for k, value in counters.approximate_hits_by_k.items():
            self._count("hits_by_k", value, k=str(k))
        self._count("steps", counters.steps_run, kind="run")
        self._count("steps", counters.steps_saved, kind="saved")
        self._count("lookup_seconds", counters.lookup_seconds)
        self._count("coalesced", counters.coalesced)
        for outcome in (PASSED, DOWNGRADED):
            self._count("guard_checks", counters.guard_checks.get(outcome, 0), outcome=outcome)
        for reason in FALLBACK_REASONS:
            self._count("guard_fallbacks", counters.guard_fallbacks.get(reason, 0), reason=reason)
        cache = step.cache
        self._count("admitted", cache.counters["admitted_states"])
        self._count("flushed", cache.counters["flushed_states"])
        for tier, count in cache.store.evictions.items():
            self._count("evictions", count, tier=tier)
        for tier, usage in cache.store.usage().items():
            self._set("bytes", usage["used_bytes"], tier=tier)
            self._set("budget", usage["budget_bytes"], tier=tier)
        self._set("entries", len(cache))
        if cache.shared is not None:
            shared = cache.shared.counters
            self._set("shared_up", 1.0 if cache.shared.available else 0.0)
            self._count("shared_errors", shared.errors)
            self._count("shared_reconnects", shared.reconnects)
            self._count("shared_fetches", shared.fetches - shared.fetch_misses, result="hit")
            self._count("shared_fetches", shared.fetch_misses, result="gone")
            self._count("shared_events", shared.events_applied)


class StepEngineMetrics:
    """The unet_loop step engine's counters and gauges as Triton metric families.

    Rows per tick is ``nirvana_unet_tick_rows_total / nirvana_unet_ticks_total`` over any window
    (Prometheus: a ratio of two ``rate()``s), tick time likewise with ``tick_seconds_total``.
    """

    COUNTERS = {
        "ticks": ("nirvana_unet_ticks_total", "UNet calls of the step engine (ticks)"),
        "tick_rows": ("nirvana_unet_tick_rows_total", "Rows denoised summed over ticks (divide by ticks: "
                                                      "active rows per tick)"),
        "tick_seconds": ("nirvana_unet_tick_seconds_total", "Time spent in ticks"),
    }
    # EngineStats field -> value of the "outcome" label of nirvana_unet_requests_total
    OUTCOMES = ("completed", "immediate", "rejected", "expired", "cancelled", "failed")

    def __init__(self, pb_utils, model: str = "unet_loop"):
        family = pb_utils.MetricFamily
        labels = {"model": model}
        self._counters = {}
        # Triton invalidates a Metric once its MetricFamily is garbage-collected: keep the families.
        self._families = []
        for field_name, (name, text) in self.COUNTERS.items():
            self._families.append(family(name=name, description=text, kind=family.COUNTER))
            self._counters[field_name] = self._families[-1].Metric(labels=labels)
        requests = family(name="nirvana_unet_requests_total", description="Requests held by the step engine by "
                          "outcome (immediate = answered without a tick, e.g. exact hits)", kind=family.COUNTER)
        for outcome in self.OUTCOMES:
            self._counters[outcome] = requests.Metric(labels={**labels, "outcome": outcome})
        coalesced = family(name="nirvana_unet_coalesced_rows_total", description="Rows computed once for identical "
                           "requests in flight (answered with the first one's result)", kind=family.COUNTER)
        self._counters["coalesced_rows"] = coalesced.Metric(labels=labels)
        rows = family(name="nirvana_unet_rows", description="Rows in the step engine by state", kind=family.GAUGE)
        self._families += [requests, coalesced, rows]
        self._gauges = {"active_rows": rows.Metric(labels={**labels, "state": "active"}),
                        "pending_rows": rows.Metric(labels={**labels, "state": "pending"})}
        self._published = {}

    def publish(self, engine) -> None:
        """Bring every metric up to date with ``engine.stats`` (a StepEngine)."""
        stats = engine.stats
        for field_name, metric in self._counters.items():
            total = float(getattr(stats, field_name))
            delta = total - self._published.get(field_name, 0.0)
            if delta > 0:
                metric.increment(delta)
                self._published[field_name] = total
        for field_name, metric in self._gauges.items():
            metric.set(float(getattr(stats, field_name)))
