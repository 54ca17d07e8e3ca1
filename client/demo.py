"""``make demo``: serve the embedded model, send a few prompts, show what the cache did.

Starts tritonserver on free local ports, sends prompts (similar ones, an exact
repeat, a repeat with another seed, one-attribute edits, an unrelated one) over gRPC,
prints a table with the resume guard's decision for each hit, writes the images and
stops the server. The embedded model is trained on
captioned shapes (``nirvana_quality.shapes``), so the prompts name shapes,
colours, positions and backgrounds. Every approximate hit is also generated
with the cache bypassed (same seed), and ``side_by_side.png`` shows the two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nirvana.tritonserver import TritonServer
from nirvana_client.client import Txt2ImgClient

PROMPTS = [
    ("a large red circle on the left on a white background", 42),
    ("a big crimson circle on the left, on a white background, high quality", 42),  # rewording
    ("a large red circle on the left on a white background", 42),  # exact repeat
    ("a large red circle on the left on a white background", 7),  # another seed
    ("a large red circle on the left on a white background, 4k", 42),  # framing words added
    ("two small blue squares at the top on a black background", 42),
    ("two small blue squares at the top on a striped background", 42),  # one-attribute edit: background
    ("two small green squares at the top on a black background", 42),  # one-attribute edit: colour
    ("a large red square on the left on a white background", 42),  # one-attribute edit: shape
    ("three yellow triangles in the lower half, against a dark background", 42),
]


def save_side_by_side(path: Path, pairs) -> None:
    """One row per approximate hit: the image with the cache bypassed, then the hit's."""
    import numpy as np
    from PIL import Image, ImageDraw

    scale, width = 4, 2 * 64 * 4 + 8
    rows = []
    for prompt, hit, fresh in pairs:
        panel = Image.new("RGB", (width, 64 * scale + 34), (255, 255, 255))
        for column, (result, label) in enumerate(((fresh, "no cache"), (hit, f"hit: resumed at step {hit.start_step}"))):
            image = Image.fromarray(np.asarray(result.image)).resize((64 * scale, 64 * scale), Image.Resampling.NEAREST)
            panel.paste(image, (column * (64 * scale + 8), 34))
            ImageDraw.Draw(panel).text((column * (64 * scale + 8), 18), label, fill=(0, 0, 0))
        ImageDraw.Draw(panel).text((0, 2), prompt[:80], fill=(0, 0, 0))
        rows.append(panel)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    for n, row in enumerate(rows):
        sheet.paste(row, (0, n * row.height))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"no cache vs approximate hit, side by side: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    args = parser.parse_args(argv)

    print("starting tritonserver ...", flush=True)
    rows = []
    with TritonServer(args.model_repository) as server:
        print(f"serving on gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
        with Txt2ImgClient(server.grpc_url, "grpc") as client:
            for i, (prompt, seed) in enumerate(PROMPTS, 1):
                result = client.generate(prompt, seed=seed)
                path = result.save(args.output / f"{i:02d}.png")
                rows.append((i, prompt, seed, result, path))
                print(f"  [{i}/{len(PROMPTS)}] {result.cache_status:<11} {result.latency_s:.2f}s  {prompt}", flush=True)
            pairs = [(prompt, r, client.generate(prompt, seed=seed, cache=False))
                     for _, prompt, seed, r, _ in rows if r.cache_status == "approximate"]
    print("server stopped\n")
    if pairs:
        save_side_by_side(args.output / "side_by_side.png", pairs)
    header = (f"{'#':>2}  {'cache':<11} {'sim':>5} {'start':>5} {'run':>4} {'time':>6}  {'seed':>4}  "
              f"{'resume guard':<22} prompt")
    print(header)
    print("-" * len(header))
    for i, prompt, seed, r, _ in rows:
        print(f"{i:>2}  {r.cache_status:<11} {r.similarity:>5.3f} {r.start_step:>5} {r.steps - r.start_step:>4} "
              f"{r.latency_s:>5.2f}s  {seed:>4}  {r.guard or '-':<22} {prompt}")
        if r.cache_status == "approximate":
            print(f"{'':>15}matched: {r.matched_prompt}")
    print("\nresume guard: 'passed' = the new prompt moves the cached state no further than the calibrated bound, "
          "so the hit resumed at its K; 'downgraded' = it would (a changed attribute), so the request restarted "
          "from a smaller step of the same entry or from its own noise (start shows where).")
    total = sum(r.steps for _, _, _, r, _ in rows)
    run = sum(r.steps - r.start_step for _, _, _, r, _ in rows)
    print(f"\nUNet steps run: {run} of {total} ({1 - run / total:.0%} saved); images in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
