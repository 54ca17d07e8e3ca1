"""Image-quality metrics for the cache's quality measurements, with numpy, scipy and torch only.

The quality harness compares images produced with cache resumption against the
no-cache images of the same prompts and seeds (PSNR, SSIM), compares image sets
(a Fréchet distance over any embedding's features: FID-style), measures prompt
adherence (CLIP score) and reports every mean with a confidence interval. The
formulas follow their references exactly so that numbers can be compared with
published ones; where a convention has to be chosen (SSIM on colour images,
PSNR of identical images), the docstring says which.

No metric downloads anything: :class:`ClipScorer` reads local CLIP weights only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import linalg, ndimage, stats

#: Peak value of the uint8 images every image metric takes.
PEAK = 255.0

# SSIM constants of Wang et al. 2004, section III.C.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# gaussian_filter's kernel radius is int(truncate * sigma + 0.5): 3.5 * 1.5 -> 5, an 11-tap window.
_SSIM_TRUNCATE = 3.5


def _image_pair(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Validate two uint8 image batches [B, H, W, 3] of the same shape; return them as float64."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {a.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype} and {b.dtype}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio of each image pair, in dB.

    ``PSNR = 10 log10(255^2 / MSE)`` with the MSE over all pixels and channels of
    one pair (reference: Huynh-Thu & Ghanbari, "Scope of validity of PSNR in
    image/video quality assessment", Electronics Letters 44(13), 2008).

    Identical images have MSE 0 and PSNR ``inf``: this is returned as is (not
    capped), so a mean over pairs is ``inf`` when any pair is identical; use
    :func:`numpy.isinf` to count exact reproductions separately.

    Args:
        a: uint8 images [B, H, W, 3].
        b: uint8 images of the same shape.

    Returns:
        float64 [B].
    """
    x, y = _image_pair(a, b)
    mse = np.mean((x - y) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(PEAK ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity of each image pair (Wang et al. 2004), the mean over the RGB channels.

    The standard SSIM of Wang, Bovik, Sheikh & Simoncelli, "Image quality
    assessment: from error visibility to structural similarity", IEEE TIP 13(4),
    2004: local means, variances and covariance under an 11-tap Gaussian window
    (sigma 1.5, normalized), ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``,

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

    averaged over the SSIM map. Choices, the same as scikit-image's
    ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)``:

    - colour: SSIM is computed on each of R, G, B separately and the three mean
      SSIMs averaged (not on luma), so colour shifts count;
    - borders: filtering reflects at the edges, then the 5 pixels nearest each
      edge are left out of the mean, so only windows that lie inside the image count;
    - moments are the Gaussian-weighted population ones (no N/(N-1) correction).

    Properties the tests check: identical images give exactly 1, the measure is
    symmetric, and added noise lowers it.

    Args:
        a: uint8 images [B, H, W, 3], at least 11 x 11 pixels.
        b: uint8 images of the same shape.

    Returns:
        float64 [B], in [-1, 1].
    """
    x, y = _image_pair(a, b)
    height, width = x.shape[1:3]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    # Filter over H and W only; batch and channel axes get sigma 0 (no mixing).
    sigma = (0.0, SSIM_SIGMA, SSIM_SIGMA, 0.0)

    def blur(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, sigma=sigma, truncate=_SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    pad = (SSIM_WINDOW - 1) // 2
    return ssim_map[:, pad:height - pad, pad:width - pad, :].mean(axis=(1, 2, 3))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Dowson &
    Landau 1982; as FID: Heusel et al., "GANs trained by a two time-scale update
    rule converge to a local Nash equilibrium", NeurIPS 2017). The numerics are
    pytorch-fid's ``calculate_frechet_distance``: when the matrix square root of
    ``S_a S_b`` is not finite (near-singular covariances, e.g. fewer samples than
    dimensions), ``eps * I`` is added to both covariances and it is recomputed;
    an imaginary part left by rounding is dropped when the diagonal's is below
    1e-3, and a larger one raises, since then the result would be meaningless.

    The features can come from any embedding: with Inception-v3 pool features
    this is FID; the project uses its own scorer's features ("FID-style"), whose
    values are comparable only with each other.

    Args:
        features_a: [N_a, D] (or [N_a] for D = 1), N_a >= 2.
        features_b: [N_b, D], N_b >= 2.
        eps: Diagonal offset for the near-singular fallback.

    Returns:
        The squared Fréchet distance (>= 0 up to rounding; 0 for identical sets).
    """
    mu_a, cov_a = _gaussian_fit(features_a, "features_a")
    mu_b, cov_b = _gaussian_fit(features_b, "features_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    diff = mu_a - mu_b
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"sqrt(S_a S_b) has an imaginary component of {largest:g}: "
                             "covariances too ill-conditioned")
        covmean = covmean.real
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def _gaussian_fit(features: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and sample covariance [D, D] of features [N, D] (or [N])."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def mean_confidence_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    """Sample mean and the half width of its Student-t confidence interval.

    ``half = t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (ddof 1): the interval for the mean of i.i.d. (approximately)
    normal values with unknown variance (e.g. Montgomery & Runger, "Applied
    Statistics and Probability for Engineers", section 8.2). The t quantile
    rather than 1.96 keeps small samples (a few prompts) honest.

    Args:
        values: At least 2 finite values.
        confidence: Two-sided level in (0, 1).

    Returns:
        (mean, half_width): the interval is mean +- half_width.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if x.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("values contain NaN or inf (e.g. PSNR of identical images): filter them first")
    sem = x.std(ddof=1) / np.sqrt(x.size)
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, x.size - 1) * sem)
    return float(x.mean()), half


def paired_difference_ci(a: Sequence[float], b: Sequence[float],
                         confidence: float = 0.95) -> Tuple[float, float]:
    """Mean of ``a - b`` over paired samples and the half width of its t interval.

    For measurements taken on the same items (the same prompts with and without
    the cache) the paired t interval on the differences (Student 1908; e.g.
    Montgomery & Runger section 10.4) removes the between-prompt variance that two
    independent intervals would carry, so a small quality change is resolved
    with far fewer prompts.

    Args:
        a: Values per item, e.g. CLIP score with the cache.
        b: Values for the same items in the same order, e.g. without the cache.
        confidence: Two-sided level in (0, 1).

    Returns:
        (mean difference, half_width).
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    return mean_confidence_interval(x - y, confidence)


class ClipScorer:
    """CLIP score of images against their prompts, from local CLIP weights.

    CLIP score (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric
    for Image Captioning", EMNLP 2021) is ``w * max(cos(E_image, E_text), 0)``;
    this uses ``w = 100`` like torchmetrics' ``CLIPScore`` and the text-to-image
    literature (the paper's own ``w = 2.5`` is 1/40 of it).

    Two kinds of weights, neither downloaded:

    - a transformers ``CLIPModel`` folder (``config.json``, weights, tokenizer files,
      ``preprocessor_config.json``), e.g. a local copy of openai/clip-vit-large-patch14;
    - an open_clip weights file, with ``open_clip_model`` naming its architecture
      (e.g. ``"ViT-B-32"``). This needs the ``open_clip_torch`` package; the tokenizer
      of the OpenAI-style architectures ships inside it, while architectures whose
      tokenizer lives on the Hugging Face hub cannot be used offline.

    Args:
        path: The CLIPModel folder, or the open_clip weights file.
        device: torch device for the model ("cpu", "cuda", ...).
        open_clip_model: open_clip architecture name; selects the open_clip backend.
        batch_size: Images (and prompts) per forward pass.
    """

    def __init__(self, path: Union[str, Path], device: str = "cpu", open_clip_model: Optional[str] = None,
                 batch_size: int = 32):
        import torch

        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if not self.path.exists():
            raise FileNotFoundError(f"CLIP weights not found: {self.path} (a transformers CLIPModel folder, "
                                    "or an open_clip weights file with open_clip_model=...)")
        if open_clip_model is not None:
            self.backend = "open_clip"
            self._load_open_clip(open_clip_model)
        else:
            self.backend = "transformers"
            self._load_transformers()

    def _load_transformers(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if not self.path.is_dir() or not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a transformers CLIPModel folder: no config.json "
                                    "(for an open_clip weights file pass open_clip_model=<architecture>)")
        config = json.loads((self.path / "config.json").read_text())
        if config.get("model_type") != "clip":
            raise ValueError(f"{self.path}/config.json has model_type {config.get('model_type')!r}, not 'clip'")
        kwargs = {"local_files_only": True}
        # float32 explicitly: transformers 5 would otherwise keep the dtype the weights were saved in.
        self.model = CLIPModel.from_pretrained(str(self.path), dtype=torch.float32, **kwargs).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), **kwargs)
        # AutoImageProcessor picks CLIPImageProcessor's torchvision or PIL backend, whichever is installed.
        self.image_processor = AutoImageProcessor.from_pretrained(str(self.path), **kwargs)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def _load_open_clip(self, architecture: str) -> None:
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError("ClipScorer(open_clip_model=...) needs the open_clip_torch package "
                              "(import open_clip), which is not installed; install it or pass a "
                              "transformers CLIPModel folder instead") from exc
        if not self.path.is_file():
            raise FileNotFoundError(f"open_clip weights must be a file, got {self.path}")
        model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=str(self.path),
                                                                     device=self.device)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(architecture)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """L2-normalized image embeddings [B, D] of uint8 images [B, H, W, 3]."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
        out: List[np.ndarray] = []
        with torch.no_grad():
            for begin in range(0, len(images), self.batch_size):
                chunk = images[begin:begin + self.batch_size]
                if self.backend == "transformers":
                    pixels = self.image_processor(images=list(chunk), input_data_format="channels_last",
                                                  return_tensors="pt")["pixel_values"]
                    vision = self.model.vision_model(pixel_values=pixels.to(self.device))
                    features = self.model.visual_projection(vision.pooler_output)
                else:
                    from PIL import Image

                    pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in chunk])
                    features = self.model.encode_image(pixels.to(self.device))
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalized text embeddings [B, D]; prompts longer than CLIP's context are truncated."""
        import torch

        out: List[np.ndarray] = []
        with torch.no_grad():
            for begin in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[begin:begin + self.batch_size])
                if self.backend == "transformers":
                    tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                            return_tensors="pt")
                    text = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                                 attention_mask=tokens["attention_mask"].to(self.device))
                    features = self.model.text_projection(text.pooler_output)
                else:
                    features = self.model.encode_text(self.tokenizer(chunk).to(self.device))
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """CLIP score ``100 * max(cos, 0)`` of each image with its prompt.

        Args:
            images: uint8 RGB [B, H, W, 3].
            prompts: B prompts, one per image.

        Returns:
            float64 [B] in [0, 100].
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cosine = np.sum(self.embed_images(images) * self.embed_texts(prompts), axis=-1).astype(np.float64)
        # The upper clip only removes float32 rounding of unit-vector dot products (cos <= 1).
        return 100.0 * np.clip(cosine, 0.0, 1.0)
