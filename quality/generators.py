"""Image generators the quality harness measures, all denoising through the server's step loop.

A :class:`Generator` embeds prompts, runs :class:`nirvana.unet_loop.StepRangeLoop`
(the same loop, schedulers and resume-from-step-K logic the ``unet_loop`` model
serves) and decodes latents. Two kinds exist:

- :class:`RepositoryGenerator`: the exported ONNX files of a model repository
  (the embedded model by default), run with onnxruntime like the server does;
- ``nirvana_quality.checkpoint.CheckpointGenerator``: a diffusers Stable Diffusion
  folder run with torch.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from nirvana.guard import GuardVerdict, ResumeCheck
from nirvana.unet_loop import DenoiseJob, DenoiseResult, StepRangeLoop


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs for a batch of prompts.

    Attributes:
        pooled: Normalized pooled embeddings [B, D] (the cache key; cosine = dot product).
        hidden: Token hidden states [B, L, H] that condition the UNet.
    """

    pooled: np.ndarray
    hidden: torch.Tensor


@dataclass
class Generation:
    """Images and the states taken on the way.

    Attributes:
        images: uint8 RGB [B, H, W, 3].
        latents: Final latents [B, C, h, w].
        checkpoints: One dict per image: step -> latents [C, h, w] after that step.
        steps_run: UNet steps each image ran.
        directions: One dict per image: step -> guidance direction at that checkpoint (the resume
            guard's reference, see :mod:`nirvana.guard`).
        verdicts: Per image, what the resume guard decided (outcome "" without a check).
        first_directions: Per image, the guidance direction of its first UNet call (None unguided).
        unconds: One dict per image: step -> unconditional prediction at that checkpoint.
    """

    images: np.ndarray
    latents: torch.Tensor
    checkpoints: List[Dict[int, torch.Tensor]]
    steps_run: List[int]
    directions: List[Dict[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    verdicts: List[GuardVerdict] = dataclasses.field(default_factory=list)
    first_directions: List[Optional[torch.Tensor]] = dataclasses.field(default_factory=list)
    unconds: List[Dict[int, torch.Tensor]] = dataclasses.field(default_factory=list)


def initial_latents(seed: int, latent_shape: Tuple[int, int, int]) -> torch.Tensor:
    """Starting noise for a seed, exactly as the latent_cache model draws it for a miss."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(latent_shape, generator=generator, dtype=torch.float32)


class Generator(abc.ABC):
    """Text -> image through :class:`StepRangeLoop`; subclasses supply the three networks.

    Attributes:
        model_id: Names the weights in reports.
        latent_shape: (C, h, w) of the UNet's latents.
        scheduler_name: A key of :data:`nirvana.schedulers.SCHEDULERS`.
        scheduler_config: The checkpoint's diffusers scheduler config.
    """

    model_id: str
    latent_shape: Tuple[int, int, int]
    scheduler_name: str = "ddim"
    scheduler_config: Mapping = {}

    @abc.abstractmethod
    def embed(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Pooled embeddings and token states for ``prompts``."""

    @abc.abstractmethod
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Noise prediction for a batch (see :data:`nirvana.unet_loop.UNetFn`)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, h, w] -> uint8 RGB images [B, H, W, 3]."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50,
                 guidance_scale: float = 7.5, start_step: Union[int, Sequence[int]] = 0,
                 start_latents: Optional[Sequence[torch.Tensor]] = None,
                 save_steps: Sequence[int] = (), batch_size: int = 16, desc: Optional[str] = None,
                 checks: Optional[Sequence[Optional[ResumeCheck]]] = None) -> Generation:
        """Generate one image per prompt.

        Args:
            prompts: Target prompts.
            seeds: Noise seed per prompt (used when ``start_step`` is 0).
            steps: Denoising steps N.
            guidance_scale: Classifier-free guidance (the empty prompt is the unconditional branch).
            start_step: K: resume from ``start_latents`` after K steps (0: from noise); one
                for all prompts or one per prompt.
            start_latents: One cached state [C, h, w] per prompt where the start step is > 0.
            save_steps: Steps whose latents are returned in :attr:`Generation.checkpoints`.
            batch_size: Prompts per loop batch.
            desc: Progress-bar label (None: no bar).
            checks: Per prompt, the resume guard's latent check for a resumed start (None: none),
                as the served loop runs it.
        """
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds differ in length")
        starts = [int(start_step)] * len(prompts) if isinstance(start_step, int) else [int(k) for k in start_step]
        if len(starts) != len(prompts):
            raise ValueError("start_step: one per prompt")
        if any(starts) and (start_latents is None or len(start_latents) != len(prompts)):
            raise ValueError("a start step > 0 needs one start latent per prompt")
        negative = self.embed([""]).hidden[0]
        loop = StepRangeLoop(self.unet, self.scheduler_name, self.scheduler_config)
        results: List[DenoiseResult] = []
        bar = tqdm(total=len(prompts), desc=desc, unit="image", file=sys.stderr, disable=desc is None)
        for begin in range(0, len(prompts), batch_size):
            chunk = list(prompts[begin:begin + batch_size])
            hidden = self.embed(chunk).hidden
            jobs = []
            for i, _ in enumerate(chunk):
                index = begin + i
                latents = (start_latents[index] if starts[index] else
                           initial_latents(seeds[index], self.latent_shape))
                jobs.append(DenoiseJob(latents=latents, prompt_embeds=hidden[i], negative_embeds=negative,
                                       start_step=starts[index], steps=steps, guidance_scale=guidance_scale,
                                       save_steps=tuple(save_steps),
                                       check=checks[index] if checks is not None else None))
            results.extend(loop.run(jobs))
            bar.update(len(chunk))
        bar.close()
        latents = torch.stack([r.latents for r in results])
        images = np.concatenate([self.decode(latents[i:i + batch_size])
                                 for i in range(0, len(results), batch_size)])
        return Generation(images=images, latents=latents, checkpoints=[dict(r.checkpoints) for r in results],
                          steps_run=[r.steps_run for r in results], directions=[dict(r.directions) for r in results],
                          verdicts=[r.verdict for r in results],
                          first_directions=[r.first_direction for r in results],
                          unconds=[dict(r.unconds) for r in results])


class RepositoryGenerator(Generator):
    """The ONNX models of an exported model repository, run like the server runs them.

    Args:
        repository: A model repository filled by ``nirvana-export``.
        scheduler: Step-loop scheduler (the unet_loop model's default is ddim).
        threads: onnxruntime intra-op threads (0: one per core).
    """

    def __init__(self, repository: Path, scheduler: str = "ddim", threads: int = 0):
        from nirvana.config import PipelineSpec
        from nirvana.onnx_session import OnnxModel
        from nirvana.text import PromptTokenizer

        repository = Path(repository)
        self.spec = PipelineSpec.load(repository / "unet_loop" / "1")
        self.model_id = self.spec.model_id
        self.latent_shape = self.spec.latent_shape
        self.scheduler_name = scheduler
        self.scheduler_config = dict(self.spec.scheduler_config)
        self.tokenizer = PromptTokenizer(repository / "tokenizer" / "1" / "tokenizer", self.spec.max_length)
        self.text_encoder = OnnxModel(repository / "text_encoder" / "1" / "model.onnx", "cpu", threads)
        self.unet_model = OnnxModel(repository / "unet_loop" / "1" / "unet.onnx", "cpu", threads)
        self.vae = OnnxModel(repository / "vae_decoder" / "1" / "model.onnx", "cpu", threads)
        self._memo: Dict[str, Tuple[np.ndarray, torch.Tensor]] = {}

    def embed(self, prompts: Sequence[str]) -> PromptEmbeddings:
        missing = sorted({p for p in prompts if p not in self._memo})
        if missing:
            tokens = self.tokenizer(missing)
            out = self.text_encoder.run({"INPUT_IDS": tokens.input_ids, "ATTENTION_MASK": tokens.attention_mask})
            for i, prompt in enumerate(missing):
                self._memo[prompt] = (out["POOLED_EMBEDDING"][i], torch.from_numpy(out["HIDDEN_STATES"][i]))
        return PromptEmbeddings(pooled=np.stack([self._memo[p][0] for p in prompts]).astype(np.float32),
                                hidden=torch.stack([self._memo[p][1] for p in prompts]))

    def unet(self, sample, timestep, hidden):
        return self.unet_model.run_bound({"sample": sample.float(), "timestep": timestep.float(),
                                          "encoder_hidden_states": hidden.float()},
                                         {"noise_pred": tuple(sample.shape)})["noise_pred"]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.vae.run({"LATENTS": latents.float().numpy()})["IMAGE"]
