"""``nirvana-train``: train the embedded model and its scorer on the synthetic shapes dataset.

Stages, each saving its weights as soon as it ends (a failure later loses nothing):

1. ``scorer``: the attribute classifier (:mod:`nirvana_quality.scorer`) on rendered images;
2. ``vae``: the SD-architecture VAE (8x downsampling, 4 latent channels) as an
   autoencoder of rendered images (reconstruction + a small KL term, like SD's);
   its latent scaling factor is 1 / std of the training latents;
3. ``unet``: the UNet2DConditionModel as a text-conditioned epsilon-prediction
   diffusion model on those latents, conditioned on the real all-MiniLM-L6-v2
   token states the server computes, with SD's noise schedule and 10% empty
   captions (so classifier-free guidance works), EMA weights saved.

Everything is seeded: the same seed, thread count and machine give the same weights
(a different thread count changes float summation order, so the weights differ slightly).
The defaults are what the committed weights were trained with (see
``export/weights/training.json`` for the figures and the time it took).

Examples:
    nirvana-train                          # all stages, into export/weights
    nirvana-train --stages unet --unet-steps 8000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nirvana_export import embedded
from nirvana_export.onnx_export import MeanPooledTextEncoder
from nirvana_quality import scorer as scorer_mod
from nirvana_quality import shapes

STAGES = ("scorer", "vae", "unet")
CFG_DROPOUT = 0.1
FOREGROUND_WEIGHT = 5.0


def training_set(seed: int, captions: int, renders: int) -> tuple:
    """``captions`` train-split examples, each drawn ``renders`` times with fresh unnamed attributes.

    Attributes a caption does not name vary between its renders, so the model
    learns that they are free, and a caption says only what it names.
    """
    examples = shapes.split_examples("train", seed, captions)
    images, caption_index = [], []
    for i, ex in enumerate(tqdm(examples, desc="rendering", unit="caption", file=sys.stderr, mininterval=2)):
        rng = np.random.default_rng([seed, 3, i])
        for r in range(renders):
            if r == 0:
                scene = ex.scene
            else:
                fixed = {name: getattr(ex.scene, name) for name in ex.mentioned}
                if "count" not in ex.mentioned:
                    fixed["count"] = "one"
                scene = shapes.sample_scene(rng, fixed)
            images.append(shapes.render(scene))
            caption_index.append(i)
    return examples, np.stack(images), np.asarray(caption_index)


@torch.no_grad()
def encode_captions(texts: Sequence[str], max_length: int = 77, batch_size: int = 64) -> torch.Tensor:
    """all-MiniLM-L6-v2 token states [N, L, 384] (float16 to save memory), as the served text encoder gives."""
    model, tokenizer = embedded.build_text_encoder()
    encoder = MeanPooledTextEncoder(model).eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="text states", unit="batch", file=sys.stderr):
        tokens = tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                           max_length=max_length, return_tensors="pt")
        hidden, _ = encoder(tokens["input_ids"], tokens["attention_mask"])
        out.append(hidden.to(torch.float16))
    return torch.cat(out)


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save(module: torch.nn.Module, path: Path, metadata: Dict[str, str] | None = None,
         dtype: torch.dtype = torch.float32) -> None:
    """Write ``module``'s weights as safetensors, atomically (float16 halves what git stores)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
               for k, v in module.state_dict().items()}
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def train_scorer_stage(args, out: Path) -> dict:
    bar = tqdm(total=args.scorer_steps, desc="scorer", unit="step", file=sys.stderr, mininterval=2)
    model, report = scorer_mod.train_scorer(args.seed, steps=args.scorer_steps,
                                            progress=lambda s, l: (bar.update(), bar.set_postfix(loss=f"{l:.3f}")))
    bar.close()
    scenes = scorer_mod.heldout_scenes(args.seed, 2000)
    report["heldout_accuracy"] = scorer_mod.attribute_accuracy(model, shapes.render_batch(
        [shapes.Example(s, "", ()) for s in scenes]), scenes)
    save(model, out / embedded.SCORER_WEIGHTS)
    return report


def train_vae_stage(args, images: np.ndarray, out: Path) -> dict:
    torch.manual_seed(args.seed)
    vae = embedded.build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 11)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(args.vae_steps), desc="vae", unit="step", file=sys.stderr, mininterval=2)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * cosine_lr(step, args.vae_steps, 100)
        x = to_float(images[torch.randint(0, len(images), (args.vae_batch,), generator=generator).numpy()])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        # L1 + L2 reconstruction keeps flat colours and edges sharp; KL weight as in SD's VAE.
        # Objects cover a few percent of an image: pixels away from the image's median colour
        # (its background) weigh FOREGROUND_WEIGHT times more, or colours and shapes come last.
        weight = 1.0 + (FOREGROUND_WEIGHT - 1.0) * ((x - x.median(dim=2, keepdim=True).values
                                                      .median(dim=3, keepdim=True).values).abs()
                                                     .amax(1, keepdim=True) > 0.15).float()
        error = recon - x
        loss = ((error.abs() + error.pow(2)) * weight).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    vae.eval()
    with torch.no_grad():
        sample = images[:4096]
        means = torch.cat([vae.encode(to_float(sample[i:i + 256])).latent_dist.mean for i in range(0, len(sample), 256)])
        recon = torch.cat([vae.decode(vae.encode(to_float(sample[i:i + 256])).latent_dist.mean).sample
                           for i in range(0, min(1024, len(sample)), 256)])
    scaling = float(1.0 / means.std())
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon, to_float(sample[:1024]))))
    save(vae, out / embedded.VAE_WEIGHTS, {"scaling_factor": f"{scaling:.6f}"})
    return {"steps": args.vae_steps, "batch_size": args.vae_batch, "lr": args.vae_lr,
            "final_loss": float(np.mean(losses[-50:])), "scaling_factor": scaling,
            "reconstruction_psnr_db": round(psnr, 2), "seconds": round(time.perf_counter() - start, 1)}


def train_unet_stage(args, examples: List[shapes.Example], images: np.ndarray, caption_index: np.ndarray,
                     out: Path) -> dict:
    from diffusers import DDPMScheduler

    start = time.perf_counter()
    vae = embedded.build_vae(out / embedded.VAE_WEIGHTS)
    scaling = float(vae.config.scaling_factor)
    with torch.no_grad():
        moments = []
        for i in tqdm(range(0, len(images), 256), desc="latents", unit="batch", file=sys.stderr):
            dist = vae.encode(to_float(images[i:i + 256])).latent_dist
            moments.append(torch.cat([dist.mean, dist.std], 1))
        moments = torch.cat(moments)
    states = encode_captions([e.caption for e in examples] + [""])
    empty = states[-1:]
    noise_schedule = DDPMScheduler.from_config(embedded.SD_SCHEDULER_CONFIG)
    alphas = noise_schedule.alphas_cumprod

    torch.manual_seed(args.seed)
    unet = embedded.build_unet(states.shape[-1]).train()
    ema = embedded.build_unet(states.shape[-1])
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(args.seed + 21)
    losses = []
    bar = tqdm(range(args.unet_steps), desc="unet", unit="step", file=sys.stderr, mininterval=2)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.unet_lr * cosine_lr(step, args.unet_steps, 200)
        idx = torch.randint(0, len(images), (args.unet_batch,), generator=generator)
        mean, std = moments[idx].chunk(2, dim=1)
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        hidden = states[torch.from_numpy(caption_index[idx.numpy()])].float()
        drop = torch.rand(args.unet_batch, generator=generator) < CFG_DROPOUT
        hidden[drop] = empty.float()
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.unet_batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)  # DDPM's simple loss, eq. 14
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save(ema, out / embedded.UNET_WEIGHTS, dtype=torch.float16)
    save(ema, out / embedded.UNET_WEIGHTS, dtype=torch.float16)
    return {"steps": args.unet_steps, "batch_size": args.unet_batch, "lr": args.unet_lr, "ema_decay": args.ema_decay,
            "cfg_dropout": CFG_DROPOUT, "final_loss": float(np.mean(losses[-200:])),
            "loss_curve": [round(float(np.mean(losses[i:i + 200])), 4) for i in range(0, len(losses), 200)],
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=embedded.WEIGHTS_DIR, help="weights folder (default: %(default)s)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", type=int, default=8000, help="training captions (default: %(default)s)")
    parser.add_argument("--renders", type=int, default=3, help="images per caption (default: %(default)s)")
    parser.add_argument("--scorer-steps", type=int, default=1500)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--vae-batch", type=int, default=24)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--unet-steps", type=int, default=7000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=8e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="save the UNet's EMA weights every N steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    card_path = out / embedded.TRAINING_CARD
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card.update({"seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "dataset": {"captions": args.captions, "renders_per_caption": args.renders}})

    def record(stage: str, report: dict) -> None:
        card[stage] = report
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        print(f"{stage}: {json.dumps({k: v for k, v in report.items() if k != 'loss_curve'})}", file=sys.stderr)

    if "scorer" in stages:
        record("scorer", train_scorer_stage(args, out))
    if "vae" in stages or "unet" in stages:
        examples, images, caption_index = training_set(args.seed, args.captions, args.renders)
        if "vae" in stages:
            record("vae", train_vae_stage(args, images, out))
        if "unet" in stages:
            record("unet", train_unet_stage(args, examples, images, caption_index, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
