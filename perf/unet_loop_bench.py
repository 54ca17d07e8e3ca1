"""``nirvana-unet-bench``: per-image time of the step loop at batch 1, 2 and 4, and its overhead.

Runs :class:`nirvana.unet_loop.StepRangeLoop` over the exported UNet (ONNX with
onnxruntime and IOBinding, as the ``unet_loop`` model does) or, with --torch,
over the embedded diffusers UNet in PyTorch on the GPU when one is present. The
overhead is the loop's time beyond the same number of bare UNet calls on the
same shapes (scheduler steps, guidance, bookkeeping).

Example:
    nirvana-unet-bench --steps 50 --batches 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nirvana.config import PipelineSpec
from nirvana.onnx_session import OnnxModel
from nirvana.unet_loop import DenoiseJob, StepRangeLoop


def onnx_unet(repository: Path, provider: str):
    model = OnnxModel(repository / "unet_loop" / "1" / "unet.onnx", provider)

    def predict(sample, timestep, hidden):
        return model.run_bound({"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden},
                               output_shapes={"noise_pred": tuple(sample.shape)})["noise_pred"]

    return predict, model.device


def torch_unet(hidden_dim: int, device: torch.device, dtype: torch.dtype):
    from nirvana_export.embedded import build_unet

    unet = build_unet(cross_attention_dim=hidden_dim).to(device, dtype)

    @torch.no_grad()
    def predict(sample, timestep, hidden):
        return unet(sample.to(dtype), timestep, hidden.to(dtype), return_dict=False)[0].float()

    return predict, device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-unet-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch", action="store_true", help="PyTorch UNet (GPU if present) instead of ONNX")
    parser.add_argument("--fp16", action="store_true", help="with --torch on a GPU: half precision")
    parser.add_argument("--provider", default="auto", help="onnxruntime execution provider (ONNX mode)")
    parser.add_argument("--output", type=Path, default=Path("perf/results/unet_loop_bench.json"))
    args = parser.parse_args(argv)

    spec = PipelineSpec.load(args.model_repository / "unet_loop" / "1")
    if args.torch:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if args.fp16 and device.type == "cuda" else torch.float32
        predict, device = torch_unet(spec.hidden_dim, device, dtype)
        backend = f"torch {dtype} on {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}"
    else:
        predict, device = onnx_unet(args.model_repository, args.provider)
        backend = f"onnxruntime IOBinding on {device}"
    loop = StepRangeLoop(predict, args.scheduler, spec.scheduler_config)
    g = torch.Generator().manual_seed(0)

    def jobs(n, starts=None):
        starts = starts or [0] * n
        return [DenoiseJob(latents=torch.randn(spec.latent_shape, generator=g).to(device),
                           prompt_embeds=torch.randn(spec.max_length, spec.hidden_dim, generator=g).to(device),
                           negative_embeds=torch.randn(spec.max_length, spec.hidden_dim, generator=g).to(device),
                           start_step=s, steps=args.steps, guidance_scale=7.5) for s in starts]

    def best_of(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    print(f"UNet loop benchmark: {backend}, {args.steps} steps, CFG (2 UNet rows per image), "
          f"latents {spec.latent_shape}, scheduler {args.scheduler}, best of {args.repeats}")
    print(f"{'batch':>5} {'loop s':>8} {'s/image':>8} {'bare UNet s':>12} {'overhead':>9}")
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        batch = jobs(b)
        loop_s = best_of(lambda: loop.run(batch))
        sample = torch.randn(2 * b, *spec.latent_shape, generator=g).to(device)
        timestep = torch.full((2 * b,), 500.0).to(device)
        hidden = torch.randn(2 * b, spec.max_length, spec.hidden_dim, generator=g).to(device)
        bare_s = best_of(lambda: [predict(sample, timestep, hidden) for _ in range(args.steps)])
        row = {"batch": b, "loop_s": loop_s, "per_image_s": loop_s / b, "bare_unet_s": bare_s,
               "overhead": loop_s / bare_s - 1}
        rows.append(row)
        print(f"{b:>5} {loop_s:>8.3f} {loop_s / b:>8.3f} {bare_s:>12.3f} {row['overhead']:>8.1%}", flush=True)
    starts = [0, args.steps // 5, args.steps // 2]
    mixed = jobs(3, starts)
    mixed_s = best_of(lambda: loop.run(mixed))
    work = sum(args.steps - s for s in starts)
    print(f"mixed batch, START_STEP {starts} ({work} image-steps in {args.steps} ticks): {mixed_s:.3f}s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"backend": backend, "steps": args.steps, "rows": rows,
                                       "mixed_starts": starts, "mixed_s": mixed_s}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
