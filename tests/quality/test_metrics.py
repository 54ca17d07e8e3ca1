"""Behaviour of the quality metrics: closed forms, invariants and the CLIP scorer on a tiny local model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from nirvana_quality.metrics import (ClipScorer, frechet_distance, mean_confidence_interval, paired_difference_ci,
                                     psnr, ssim)

pytestmark = pytest.mark.timeout(300)


def _images(seed: int, shape=(3, 32, 40, 3)) -> np.ndarray:
    """Smooth random uint8 images (structure for SSIM to see), values away from 0 and 255."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[1], 0:shape[2]]
    phase = rng.uniform(0, 2 * np.pi, size=(shape[0], 1, 1, 3))
    base = 128 + 80 * np.sin(x[None, :, :, None] / 5.0 + phase) * np.cos(y[None, :, :, None] / 7.0)
    return np.clip(base, 20, 235).astype(np.uint8)


def _noisy(images: np.ndarray, std: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, std, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


# --- PSNR ---

def test_psnr_of_identical_images_is_inf():
    a = _images(0)
    assert np.all(np.isinf(psnr(a, a)))


def test_psnr_of_a_constant_offset_is_the_closed_form():
    a = _images(0)
    b = a + np.uint8(10)  # values <= 235: no wrap-around
    np.testing.assert_allclose(psnr(a, b), 20 * np.log10(255 / 10), rtol=1e-12)
    np.testing.assert_allclose(psnr(b, a), psnr(a, b))


def test_psnr_is_per_pair_and_falls_with_noise():
    a = _images(0)
    values = [psnr(a, _noisy(a, std)) for std in (2, 8, 32)]
    assert all(v.shape == (3,) for v in values)
    assert np.all(values[0] > values[1]) and np.all(values[1] > values[2])


def test_psnr_rejects_non_uint8_and_mismatched_shapes():
    a = _images(0)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:2])


# --- SSIM ---

def test_ssim_of_identical_images_is_one():
    a = _images(0)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)


def test_ssim_is_symmetric():
    a, b = _images(0), _images(5)
    np.testing.assert_allclose(ssim(a, b), ssim(b, a), rtol=1e-12)


def test_ssim_decreases_with_noise():
    a = _images(0)
    values = [ssim(a, _noisy(a, std)) for std in (2, 8, 32)]
    assert np.all(values[0] < 1.0)
    assert np.all(values[0] > values[1]) and np.all(values[1] > values[2])


def test_ssim_of_constant_images_is_the_luminance_term():
    """Flat images have zero (co)variance, so SSIM reduces to (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)."""
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1)
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-9)


def _ssim_valid_window(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s reference (ssim_index.m): 11x11 Gaussian window, 'valid' filtering, per channel."""
    from scipy.signal import correlate2d

    grid = np.arange(11) - 5
    window = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 1.5 ** 2))
    window /= window.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    means = []
    for channel in range(3):
        x, y = a[..., channel].astype(np.float64), b[..., channel].astype(np.float64)

        def f(z):
            return correlate2d(z, window, mode="valid")

        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        means.append(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))))
    return float(np.mean(means))


def test_ssim_matches_the_valid_window_reference():
    a, b = _images(0, (2, 24, 30, 3)), _noisy(_images(0, (2, 24, 30, 3)), 12)
    ours = ssim(a, b)
    for i in range(2):
        assert ours[i] == pytest.approx(_ssim_valid_window(a[i], b[i]), rel=1e-10)


def test_ssim_averages_channels():
    """Changing one channel of three counts a third as much as changing all three."""
    a = _images(0)
    noisy = _noisy(a, 16)
    one = a.copy()
    one[..., 1] = noisy[..., 1]
    np.testing.assert_allclose(1 - ssim(a, one), (1 - ssim(a, noisy)) / 3, rtol=0.25)


def test_ssim_needs_the_window_to_fit():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a, a)


# --- Fréchet distance ---

def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_grows_with_a_mean_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(500, 8))
    distances = [frechet_distance(a, b + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances[0] > 0
    assert all(x < y for x, y in zip(distances, distances[1:]))
    # The mean term is ||shift * 1||^2 = 8 shift^2 on top of the same covariance term.
    assert distances[3] - distances[0] == pytest.approx(8 * 4.0, rel=0.05)


def test_frechet_distance_of_1d_gaussians_is_the_closed_form():
    """For 1-D Gaussians d^2 = (mu1 - mu2)^2 + (s1 - s2)^2."""
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 2.0, size=200_000)
    b = rng.normal(3.0, 0.5, size=200_000)
    # Exact on the samples' own moments...
    exact = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(exact, rel=1e-9)
    # ...and close to the distribution parameters' value.
    assert frechet_distance(a, b) == pytest.approx((1 - 3) ** 2 + (2 - 0.5) ** 2, rel=0.02)


def test_frechet_distance_of_diagonal_gaussians_sums_over_dimensions():
    rng = np.random.default_rng(1)
    scale_a, scale_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = rng.normal(0, scale_a, size=(100_000, 3))
    b = rng.normal([1.0, 0.0, -1.0], scale_b, size=(100_000, 3))
    expected = 1 + 1 + np.sum((scale_a - scale_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_with_fewer_samples_than_dimensions_stays_finite():
    """Singular covariances: the pytorch-fid eps fallback keeps the value finite and real."""
    rng = np.random.default_rng(0)
    value = frechet_distance(rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1.0)
    assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_bad_input():
    x = np.zeros((5, 4))
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)


# --- confidence intervals ---

def test_mean_confidence_interval_matches_the_t_formula():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = mean_confidence_interval(values, 0.95)
    assert mean == pytest.approx(2.5)
    # t_{0.975, 3} = 3.182446; s = sqrt(5/3).
    assert half == pytest.approx(3.182446 * np.sqrt(5 / 3) / 2, rel=1e-5)


def test_confidence_interval_shrinks_with_n_and_widens_with_confidence():
    values = np.random.default_rng(0).normal(10, 2, size=4000)
    halves = [mean_confidence_interval(values[:n])[1] for n in (10, 100, 1000, 4000)]
    assert all(x > y for x, y in zip(halves, halves[1:]))
    assert mean_confidence_interval(values[:100], 0.99)[1] > mean_confidence_interval(values[:100], 0.9)[1]


def test_confidence_interval_covers_the_true_mean_at_about_its_level():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        mean, half = mean_confidence_interval(rng.normal(5.0, 3.0, size=8), 0.9)
        covered += abs(mean - 5.0) <= half
    assert 0.85 <= covered / 400 <= 0.95


def test_paired_difference_ci_removes_the_between_item_variance():
    rng = np.random.default_rng(0)
    item = rng.normal(0, 10, size=50)  # large spread between prompts
    a = item + 0.5 + rng.normal(0, 0.1, size=50)
    b = item + rng.normal(0, 0.1, size=50)
    diff, half = paired_difference_ci(a, b)
    assert diff == pytest.approx(0.5, abs=0.05)
    assert half < 0.1 < mean_confidence_interval(a)[1]


def test_confidence_intervals_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        mean_confidence_interval([1.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        mean_confidence_interval([1.0, np.inf])
    with pytest.raises(ValueError, match="length"):
        paired_difference_ci([1.0, 2.0], [1.0, 2.0, 3.0])


# --- CLIP score ---

def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tiny_clip_tokenizer(folder: Path, model_max_length: int = 77):
    """A CLIPTokenizer over the 256 byte symbols (with and without </w>) and a few merges, saved to folder."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = ["a t</w>", "c at</w>", "d o", "do g</w>"]
    for token in ("at</w>", "cat</w>", "do", "dog</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    source = folder / "bpe"
    source.mkdir(exist_ok=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(source), local_files_only=True, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialized CLIPModel with its tokenizer and image processor, saved like a hub folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = write_tiny_clip_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder))
    return folder


def test_clip_score_is_in_range_and_deterministic(tiny_clip):
    images = np.concatenate([_images(0, (3, 48, 64, 3)), _noisy(_images(1, (2, 48, 64, 3)), 40)])
    prompts = ["a cat", "a dog", "a red cat on a mat", "", "dog dog dog"]
    scorer = ClipScorer(tiny_clip)
    first = scorer.score(images, prompts)
    assert first.shape == (5,) and first.dtype == np.float64
    assert np.all((first >= 0) & (first <= 100))
    np.testing.assert_array_equal(first, scorer.score(images, prompts))
    # A second load of the same folder, with another batching, gives the same scores.
    np.testing.assert_allclose(ClipScorer(tiny_clip, batch_size=2).score(images, prompts), first, atol=1e-4)


def test_clip_score_is_the_clipped_cosine_of_unit_embeddings(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    images, prompts = _images(2, (4, 40, 40, 3)), ["a cat", "a dog", "cat dog", "a mat"]
    image_emb, text_emb = scorer.embed_images(images), scorer.embed_texts(prompts)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)
    expected = 100 * np.clip(np.sum(image_emb * text_emb, axis=1), 0, 1)
    np.testing.assert_allclose(scorer.score(images, prompts), expected, rtol=1e-6)
    # CLIP image features are valid input for the Fréchet distance.
    assert frechet_distance(image_emb, image_emb) == pytest.approx(0.0, abs=1e-6)


def test_clip_scorer_rejects_mismatched_inputs(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(_images(0), ["one prompt"])
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(_images(0).astype(np.float32), ["a", "b", "c"])


def test_clip_scorer_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        ClipScorer(tmp_path / "no-such-clip")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScorer(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_clip_scorer_open_clip_without_the_package_names_it(tmp_path):
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ImportError, match="open_clip_torch"):
        ClipScorer(weights, open_clip_model="ViT-B-32")
