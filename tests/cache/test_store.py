import pytest
import torch

from nirvana.cache.store import DiskTier, LatentStore, MemoryTier


def t(value, n=64):
    return torch.full((n,), float(value))


def test_full_tier_demotes_lowest_score_to_next_tier(tmp_path):
    host = MemoryTier(2 * 64 * 2, torch.device("cpu"))
    disk = DiskTier(10_000, tmp_path)
    store = LatentStore([host, disk], torch.float16)
    assert store.put("a", t(1), (1,)) == []
    assert store.put("b", t(2), (3,)) == []
    assert store.put("c", t(3), (2,)) == []
    assert store.tier_name("a") == "disk"  # lowest score moved down, not lost
    assert {store.tier_name("b"), store.tier_name("c")} == {"host"}
    assert torch.all(store.get("a") == 1)
    assert host.used_bytes <= host.budget_bytes


def test_last_tier_drops(tmp_path):
    store = LatentStore([MemoryTier(64 * 2, torch.device("cpu"))], torch.float16)
    store.put("a", t(1), (1,))
    assert store.put("b", t(2), (2,)) == ["a"]
    assert store.get("a") is None


def test_corrupt_disk_state_is_never_served(tmp_path):
    store = LatentStore([DiskTier(10_000, tmp_path)], torch.float32)
    store.put("a", t(1), (1,))
    path = next(tmp_path.glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get("a") is None
    assert "a" not in store


def test_zero_budget_tiers_are_skipped(tmp_path):
    store = LatentStore([MemoryTier(0, torch.device("cpu")), MemoryTier(1000, torch.device("cpu"))])
    assert len(store.tiers) == 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_device_tier_holds_states_on_the_gpu_and_demotes_to_host():
    device = MemoryTier(2 * 64 * 2, torch.device("cuda"))
    host = MemoryTier(10_000, torch.device("cpu"))
    store = LatentStore([device, host], torch.float16)
    for key, score in (("a", 1), ("b", 3), ("c", 2)):
        store.put(key, t(score), (score,))
    assert store.get("b").is_cuda and store.get("c").is_cuda
    assert store.tier_name("a") == "host" and not store.get("a").is_cuda
    assert device.used_bytes <= device.budget_bytes
