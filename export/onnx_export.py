"""torch.nn.Module wrappers with the pipeline's tensor interface, and their ONNX export.

Input and output names are the Triton tensor names, so the same ONNX file
serves under Triton's onnxruntime backend and under the Python-backend runner.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

OPSET = 17


class MeanPooledTextEncoder(torch.nn.Module):
    """A sentence-transformers style encoder: token states and the normalized mean-pooled embedding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden, F.normalize(pooled, dim=-1)


class ClipTextEncoder(torch.nn.Module):
    """Stable Diffusion's CLIP text encoder: token states and the normalized pooled (EOS) embedding.

    SD does not mask padding in its text encoder, so the attention mask only
    takes part through a zero-weight term that keeps it a graph input.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids)
        hidden = out.last_hidden_state + 0.0 * attention_mask[..., :1].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return hidden, F.normalize(out.pooler_output, dim=-1)


class UNetNoisePredictor(torch.nn.Module):
    """UNet2DConditionModel with per-sample float timesteps."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeImageDecoder(torch.nn.Module):
    """Latents -> uint8 RGB images [B, H, W, 3], with SD's post-processing inside the graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    def forward(self, latents):
        image = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1)


def export_onnx(module: torch.nn.Module, args: Tuple[torch.Tensor, ...], path: Path,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_axes: Dict[str, Dict[int, str]]) -> Path:
    """Export with the TorchScript exporter (opset 17) to ``path``, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(tmp), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False)
    tmp.replace(path)
    return path


def export_text_encoder(encoder: torch.nn.Module, max_length: int, path: Path) -> Path:
    ids = torch.zeros(2, max_length, dtype=torch.int64)
    mask = torch.ones(2, max_length, dtype=torch.int64)
    return export_onnx(encoder, (ids, mask), path, ["INPUT_IDS", "ATTENTION_MASK"],
                       ["HIDDEN_STATES", "POOLED_EMBEDDING"],
                       {"INPUT_IDS": {0: "batch"}, "ATTENTION_MASK": {0: "batch"},
                        "HIDDEN_STATES": {0: "batch"}, "POOLED_EMBEDDING": {0: "batch"}})


def export_unet(unet, latent_shape: Tuple[int, int, int], max_length: int, hidden_dim: int, path: Path) -> Path:
    sample = torch.randn(2, *latent_shape)
    timestep = torch.tensor([999.0, 500.0])
    hidden = torch.randn(2, max_length, hidden_dim)
    return export_onnx(UNetNoisePredictor(unet), (sample, timestep, hidden), path,
                       ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"],
                       {"sample": {0: "batch"}, "timestep": {0: "batch"},
                        "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch"}})


def export_vae_decoder(vae, latent_shape: Tuple[int, int, int], path: Path) -> Path:
    return export_onnx(VaeImageDecoder(vae), (torch.randn(1, *latent_shape),), path,
                       ["LATENTS"], ["IMAGE"], {"LATENTS": {0: "batch"}, "IMAGE": {0: "batch"}})
