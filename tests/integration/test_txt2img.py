"""End to end through the txt2img ensemble, over gRPC and HTTP."""

import numpy as np
import pytest

from nirvana_client import Txt2ImgError

pytestmark = pytest.mark.integration

PROMPTS = {
    "grpc": ("a red bicycle leaning against a brick wall", "a bowl of ramen on a wooden table, food photo"),
    "http": ("an astronaut riding a horse on the moon", "a cozy library with tall bookshelves and a fireplace"),
}


def test_repeated_prompt_hits_and_unrelated_prompt_misses(client, served_start_step):
    prompt, unrelated = PROMPTS[client.protocol]
    first = client.generate(prompt, seed=11)
    assert first.cache_status == "miss" and first.start_step == 0
    assert first.admitted > 0
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8

    again = client.generate(prompt, seed=11)
    assert again.start_step > 0 and again.similarity >= 0.99
    assert again.cache_status == "exact" and again.start_step == again.steps
    np.testing.assert_array_equal(again.image, first.image)

    other_seed = client.generate(prompt, seed=12)
    assert other_seed.cache_status == "approximate"
    assert other_seed.start_step == served_start_step(1.0, 50) and other_seed.similarity >= 0.99
    assert other_seed.matched_prompt == prompt

    far = client.generate(unrelated, seed=11)
    assert far.start_step == 0 and far.cache_status == "miss"
    assert far.image.shape == (64, 64, 3) and far.image.dtype == np.uint8


def test_request_parameters_and_scaled_steps(client, served_start_step):
    prompt = {"grpc": "a lighthouse in a storm, oil painting", "http": "macro photo of a dewdrop on a leaf"}[
        client.protocol]
    first = client.generate(prompt, negative_prompt="blurry", seed=3, steps=20, guidance_scale=5.0)
    assert (first.steps, first.seed, first.start_step) == (20, 3, 0)
    second = client.generate(prompt, negative_prompt="blurry", seed=4, steps=20, guidance_scale=5.0)
    top_k = served_start_step(1.0, 50)
    assert second.start_step == round(top_k * 20 / 50) > 0  # the top K of 50, scaled to 20 steps


def test_server_picks_and_reports_a_seed(client):
    """SEED_USED is the seed the noise came from: a given SEED comes back unchanged (int64, not
    cut to 32 bits), and a server-picked one, sent back as SEED, reproduces the image. The cache is
    bypassed, so every image is denoised from its seed's noise, not served from a hit."""
    prompt = f"a quiet harbor at dawn ({client.protocol})"
    given = client.generate(prompt, seed=2**62 + 5, steps=4, cache=False)
    assert (given.seed, given.steps, given.cache_status) == (2**62 + 5, 4, "disabled")

    picked = client.generate(prompt, steps=4, cache=False)
    assert 0 <= picked.seed < 2**63 and picked.steps == 4
    assert client.generate(prompt, steps=1, cache=False).seed != picked.seed  # drawn, not a constant
    again = client.generate(prompt, seed=picked.seed, steps=4, cache=False)
    assert again.seed == picked.seed and again.cache_status == "disabled"
    np.testing.assert_array_equal(again.image, picked.image)
    other = client.generate(prompt, seed=picked.seed + 1, steps=4, cache=False)
    assert other.seed == picked.seed + 1
    assert not np.array_equal(other.image, picked.image)  # the seed decides the image


def test_missing_prompt_is_a_clear_error_and_the_server_keeps_serving(client):
    with pytest.raises(Txt2ImgError, match="PROMPT"):
        client.generate(None, seed=1)
    assert client.generate("a small red boat", seed=1, steps=2).image.shape == (64, 64, 3)


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "   "}, "PROMPT: is empty"),
    ({"prompt": "a cat", "steps": 0}, "STEPS: 0 is out of range"),
    ({"prompt": "a cat", "steps": 100000}, "STEPS: 100000 is out of range"),
    ({"prompt": "a cat", "guidance_scale": float("nan")}, "GUIDANCE_SCALE"),
    ({"prompt": "a cat", "seed": -1}, "SEED: -1 is out of range"),
])
def test_bad_values_are_rejected_naming_the_field(client, kwargs, field):
    with pytest.raises(Txt2ImgError, match=field):
        client.generate(**kwargs)
    assert client.generate("a small blue boat", seed=2, steps=2).image.dtype == np.uint8


def test_long_prompt_is_truncated_and_served(client):
    result = client.generate("a very long prompt " * 100, seed=1, steps=2)
    assert result.prompt_truncated
