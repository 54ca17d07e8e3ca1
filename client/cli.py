"""``txt2img``: generate one image through the txt2img ensemble and say what the cache did."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple, TypeVar

from nirvana_client.client import Txt2ImgClient, Txt2ImgError

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
T = TypeVar("T")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--url and --protocol, shared by the package's command-line tools."""
    parser.add_argument("--url", help="server host:port (default: 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")


def call_server(prog: str, args: argparse.Namespace, action: Callable[[str], T]) -> Tuple[Optional[T], int]:
    """Run ``action(url)``; on failure print why and return the exit code (2: the server refused,
    3: it could not be reached), else ``(result, 0)``."""
    url = args.url or DEFAULT_URLS[args.protocol]
    try:
        return action(url), 0
    except Txt2ImgError as exc:
        print(f"{prog}: server error: {exc}", file=sys.stderr)
        return None, 2
    except Exception as exc:  # noqa: BLE001 - connection problems, shown plainly
        print(f"{prog}: cannot reach {args.protocol} server at {url}: {exc}", file=sys.stderr)
        return None, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txt2img", description=__doc__)
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="image file (default: %(default)s)")
    add_server_arguments(parser)
    parser.add_argument("--negative-prompt", help="what the image should not show")
    parser.add_argument("--seed", type=int, help="noise seed (default: chosen by the server and printed)")
    parser.add_argument("--steps", type=int, help="denoising steps (server default: 50)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (server default: 7.5)")
    parser.add_argument("--tenant", help="private cache namespace (letters, digits, _.-)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the image; the server also stops working on it then")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def generate(url):
        with Txt2ImgClient(url, args.protocol, timeout_s=args.timeout) as client:
            return client.generate(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance,
                                   args.tenant, timeout_ms=max(1, int(args.timeout * 1000)))

    result, code = call_server("txt2img", args, generate)
    if code:
        return code
    result.save(args.output)
    if result.cache_status == "miss":
        cache = "cache miss"
    else:
        cache = (f"cache {result.cache_status} hit (similarity {result.similarity:.3f}"
                 f"{', matched: ' + repr(result.matched_prompt) if result.cache_status == 'approximate' else ''})")
    print(f"{args.output}: {result.image.shape[1]}x{result.image.shape[0]}, seed {result.seed}, {cache}, "
          f"skipped {result.start_step} of {result.steps} steps, {result.latency_s:.2f}s"
          + (" [prompt truncated]" if result.prompt_truncated else "")
          + (" [coalesced with an identical request in flight]" if result.coalesced else "")
          + (f" [resume guard: {result.guard}]" if result.guard else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
