"""``nirvana-export``: export a diffusion model to ONNX and fill the Triton model repository.

Without --checkpoint it builds the embedded default (real all-MiniLM-L6-v2 text
encoder, tiny SD-architecture UNet and VAE). With --checkpoint it loads a
diffusers Stable Diffusion 1.x/2.x folder (``from_pretrained``, local files only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from nirvana.config import PipelineSpec
from nirvana_export import embedded, onnx_export, repository


def _stage(bar: tqdm, text: str) -> None:
    bar.set_description(text)
    bar.refresh()


def export_embedded(repo: Path, max_length: int, bar: tqdm, weights: Optional[Path],
                    thresholds: Optional[list] = None, guard: Optional[dict] = None) -> PipelineSpec:
    if weights is not None and not embedded.has_trained_weights(weights):
        raise ValueError(f"{weights} lacks {embedded.UNET_WEIGHTS} or {embedded.VAE_WEIGHTS}: "
                         "train them with `make train`, or export with --random-weights")
    _stage(bar, "loading all-MiniLM-L6-v2")
    text_model, tokenizer = embedded.build_text_encoder()
    hidden_dim = text_model.config.hidden_size
    unet = embedded.build_unet(hidden_dim, weights / embedded.UNET_WEIGHTS if weights else None)
    vae = embedded.build_vae(weights / embedded.VAE_WEIGHTS if weights else None)
    if thresholds is None:
        thresholds = embedded.MINILM_THRESHOLDS
    bar.update()
    spec = PipelineSpec(model_id=embedded.model_id(weights is not None, weights), latent_channels=4,
                        latent_height=embedded.IMAGE_SIZE // 8, latent_width=embedded.IMAGE_SIZE // 8,
                        vae_scale_factor=8, embedding_dim=hidden_dim, hidden_dim=hidden_dim,
                        max_length=max_length, scheduler_config=embedded.SD_SCHEDULER_CONFIG,
                        thresholds=thresholds, guard=guard or {})
    _write_models(repo, spec, onnx_export.MeanPooledTextEncoder(text_model), tokenizer, unet, vae, bar)
    return spec


def export_checkpoint(checkpoint: Path, repo: Path, bar: tqdm) -> PipelineSpec:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    _stage(bar, f"loading {checkpoint}")
    kwargs = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), subfolder="tokenizer", **kwargs)
    text_model = CLIPTextModel.from_pretrained(str(checkpoint), subfolder="text_encoder",
                                               attn_implementation="eager", **kwargs).eval()
    unet = UNet2DConditionModel.from_pretrained(str(checkpoint), subfolder="unet", **kwargs).eval()
    vae = AutoencoderKL.from_pretrained(str(checkpoint), subfolder="vae", **kwargs).eval()
    scheduler_config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    bar.update()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    spec = PipelineSpec(model_id=f"{checkpoint.resolve().name}", latent_channels=unet.config.in_channels,
                        latent_height=size, latent_width=size, vae_scale_factor=scale,
                        embedding_dim=text_model.config.hidden_size,
                        hidden_dim=text_model.config.hidden_size, max_length=tokenizer.model_max_length,
                        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")})
    _write_models(repo, spec, onnx_export.ClipTextEncoder(text_model), tokenizer, unet, vae, bar)
    return spec


def _write_models(repo, spec, text_encoder, tokenizer, unet, vae, bar) -> None:
    _stage(bar, "tokenizer files")
    tok_dir = repository.version_dir(repo, "tokenizer") / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.save_pretrained(str(tok_dir))
    bar.update()
    _stage(bar, "text_encoder -> ONNX")
    onnx_export.export_text_encoder(text_encoder, spec.max_length,
                                    repository.version_dir(repo, "text_encoder") / "model.onnx")
    bar.update()
    _stage(bar, "unet -> ONNX")
    onnx_export.export_unet(unet, spec.latent_shape, spec.max_length, spec.hidden_dim,
                            repository.version_dir(repo, "unet_loop") / "unet.onnx")
    bar.update()
    _stage(bar, "vae_decoder -> ONNX")
    onnx_export.export_vae_decoder(vae, spec.latent_shape, repository.version_dir(repo, "vae_decoder") / "model.onnx")
    bar.update()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="diffusers SD 1.x/2.x folder (default: the embedded model)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository to fill (default: %(default)s)")
    parser.add_argument("--container-repository", type=Path, default=Path("build/model_repository_container"),
                        help="where to write the NVIDIA-container variant (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=77, help="tokens per prompt for the embedded model")
    parser.add_argument("--weights", type=Path, default=embedded.WEIGHTS_DIR,
                        help="trained UNet/VAE safetensors of the embedded model (default: the committed ones, "
                             "from `make train`)")
    parser.add_argument("--random-weights", action="store_true",
                        help="embedded model with seeded random UNet/VAE weights (texture images; same cost)")
    args = parser.parse_args(argv)

    try:
        repository.check_repository(args.repository)
        start = time.perf_counter()
        with tqdm(total=6, unit="stage", file=sys.stderr) as bar:
            if args.checkpoint:
                spec = export_checkpoint(args.checkpoint, args.repository, bar)
            else:
                weights = None if args.random_weights else args.weights
                spec = export_embedded(args.repository, args.max_length, bar, weights,
                                       embedded.calibrated_thresholds(weights) if weights else None,
                                       embedded.calibrated_guard(weights) if weights else None)
            _stage(bar, "pipeline.json and container repository")
            repository.write_specs(args.repository, spec)
            repository.write_container_repository(args.repository, args.container_repository)
            repository.mark_exported(args.repository, spec)
            repository.mark_exported(args.container_repository, spec)  # nirvana-serve serves it too
            bar.update()
    except (OSError, ValueError) as exc:
        print(f"nirvana-export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {spec.model_id} into {args.repository} (container variant: "
          f"{args.container_repository}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
