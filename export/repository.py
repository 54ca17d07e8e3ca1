"""Write exported artifacts into a Triton model repository.

``model_repository/`` in the source tree holds each model's config.pbtxt and
its thin model.py adapter; the export adds the generated artifacts (ONNX
files, tokenizer files, pipeline.json) into each model's version folder. For
the NVIDIA tritonserver container a second repository is written where
text_encoder and vae_decoder run on Triton's own onnxruntime backend.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict

from nirvana.config import PipelineSpec, read_model_config

MODELS = ("tokenizer", "text_encoder", "latent_cache", "unet_loop", "vae_decoder", "txt2img", "cache_admin")
PIPELINE_MODELS = ("tokenizer", "text_encoder", "latent_cache", "unet_loop", "vae_decoder")
ONNX_BACKEND_MODELS = ("text_encoder", "vae_decoder")
CONTAINER_CONFIGS = Path(__file__).resolve().parent / "container"
# Where the container's latent_cache persists: the README's `docker run` mounts the checkout at
# /work, so this is the checkout's data/cache, the same place `make serve` uses.
CONTAINER_CACHE_DIR = "/work/data/cache"
STAMP = ".exported"


def version_dir(repository: Path, model: str) -> Path:
    path = Path(repository) / model / "1"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_repository(repository: Path) -> None:
    """Fail early if ``repository`` lacks the committed configs the export fills in."""
    missing = [m for m in MODELS if not (Path(repository) / m / "config.pbtxt").exists()]
    if missing:
        raise FileNotFoundError(f"{repository} has no config.pbtxt for {missing}; "
                                "point --repository at the project's model_repository/")


def write_specs(repository: Path, spec: PipelineSpec) -> None:
    for model in PIPELINE_MODELS:
        spec.save(version_dir(repository, model))


def mark_exported(repository: Path, spec: PipelineSpec) -> None:
    (Path(repository) / STAMP).write_text(spec.model_id + "\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link large artifacts (ONNX files), copy the rest so edits never leak across."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.stat().st_size < (1 << 20):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_container_repository(repository: Path, target: Path) -> Path:
    """A copy of ``repository`` for the NVIDIA tritonserver container (all backends).

    text_encoder and vae_decoder take the onnxruntime backend config from
    export/container/ and lose their Python adapter; the rest is unchanged.
    Large files are hard-linked where possible.
    """
    repository, target = Path(repository), Path(target)
    if target.exists():
        shutil.rmtree(target)
    for src in repository.rglob("*"):
        if src.is_dir() or "__pycache__" in src.parts or src.name == STAMP:
            continue
        rel = src.relative_to(repository)
        if rel.parts[0] in ONNX_BACKEND_MODELS and rel.name in ("model.py", "config.pbtxt"):
            continue
        _link_or_copy(src, target / rel)
    for model in ONNX_BACKEND_MODELS:
        shutil.copy2(CONTAINER_CONFIGS / model / "config.pbtxt", target / model / "config.pbtxt")
    # The cache persists across container restarts in the checkout the README's command mounts.
    cache_config = target / "latent_cache" / "config.pbtxt"
    cache_config.unlink()  # a hard link to the source's: write a new file, do not edit through it
    cache_config.write_text(with_parameters(repository / "latent_cache" / "config.pbtxt",
                                            {"snapshot_path": CONTAINER_CACHE_DIR}))
    return target


def with_parameters(config_path: Path, values: Dict[str, str]) -> str:
    """The text of the config.pbtxt at ``config_path`` with ``values`` set in its ``parameters``
    (added where absent), through Triton's ``ModelConfig`` protobuf; its comments are lost."""
    from google.protobuf import text_format

    config = read_model_config(config_path)
    for key, value in values.items():
        config.parameters[key].string_value = str(value)
    return text_format.MessageToString(config)


def repository_variant(source: Path, target: Path, parameters: Dict[str, Dict[str, str]]) -> Path:
    """Copy ``source`` to ``target`` (ONNX files hard-linked) and set ``parameters[model][key] = value``.

    For runs with other model parameters (tests, soaks) that leave the committed configs alone.
    Each edited config.pbtxt is parsed as Triton's ``ModelConfig`` protobuf, its ``parameters``
    set (added when absent, the block too) and written back in protobuf text format, so its
    comments are lost; the configs of the other models are copied untouched.

    Raises:
        FileNotFoundError: ``parameters`` names a model without a config.pbtxt in ``source``
            (checked before anything is written).
        nirvana.config.ConfigError: A config to edit does not parse.
    """
    source, target = Path(source), Path(target)
    edited = {}
    for model, values in parameters.items():
        path = source / model / "config.pbtxt"
        if not path.is_file():
            models = sorted(p.parent.name for p in source.glob("*/config.pbtxt"))
            raise FileNotFoundError(f"cannot set parameters of model {model!r}: {path} does not exist "
                                    f"(models in {source}: {models})")
        edited[Path(model) / "config.pbtxt"] = with_parameters(path, values)
    for src in source.rglob("*"):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        rel = src.relative_to(source)
        if rel not in edited:
            _link_or_copy(src, target / rel)
    for rel, text in edited.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text(text)
    return target
