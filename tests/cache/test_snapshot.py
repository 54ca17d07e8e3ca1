import json

import numpy as np
import torch

from nirvana.cache import CacheKey, LatentCache
from nirvana.config import CacheConfig


def filled_cache(n=6):
    cache = LatentCache(CacheConfig(), 8)
    rng = np.random.default_rng(0)
    vectors = []
    for i in range(n):
        v = rng.standard_normal(8).astype(np.float32)
        vectors.append(v)
        cache.admit(v, CacheKey(f"p{i}", "", i, 50, 7.5, tenant="t" if i % 2 else ""),
                    {k: torch.full((4, 2, 2), float(i * 100 + k)) for k in (5, 10, 25)},
                    final_latents=torch.full((4, 2, 2), float(-i)))
    return cache, vectors


def lookups(cache, vectors):
    out = []
    for i, v in enumerate(vectors):
        for seed in (i, 999):
            r = cache.lookup(v, CacheKey(f"p{i}", "", seed, 50, 7.5, tenant="t" if i % 2 else ""))
            out.append((r.status, r.start_step, None if r.latents is None else r.latents.float().sum().item()))
    return out


def test_restore_after_snapshot_returns_the_same_lookups(tmp_path):
    cache, vectors = filled_cache()
    cache.snapshot(tmp_path)
    restored = LatentCache(CacheConfig(), 8)
    report = restored.restore(tmp_path)
    assert report["entries"] == 6 and report["states"] == 24 and report["problems"] == []
    assert lookups(restored, vectors) == lookups(cache, vectors)


def test_corrupt_state_shard_is_reported_and_skipped(tmp_path):
    cache, vectors = filled_cache()
    folder = cache.snapshot(tmp_path)
    shard = next(folder.glob("states-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    restored = LatentCache(CacheConfig(), 8)
    report = restored.restore(tmp_path)
    assert any("states-" in p for p in report["problems"])
    assert report["states"] == 0 and len(restored) == 0
    assert all(r[0] == "miss" for r in lookups(restored, vectors))


def test_corrupt_metadata_falls_back_to_previous_snapshot(tmp_path):
    cache, vectors = filled_cache(2)
    cache.snapshot(tmp_path)
    more, more_vectors = filled_cache(4)
    newest = more.snapshot(tmp_path)
    entries = json.loads((newest / "entries.json").read_text())
    entries["entries"][0]["key"]["prompt"] = "tampered"
    (newest / "entries.json").write_text(json.dumps(entries))
    restored = LatentCache(CacheConfig(), 8)
    report = restored.restore(tmp_path)
    assert any("entries.json failed its checksum" in p for p in report["problems"])
    assert report["entries"] == 2
    assert lookups(restored, vectors) == lookups(cache, vectors)


def test_half_written_snapshot_is_never_loaded(tmp_path):
    cache, vectors = filled_cache(2)
    cache.snapshot(tmp_path)
    (tmp_path / "snap-99999999T999999-000000000.partial").mkdir()  # a crash mid-write
    restored = LatentCache(CacheConfig(), 8)
    assert restored.restore(tmp_path)["entries"] == 2


def test_no_snapshot_is_an_empty_cache(tmp_path):
    report = LatentCache(CacheConfig(), 8).restore(tmp_path / "absent")
    assert report["entries"] == 0 and report["snapshot"] is None


def test_keep_one_leaves_no_older_snapshot(tmp_path):
    cache, vectors = filled_cache()
    cache.snapshot(tmp_path)
    cache.snapshot(tmp_path)
    assert len([p for p in tmp_path.glob("snap-*")]) == 2
    cache.flush("t")
    cache.snapshot(tmp_path, keep=1)
    assert len([p for p in tmp_path.glob("snap-*")]) == 1
    restored = LatentCache(CacheConfig(), 8)
    assert restored.restore(tmp_path)["entries"] == 3
    assert restored.tenants() == [""]
