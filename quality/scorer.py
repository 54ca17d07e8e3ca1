"""The attribute scorer: reads a 64x64 image's shape, colour, size, position, count, background, style.

A small CNN with one classification head per attribute of
:data:`nirvana_quality.shapes.ATTRIBUTES`, trained on *rendered* images only
(with blur, noise and colour jitter, so it reads decoded images too), never on
generated ones: it judges the generator without having learnt its mistakes.

- *Prompt adherence* of an image: the fraction of the attributes its caption
  names that the scorer reads back.
- *Features*: the penultimate layer (256-d), for an FID-style distance between
  image sets (:func:`nirvana_quality.metrics.frechet_distance`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nirvana_quality import shapes

FEATURE_DIM = 256


class AttributeScorer(nn.Module):
    """uint8-image classifier with one head per attribute; see the module docstring."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, stride=2), nn.BatchNorm2d(cout), nn.ReLU())
        # 64 -> 32 (one strided conv: cheap at full size) -> 16 -> 8 -> 4; flattened, not pooled,
        # so position and count stay readable.
        stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(stem, block(16, 32), block(32, 64), block(64, 96))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(96 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(values))
                                    for name, values in shapes.ATTRIBUTES.items()})

    @staticmethod
    def prepare(images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
        if images.ndim != 4 or images.shape[1:] != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3):
            raise ValueError(f"scorer reads uint8 [B, {shapes.IMAGE_SIZE}, {shapes.IMAGE_SIZE}, 3], "
                             f"not {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        features = self.embed(self.body(x))
        return features, {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 256) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Features [B, 256] and the predicted class index per attribute, for uint8 images."""
        self.eval()
        feats, preds = [], {name: [] for name in shapes.ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            f, logits = self(self.prepare(images[i:i + batch_size]))
            feats.append(f.numpy())
            for name, value in logits.items():
                preds[name].append(value.argmax(1).numpy())
        if not feats:
            return np.zeros((0, FEATURE_DIM), np.float32), {n: np.zeros(0, np.int64) for n in shapes.ATTRIBUTES}
        return np.concatenate(feats), {name: np.concatenate(v) for name, v in preds.items()}

    def adherence(self, images: np.ndarray, examples: Sequence[shapes.Example]) -> np.ndarray:
        """Per image: the fraction of its caption's attributes that the image shows."""
        _, preds = self.read(images)
        scores = []
        for i, example in enumerate(examples):
            labels = example.scene.labels()
            hits = [preds[name][i] == labels[name] for name in example.mentioned]
            scores.append(float(np.mean(hits)))
        return np.asarray(scores)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, contrast/brightness jitter and a 0-2 px shift: the ways a decoded image differs."""
    b, c, h, w = x.shape
    radius = 2
    sigma = (torch.rand(b, generator=generator) * 1.2).clamp(min=0.05)  # per image; ~0 = no blur
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [b*c, 5]
    flat = x.reshape(1, b * c, h, w)  # one depthwise conv blurs every image with its own sigma
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(b * c, 1, -1, 1), groups=b * c)
    blurred = flat.reshape(b, c, h, w)
    scale = 1.0 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.2
    noise = torch.randn(x.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    out = (blurred * scale + shift + noise).clamp(-1, 1)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(out, shifts=(dy, dx), dims=(2, 3))


def train_scorer(seed: int = 0, examples: int = 24_000, steps: int = 2_000, batch_size: int = 128,
                 lr: float = 2e-3, progress=None) -> Tuple[AttributeScorer, dict]:
    """Train on freshly rendered scenes (uniform attributes, every attribute labelled)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    scenes = [shapes.sample_scene(rng) for _ in range(examples)]
    images = torch.from_numpy(np.stack([shapes.render(s) for s in scenes])).permute(0, 3, 1, 2)
    labels = {name: torch.tensor([s.labels()[name] for s in scenes]) for name in shapes.ATTRIBUTES}
    model = AttributeScorer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, examples, (batch_size,), generator=generator)
        x = augment(images[idx].float() / 127.5 - 1.0, generator)
        _, logits = model(x)
        loss = sum(F.cross_entropy(logits[n], labels[n][idx]) for n in shapes.ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, float(loss.detach()))
    model.eval()
    return model, {"steps": steps, "examples": examples, "batch_size": batch_size, "lr": lr,
                   "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.perf_counter() - start, 1)}


def attribute_accuracy(model: AttributeScorer, images: np.ndarray, scenes: Sequence[shapes.Scene]) -> Dict[str, float]:
    """Per-attribute accuracy on images with known scenes."""
    _, preds = model.read(images)
    return {name: float(np.mean(preds[name] == np.array([s.labels()[name] for s in scenes])))
            for name in shapes.ATTRIBUTES}


def heldout_scenes(seed: int, count: int) -> List[shapes.Scene]:
    """Scenes the scorer never trained on (another random stream of the same seed)."""
    rng = np.random.default_rng([seed, 8])
    return [shapes.sample_scene(rng) for _ in range(count)]


def load_scorer(path: Path) -> AttributeScorer:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `make train`")
    model = AttributeScorer()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
