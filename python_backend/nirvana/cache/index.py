"""Cosine-similarity index over L2-normalized prompt embeddings (faiss inner product).

Each namespace (tenant and step count) has its own index, so a search can never
return another namespace's entry. Entries come and go all the time; the CPU
``IndexIDMap2`` supports ``remove_ids`` and is the source of truth.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Tuple

import faiss
import numpy as np


def normalize(vector: np.ndarray) -> np.ndarray:
    """L2-normalize a 1-D or 2-D float array (rows), as float32."""
    vector = np.asarray(vector, dtype=np.float32)
    norms = np.linalg.norm(vector, axis=-1, keepdims=True)
    return vector / np.maximum(norms, 1e-12)


class EmbeddingIndex:
    """Exact inner-product search per namespace, with add and remove by id.

    Args:
        dim: Embedding width.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self._indexes: Dict[Hashable, faiss.IndexIDMap2] = {}
        self._namespace_of: Dict[int, Hashable] = {}

    def __len__(self) -> int:
        return len(self._namespace_of)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._namespace_of

    def add(self, namespace: Hashable, entry_id: int, embedding: np.ndarray) -> None:
        if entry_id in self._namespace_of:
            raise KeyError(f"entry {entry_id} is already indexed")
        vector = normalize(embedding).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise ValueError(f"embedding has width {vector.shape[1]}, index expects {self.dim}")
        index = self._indexes.get(namespace)
        if index is None:
            index = self._indexes[namespace] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        index.add_with_ids(vector, np.array([entry_id], dtype=np.int64))
        self._namespace_of[entry_id] = namespace

    def remove(self, entry_id: int) -> None:
        namespace = self._namespace_of.pop(entry_id)
        index = self._indexes[namespace]
        index.remove_ids(np.array([entry_id], dtype=np.int64))
        if index.ntotal == 0:
            del self._indexes[namespace]

    def search(self, namespace: Hashable, embedding: np.ndarray, k: int = 4) -> List[Tuple[int, float]]:
        """The ``k`` nearest entries of ``namespace`` as (entry_id, cosine similarity), best first."""
        index = self._indexes.get(namespace)
        if index is None or index.ntotal == 0:
            return []
        sims, ids = index.search(normalize(embedding).reshape(1, -1), min(k, index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], sims[0]) if i >= 0]
