"""A diffusers Stable Diffusion 1.x/2.x folder as a :class:`~nirvana_quality.generators.Generator`.

This measures the cache with real SD weights in torch, without exporting them
to a model repository first. Everything but the three networks is the
server's: prompts are denoised by :class:`nirvana.unet_loop.StepRangeLoop` with
the checkpoint's own scheduler config, starting from the latent_cache model's
seeded noise, so resuming from a cached step K here behaves like resumption in
the server. The text encoder's outputs are the ones ``nirvana-export
--checkpoint`` bakes into ONNX (``ClipTextEncoder``): the normalized pooled
CLIP embedding is the cache key, the token states condition the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from nirvana_quality.generators import Generator, PromptEmbeddings

#: Subfolders (and the one file) a diffusers SD folder must have, as ``save_pretrained`` writes them.
REQUIRED = ("tokenizer", "text_encoder", "unet", "vae", "scheduler/scheduler_config.json")


def check_checkpoint(checkpoint: Path) -> None:
    """Raise FileNotFoundError naming every missing part of a diffusers SD folder.

    ``from_pretrained`` with ``local_files_only`` would otherwise fail with a
    message about the hub; naming the subfolder says what to copy.
    """
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"Stable Diffusion checkpoint folder not found: {checkpoint}")
    missing = [part for part in REQUIRED if not (checkpoint / part).exists()]
    if missing:
        raise FileNotFoundError(f"{checkpoint} is not a complete diffusers Stable Diffusion folder: missing "
                                f"{', '.join(missing)} (expected {', '.join(REQUIRED)})")


class CheckpointGenerator(Generator):
    """The torch networks of a diffusers Stable Diffusion 1.x/2.x folder (local files only).

    Args:
        checkpoint: A folder as ``StableDiffusionPipeline.save_pretrained`` writes it
            (tokenizer/, text_encoder/, unet/, vae/, scheduler/scheduler_config.json).
        scheduler: Step-loop scheduler, a key of :data:`nirvana.schedulers.SCHEDULERS`
            (built from the checkpoint's scheduler config whatever class the folder names).
        device: torch device for the networks ("cpu", "cuda", "cuda:1", ...). The loop's
            latents stay on the CPU, like the server's, and move to the device per UNet call.

    All networks run in float32: the quality numbers then measure the cache, not
    half-precision rounding.
    """

    def __init__(self, checkpoint: Union[str, Path], scheduler: str = "ddim", device: str = "cpu"):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        checkpoint = Path(checkpoint)
        check_checkpoint(checkpoint)
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.model_id = checkpoint.resolve().name
        kwargs = {"local_files_only": True}
        # float32 explicitly: transformers 5 would otherwise keep the dtype the weights were saved in.
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), subfolder="tokenizer", **kwargs)
        self.text_encoder = CLIPTextModel.from_pretrained(str(checkpoint), subfolder="text_encoder",
                                                          dtype=torch.float32, **kwargs)
        self.unet_model = UNet2DConditionModel.from_pretrained(str(checkpoint), subfolder="unet",
                                                               torch_dtype=torch.float32, **kwargs)
        self.vae = AutoencoderKL.from_pretrained(str(checkpoint), subfolder="vae", torch_dtype=torch.float32,
                                                 **kwargs)
        for module in (self.text_encoder, self.unet_model, self.vae):
            module.eval().to(self.device)
        config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
        # Keys like _class_name/_diffusers_version describe the file, not the schedule (as in nirvana-export).
        self.scheduler_config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.scheduler_name = scheduler
        size = self.unet_model.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(self.unet_model.config.in_channels), int(height), int(width))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.max_length = int(self.tokenizer.model_max_length)

    def embed(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """CLIP text encoder over prompts padded to the tokenizer's full length, like SD pipelines.

        SD conditions on all ``model_max_length`` token states (padding included,
        no attention mask), so the padding is part of the conditioning and must match.
        """
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.text_encoder(input_ids=tokens["input_ids"].to(self.device))
        pooled = F.normalize(out.pooler_output.float(), dim=-1)
        return PromptEmbeddings(pooled=pooled.cpu().numpy().astype(np.float32),
                                hidden=out.last_hidden_state.float().cpu())

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Noise prediction with per-sample timesteps, returned on the caller's device."""
        with torch.no_grad():
            noise = self.unet_model(sample.to(self.device, torch.float32), timestep.to(self.device, torch.float32),
                                    hidden.to(self.device, torch.float32), return_dict=False)[0]
        return noise.to(sample.device, torch.float32)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """VAE decode and SD's post-processing (the same as the exported vae_decoder graph)."""
        with torch.no_grad():
            image = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor,
                                    return_dict=False)[0]
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).cpu().numpy()
