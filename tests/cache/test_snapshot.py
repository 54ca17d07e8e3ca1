"""Snapshots and the journal: what a restart brings back, and what it refuses to."""

import json
import threading

import numpy as np
import pytest
import torch

from nirvana.cache import CacheKey, LatentCache
from nirvana.cache import snapshot as snapshot_module
from nirvana.cache.journal import segments
from nirvana.cache.persistence import CachePersistence
from nirvana.config import CacheConfig

pytestmark = pytest.mark.timeout(60)


def key(i, tenant=None, seed=None):
    return CacheKey(f"p{i}", "", i if seed is None else seed, 50, 7.5, tenant="t" if (tenant is None and i % 2) else (tenant or ""))


def admit(cache, i, vectors):
    v = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    vectors.append(v)
    cache.admit(v, key(i), {k: torch.full((4, 2, 2), float(i * 100 + k)) for k in (5, 10, 25)},
                final_latents=torch.full((4, 2, 2), float(-i)))


def filled_cache(n=6, config=None):
    cache = LatentCache(config or CacheConfig(), 8)
    vectors = []
    for i in range(n):
        admit(cache, i, vectors)
    return cache, vectors


def persistence(cache, root, **kwargs):
    return CachePersistence(cache, root, threading.Lock(), interval_s=kwargs.pop("interval_s", -1), **kwargs)


def restored(root, config=None):
    cache = LatentCache(config or CacheConfig(), 8)
    report = persistence(cache, root).restore()
    return cache, report


def lookups(cache, vectors):
    out = []
    for i, v in enumerate(vectors):
        for seed in (i, 999):
            r = cache.lookup(v, key(i, seed=seed))
            out.append((r.status, r.start_step, None if r.latents is None else r.latents.float().sum().item()))
    return out


def test_restore_after_snapshot_returns_the_same_lookups(tmp_path):
    cache, vectors = filled_cache()
    persistence(cache, tmp_path).compact()
    again, report = restored(tmp_path)
    assert report["entries"] == 6 and report["states"] == 24 and report["problems"] == []
    assert lookups(again, vectors) == lookups(cache, vectors)


def test_corrupt_state_shard_among_several_loses_only_its_states(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot_module, "STATES_PER_SHARD", 4)  # 24 states: 6 shards
    cache, vectors = filled_cache()
    folder = persistence(cache, tmp_path).compact()
    shards = sorted(folder.glob("states-*.safetensors"))
    assert len(shards) == 6
    data = bytearray(shards[2].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[2].write_bytes(bytes(data))
    again, report = restored(tmp_path)
    assert [p for p in report["problems"] if "states-00002" in p]
    assert report["states"] == 20 == len(again.store)
    # Every state that came back is the one written.
    for record in again.export_entries():
        i = int(record.key.prompt[1:])
        for state in record.states:
            expected = -i if state.step == -1 else i * 100 + state.step
            assert torch.all(state.tensor.float() == expected)


def test_corrupt_metadata_falls_back_to_previous_snapshot(tmp_path):
    cache, vectors = filled_cache(2)
    persistence(cache, tmp_path).compact()
    more, _ = filled_cache(4)
    newest = persistence(more, tmp_path).compact()
    entries = json.loads((newest / "entries.json").read_text())
    entries["entries"][0]["key"]["prompt"] = "tampered"
    (newest / "entries.json").write_text(json.dumps(entries))
    again, report = restored(tmp_path)
    assert any("entries.json failed its checksum" in p for p in report["problems"])
    assert report["entries"] == 2
    assert lookups(again, vectors) == lookups(cache, vectors)


@pytest.mark.parametrize("damage", ["garbage", "names a missing snapshot", "empty"])
def test_an_unreadable_current_falls_back_to_the_snapshots_on_disk(tmp_path, damage):
    cache, vectors = filled_cache(3)
    persistence(cache, tmp_path).compact()
    current = tmp_path / "CURRENT"
    current.write_text({"garbage": "\x00\xff nonsense", "names a missing snapshot": "snap-1 abc\n",
                        "empty": ""}[damage])
    again, report = restored(tmp_path)
    assert report["entries"] == 3, report
    assert lookups(again, vectors) == lookups(cache, vectors)


def test_a_manifest_that_does_not_match_current_is_never_trusted(tmp_path):
    older, older_vectors = filled_cache(2)
    persistence(older, tmp_path).compact()
    newer, _ = filled_cache(4)
    folder = persistence(newer, tmp_path).compact()
    # A manifest rewritten after the fact (here: a shard's digest changed), still valid JSON.
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = next(name for name in manifest["files"] if name.startswith("states-"))
    manifest["files"][shard] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    again, report = restored(tmp_path)
    assert any("manifest.json does not match CURRENT" in p for p in report["problems"])
    assert report["entries"] == 2  # the previous snapshot, not the newest one without its states
    assert lookups(again, older_vectors) == lookups(older, older_vectors)


def test_unknown_format_is_refused_not_loaded(tmp_path):
    cache, _ = filled_cache(2)
    folder = persistence(cache, tmp_path).compact()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    (tmp_path / "CURRENT").write_text(f"{folder.name} \n")
    again, report = restored(tmp_path)
    assert any("format 99" in p for p in report["problems"])
    assert report["entries"] == 0 and len(again) == 0


def test_a_snapshot_written_before_the_resume_guard_is_migrated_with_a_note(tmp_path):
    """Format 2 states have no guidance direction: they load (exact hits unchanged), the restore
    report says so, and a guarded cache serves them only up to the unchecked K."""
    from nirvana.guard import GuardPolicy

    cache, vectors = filled_cache(2)
    folder = persistence(cache, tmp_path).compact()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    (tmp_path / "CURRENT").write_text(f"{folder.name} \n")
    guarded = LatentCache(CacheConfig(), 8, guard=GuardPolicy({10: 0.5, 25: 0.5}, unchecked_max_k=5))
    report = persistence(guarded, tmp_path).restore()
    assert any("format 2" in p and "migrated" in p for p in report["problems"])
    assert report["entries"] == 2
    assert guarded.lookup(vectors[0], key(0)).status == "exact"
    other_seed = guarded.lookup(vectors[0], key(0, seed=999))
    assert (other_seed.status, other_seed.start_step, other_seed.guard_bound) == ("approximate", 5, None)


def test_half_written_snapshot_is_never_loaded(tmp_path):
    cache, vectors = filled_cache(2)
    persistence(cache, tmp_path).compact()
    # A crash mid-write of a bigger snapshot: its folder holds real files but never got renamed.
    bigger, _ = filled_cache(5)
    complete = persistence(bigger, tmp_path / "elsewhere").compact()
    partial = tmp_path / "snap-99999999T999999-000000000.partial"
    partial.mkdir()
    for path in complete.iterdir():
        (partial / path.name).write_bytes(path.read_bytes())
    assert any(partial.iterdir())
    again, report = restored(tmp_path)
    assert report["entries"] == 2
    assert lookups(again, vectors) == lookups(cache, vectors)


def test_no_snapshot_is_an_empty_cache(tmp_path):
    _, report = restored(tmp_path / "absent")
    assert report["entries"] == 0 and report["snapshot"] is None and report["problems"] == []


def test_flush_compaction_leaves_no_older_snapshot_or_journal(tmp_path):
    cache, vectors = filled_cache()
    p = persistence(cache, tmp_path)
    p.start()
    p.compact()
    p.compact()
    assert len(list(tmp_path.glob("snap-*"))) == 2
    cache.flush("t")
    p.compact(keep=1)
    p.close()
    assert len(list(tmp_path.glob("snap-*"))) == 1
    again, report = restored(tmp_path)
    assert report["entries"] == 3 and again.tenants() == [""]


@pytest.mark.parametrize("appendfsync", ["always", "everysec", "off"])
def test_the_journal_brings_back_what_no_snapshot_holds(tmp_path, appendfsync):
    cache, vectors = filled_cache(2)
    p = persistence(cache, tmp_path, appendfsync=appendfsync)
    p.start()
    p.compact()
    for i in range(2, 5):
        admit(cache, i, vectors)
    cache.flush("t")  # the odd entries (1, 3) go, and so must they after a restart
    p.sync()
    p.close(final_snapshot=False)  # what a crash leaves: no final snapshot, only the journal
    again, report = restored(tmp_path)
    assert report["journal_records"] > 0 and report["problems"] == []
    assert lookups(again, vectors) == lookups(cache, vectors)
    assert sorted(r.key.prompt for r in again.export_entries()) == ["p0", "p2", "p4"]


def test_a_torn_journal_record_keeps_everything_before_it(tmp_path):
    cache, vectors = filled_cache(0)
    p = persistence(cache, tmp_path, appendfsync="always")
    p.start()
    for i in range(3):
        admit(cache, i, vectors)
    p.sync()
    p.close(final_snapshot=False)
    (_, path), = segments(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the last record half written (a kill mid-write)
    again, report = restored(tmp_path)
    assert any("torn" in problem for problem in report["problems"])
    prompts = sorted(r.key.prompt for r in again.export_entries())
    assert prompts[:2] == ["p0", "p1"]
    lost = [s for r in again.export_entries() if r.key.prompt == "p2" for s in r.states]
    assert len(lost) == 3  # p2 had 4 states; only its last record was torn


def test_restore_into_a_smaller_cache_keeps_the_best_states(tmp_path):
    cache, vectors = filled_cache(6)
    persistence(cache, tmp_path).compact()
    state_bytes = 4 * 2 * 2 * 2  # fp16 states; final latents are fp32 (twice as big)
    small = CacheConfig(host_bytes=8 * state_bytes, eviction="lcbfu")
    again, report = restored(tmp_path, small)
    assert report["problems"] == []
    assert report["states"] == len(again.store) and report["entries"] == len(again)
    assert report["dropped_by_budget"] > 0
    assert again.store.usage()["host"]["used_bytes"] <= 8 * state_bytes
    kept_steps = sorted(s.step for r in again.export_entries() for s in r.states)
    # LCBFU keeps the states that save the most steps (final latents count as all 50, then K=25).
    assert kept_steps and min(kept_steps) != 5


def test_restore_with_other_cache_steps_and_no_exact_hits(tmp_path):
    cache, vectors = filled_cache(3)
    persistence(cache, tmp_path).compact()
    again, report = restored(tmp_path, CacheConfig(cache_steps=(10, 20), thresholds=((0.9, 20), (0.7, 10)),
                                                   exact_hit=False))
    steps = sorted({s.step for r in again.export_entries() for s in r.states})
    assert steps == [10]
    assert report["dropped_other_steps"] == 9 and report["states"] == 3


def test_one_writer_per_directory(tmp_path):
    first = persistence(LatentCache(CacheConfig(), 8), tmp_path)
    second = persistence(LatentCache(CacheConfig(), 8), tmp_path)
    assert first.acquire(timeout_s=0)
    assert not second.acquire(timeout_s=0.3)  # the same directory, another live writer
    first.start()
    first.close()  # releases it
    assert second.acquire(timeout_s=0)
    second.close()


def test_compaction_racing_admissions_loses_nothing(tmp_path):
    """Admissions and evictions keep coming while snapshots are taken in the background: after a
    crash (no final snapshot) the restore equals the cache, state for state."""
    lock = threading.Lock()
    cache = LatentCache(CacheConfig(host_bytes=60 * 4 * 2 * 2 * 2), 8)  # small: evictions all along
    p = CachePersistence(cache, tmp_path, lock, appendfsync="everysec", interval_s=0)
    p.start()
    vectors = []
    for i in range(120):
        with lock:
            admit(cache, i, vectors)
        if i % 40 == 39:
            p.compact()  # also compacting from this thread, beside the background one
    with lock:
        expected = {(r.key.digest(), s.step): s.tensor.clone() for r in cache.export_entries() for s in r.states}
    p.sync()
    p.close(final_snapshot=False)  # a crash: the journal, no final snapshot
    again, report = restored(tmp_path)
    assert report["problems"] == [] and p.compactions >= 3
    got = {(r.key.digest(), s.step): s.tensor for r in again.export_entries() for s in r.states}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_a_failing_journal_stops_persistence_not_the_cache(tmp_path, monkeypatch):
    logged = []
    cache, vectors = filled_cache(1)
    p = CachePersistence(cache, tmp_path, threading.Lock(), appendfsync="always", interval_s=-1, log=logged.append)
    p.start()

    def broken(change):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nirvana.cache.journal.encode", broken)
    admit(cache, 1, vectors)  # the writer thread fails on this record
    p.sync()  # an admission's acknowledgement: must not raise
    admit(cache, 2, vectors)  # nor must later admissions
    assert p.failed and "No space left" in p.failed and len(logged) == 1
    assert cache.lookup(vectors[2], key(2)).status == "exact"  # the cache itself serves on
    p.close()


def test_a_restart_journals_past_the_segment_its_snapshot_starts_at(tmp_path):
    """A kill inside a compaction: the snapshot names journal segment 3, which was never created,
    and the older segments are gone. What the restarted cache journals must still come back."""
    cache, vectors = filled_cache(1)
    p = persistence(cache, tmp_path)
    p.start()
    p.compact()
    p.compact()  # the snapshot now starts at segment 3
    p.close(final_snapshot=False)
    for _, path in segments(tmp_path):
        path.unlink()  # as if the kill came before the writer opened segment 3
    again = LatentCache(CacheConfig(), 8)
    second = persistence(again, tmp_path, appendfsync="always")
    second.restore()
    second.start()
    admit(again, 1, vectors)
    second.sync()
    second.close(final_snapshot=False)
    third, report = restored(tmp_path)
    assert report["problems"] == [] and sorted(r.key.prompt for r in third.export_entries()) == ["p0", "p1"]
