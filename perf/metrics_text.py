"""Reading Triton's metrics port (Prometheus text) with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
from typing import Dict, List, Tuple

from prometheus_client.parser import text_string_to_metric_families

Samples = List[Tuple[str, Dict[str, str], float]]


def scrape(metrics_port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> Samples:
    """Every sample on the port: (sample name, labels, value)."""
    text = urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=timeout).read().decode()
    return [(s.name, dict(s.labels), float(s.value)) for family in text_string_to_metric_families(text)
            for s in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def by_label(samples: Samples, name: str, label: str) -> Dict[str, float]:
    """The samples called ``name``, keyed by the value of ``label`` (summed over the other labels)."""
    out: Dict[str, float] = {}
    for n, lab, v in samples:
        if n == name and label in lab:
            out[lab[label]] = out.get(lab[label], 0.0) + v
    return out
