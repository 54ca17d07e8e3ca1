"""Shared fixtures: the exported model repository and a tiny diffusers UNet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repository() -> Path:
    if not (REPOSITORY / ".exported").exists():
        pytest.fail("model_repository is not exported: run `make export` (make test does it)")
    return REPOSITORY


@pytest.fixture(scope="session")
def tiny_unet():
    """A small random diffusers UNet, as a noise-prediction function over torch tensors."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=8, norm_num_groups=32).eval()

    @torch.no_grad()
    def predict(sample, timestep, hidden):
        if next(unet.parameters()).device != sample.device:
            unet.to(sample.device)
        return unet(sample, timestep, hidden, return_dict=False)[0]

    return predict


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port with AOF (appendfsync always) in tmp_path."""
    from nirvana.redisserver import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
