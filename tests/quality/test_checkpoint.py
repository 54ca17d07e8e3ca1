"""CheckpointGenerator on a tiny random Stable Diffusion folder written by diffusers' own save_pretrained.

The central property: resuming from the no-cache run's own state after K steps,
with the same prompt, reproduces the no-cache image, while resuming from another
prompt's state gives another image. That is what makes serving a cached step-K
state sound, and what the quality harness then measures for similar prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nirvana_quality.checkpoint import CheckpointGenerator
from nirvana_quality.generators import initial_latents
from nirvana_quality.metrics import psnr, ssim
from tests.quality.test_metrics import write_tiny_clip_tokenizer

pytestmark = pytest.mark.timeout(300)

STEPS, K = 10, 4
PROMPTS = ["a cat", "a dog on a mat"]
SEEDS = [1, 2]


def _build_tiny_sd(folder: Path):
    """Random tiny SD components (SD 1.x architecture and scheduler config), saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nirvana_export.embedded import SD_SCHEDULER_CONFIG

    tokenizer = write_tiny_clip_tokenizer(folder.parent / "tiny-sd-tokenizer", model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=8, norm_num_groups=32).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, norm_num_groups=32).eval()
    scheduler = DDIMScheduler.from_config({k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(folder, the in-memory diffusers pipeline it was saved from)."""
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd-v1"
    return folder, _build_tiny_sd(folder)


@pytest.fixture(scope="module")
def generator(tiny_sd) -> CheckpointGenerator:
    return CheckpointGenerator(tiny_sd[0])


@pytest.fixture(scope="module")
def no_cache(generator):
    """The no-cache run of PROMPTS, keeping the state after K steps (what the cache would store)."""
    return generator.generate(PROMPTS, SEEDS, steps=STEPS, save_steps=(K,))


def test_loads_the_folder(generator, tiny_sd):
    assert generator.model_id == "tiny-sd-v1"
    assert generator.latent_shape == (4, 8, 8)
    assert generator.vae_scale_factor == 2
    assert generator.max_length == 77
    saved = json.loads((tiny_sd[0] / "scheduler" / "scheduler_config.json").read_text())
    assert generator.scheduler_config["beta_schedule"] == saved["beta_schedule"] == "scaled_linear"
    assert not any(k.startswith("_") for k in generator.scheduler_config)
    assert next(generator.unet_model.parameters()).dtype == torch.float32


def test_embed_returns_the_exported_cache_key_and_token_states(generator):
    from nirvana_export.onnx_export import ClipTextEncoder

    out = generator.embed(PROMPTS)
    assert out.pooled.shape == (2, 32) and out.pooled.dtype == np.float32
    assert out.hidden.shape == (2, 77, 32)
    np.testing.assert_allclose(np.linalg.norm(out.pooled, axis=1), 1.0, rtol=1e-5)
    # The same key nirvana-export bakes into the text_encoder ONNX model.
    tokens = generator.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden, pooled = ClipTextEncoder(generator.text_encoder)(tokens["input_ids"], tokens["attention_mask"])
    np.testing.assert_allclose(out.pooled, pooled.numpy(), atol=1e-6)
    torch.testing.assert_close(out.hidden, hidden)
    assert float(out.pooled[0] @ out.pooled[1]) < 0.9999  # different prompts, different keys


def test_generation_shapes_and_steps(no_cache):
    assert no_cache.images.dtype == np.uint8
    assert no_cache.images.shape == (2, 8 * 2, 8 * 2, 3)
    assert tuple(no_cache.latents.shape) == (2, 4, 8, 8)
    assert no_cache.steps_run == [STEPS, STEPS]
    assert all(set(c) == {K} and tuple(c[K].shape) == (4, 8, 8) for c in no_cache.checkpoints)


def test_same_seed_gives_identical_images(generator, no_cache):
    again = generator.generate(PROMPTS, SEEDS, steps=STEPS)
    np.testing.assert_array_equal(again.images, no_cache.images)
    other_seed = generator.generate(PROMPTS[:1], [99], steps=STEPS)
    assert not np.array_equal(other_seed.images[0], no_cache.images[0])


def test_matches_the_diffusers_pipeline(tiny_sd, no_cache):
    """The server's step loop with this generator's networks is Stable Diffusion's own sampling."""
    pipeline = tiny_sd[1]
    latents = initial_latents(SEEDS[0], (4, 8, 8))[None]
    with torch.no_grad():
        reference = pipeline(PROMPTS[0], latents=latents, num_inference_steps=STEPS, guidance_scale=7.5,
                             output_type="np").images[0]
    reference = np.round(reference * 255).astype(np.int16)
    assert np.abs(reference - no_cache.images[0].astype(np.int16)).max() <= 1


def test_resuming_from_the_own_state_reproduces_the_no_cache_image(generator, no_cache):
    own = [c[K] for c in no_cache.checkpoints]
    resumed = generator.generate(PROMPTS, SEEDS, steps=STEPS, start_step=K, start_latents=own)
    assert resumed.steps_run == [STEPS - K, STEPS - K]
    assert np.all(psnr(resumed.images, no_cache.images) > 40)
    assert np.all(ssim(resumed.images, no_cache.images) > 0.99)
    torch.testing.assert_close(resumed.latents, no_cache.latents, atol=1e-4, rtol=1e-4)


def test_resuming_from_another_prompts_state_gives_another_image(generator, no_cache):
    swapped = [no_cache.checkpoints[1][K], no_cache.checkpoints[0][K]]
    resumed = generator.generate(PROMPTS, SEEDS, steps=STEPS, start_step=K, start_latents=swapped)
    assert resumed.steps_run == [STEPS - K, STEPS - K]
    assert np.all(psnr(resumed.images, no_cache.images) < 30)
    assert np.all(ssim(resumed.images, no_cache.images) < 0.9)


def test_missing_subfolder_is_a_clear_error(tiny_sd, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_sd[0], incomplete)
    shutil.rmtree(incomplete / "unet")
    with pytest.raises(FileNotFoundError, match=r"missing unet\b"):
        CheckpointGenerator(incomplete)
    (incomplete / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing unet, scheduler/scheduler_config.json"):
        CheckpointGenerator(incomplete)
    with pytest.raises(FileNotFoundError, match="not found"):
        CheckpointGenerator(tmp_path / "no-such-checkpoint")
