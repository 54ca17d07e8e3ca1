"""``make demo``: serve the embedded model, send a few prompts, show what the cache did.

Starts tritonserver on free local ports, sends prompts (two similar ones, one
exact repeat, one repeat with another seed, one unrelated) over gRPC, prints a
table, writes the images and stops the server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nirvana.tritonserver import TritonServer
from nirvana_client.client import Txt2ImgClient

PROMPTS = [
    ("a watercolor painting of a lighthouse on a cliff at sunset", 42),
    ("a watercolor painting of a lighthouse on a rocky cliff at sunset, soft light", 42),
    ("a watercolor painting of a lighthouse on a cliff at sunset", 42),
    ("a watercolor painting of a lighthouse on a cliff at sunset", 7),
    ("an oil painting of a lighthouse by the sea in a storm", 42),
    ("a bowl of ramen noodles, studio food photography", 42),
]


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
    print("server stopped\n")
    header = f"{'#':>2}  {'cache':<11} {'sim':>5} {'start':>5} {'run':>4} {'time':>6}  {'seed':>4}  prompt"
    print(header)
    print("-" * len(header))
    for i, prompt, seed, r, _ in rows:
        print(f"{i:>2}  {r.cache_status:<11} {r.similarity:>5.3f} {r.start_step:>5} {r.steps - r.start_step:>4} "
              f"{r.latency_s:>5.2f}s  {seed:>4}  {prompt}")
        if r.cache_status == "approximate":
            print(f"{'':>15}matched: {r.matched_prompt}")
    total = sum(r.steps for _, _, _, r, _ in rows)
    run = sum(r.steps - r.start_step for _, _, _, r, _ in rows)
    print(f"\nUNet steps run: {run} of {total} ({1 - run / total:.0%} saved); images in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
