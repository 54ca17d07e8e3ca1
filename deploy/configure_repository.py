"""Write a deployment's model repository: a copy of an exported one with parameters set.

    python deploy/configure_repository.py SOURCE TARGET [--stamp FILE] --set MODEL.KEY=VALUE ...

deploy/Dockerfile runs it on the export's container repository to turn the GPU tiers on. Every
edited Python-backend model's parameters are parsed the way the model will parse them at load
(nirvana.config), so a misspelt key or a bad value fails the image build, not the first start.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Dict

# The config class each Python-backend model builds from its parameters (its 1/model.py).
CONFIG_CLASSES = {"latent_cache": "CacheConfig", "unet_loop": "UNetLoopConfig", "tokenizer": "RequestDefaults",
                  "text_encoder": "OnnxModelConfig", "vae_decoder": "OnnxModelConfig"}


def parse_settings(items) -> Dict[str, Dict[str, str]]:
    settings: Dict[str, Dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        model, dot, key = name.partition(".")
        if not sep or not dot or not model or not key:
            raise ValueError(f"--set {item!r}: expected MODEL.KEY=VALUE")
        settings.setdefault(model, {})[key] = value
    return settings


def check_parameters(repository: Path, models) -> None:
    """Parse each model's parameters with its config class (ConfigError names the key)."""
    from nirvana import config

    for model in models:
        path = repository / model / "config.pbtxt"
        if config.read_model_config(path).backend != "python" or model not in CONFIG_CLASSES:
            continue  # Triton's own backends check their configs at load
        cls = getattr(config, CONFIG_CLASSES[model])
        try:
            config.parse_parameters(cls, config.read_pbtxt_parameters(path))
        except config.ConfigError as exc:
            raise ValueError(f"{model}/config.pbtxt: {exc}") from exc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="configure_repository.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an exported model repository")
    parser.add_argument("target", type=Path, help="where to write the copy (must not exist)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="MODEL.KEY=VALUE",
                        help="a model parameter (repeatable); an empty VALUE sets it to ''")
    parser.add_argument("--stamp", type=Path,
                        help="the export's .exported file, copied into TARGET (nirvana-serve serves only "
                             "exported repositories; the container variant has none of its own)")
    args = parser.parse_args(argv)

    from nirvana_export.repository import repository_variant

    try:
        settings = parse_settings(args.settings)
    except ValueError as exc:
        parser.error(str(exc))
    if args.target.exists():
        parser.error(f"{args.target} exists; pick a new folder")
    try:
        repository_variant(args.source, args.target, settings)
        if args.stamp:
            shutil.copy2(args.stamp, args.target / ".exported")
        check_parameters(args.target, settings)
    except (OSError, ValueError) as exc:  # nirvana.config.ConfigError is a ValueError
        shutil.rmtree(args.target, ignore_errors=True)  # never leave a half-configured repository
        print(f"configure_repository: {exc}", file=sys.stderr)
        return 1
    changed = ", ".join(f"{m}.{k}={v!r}" for m, kv in settings.items() for k, v in kv.items())
    print(f"wrote {args.target} from {args.source}" + (f" ({changed})" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
