"""Write exported artifacts into a Triton model repository.

``model_repository/`` in the source tree holds each model's config.pbtxt and
its thin model.py adapter; the export adds the generated artifacts (ONNX
files, tokenizer files, pipeline.json) into each model's version folder. For
the NVIDIA tritonserver container a second repository is written where
text_encoder and vae_decoder run on Triton's own onnxruntime backend.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict

from nirvana.config import PipelineSpec

MODELS = ("tokenizer", "text_encoder", "latent_cache", "unet_loop", "vae_decoder", "txt2img", "cache_admin")
PIPELINE_MODELS = ("tokenizer", "text_encoder", "latent_cache", "unet_loop", "vae_decoder")
ONNX_BACKEND_MODELS = ("text_encoder", "vae_decoder")
CONTAINER_CONFIGS = Path(__file__).resolve().parent / "container"
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
    return target


def repository_variant(source: Path, target: Path, parameters: Dict[str, Dict[str, str]]) -> Path:
    """Copy ``source`` to ``target`` (ONNX files hard-linked) and set ``parameters[model][key] = value``.

    For runs with other model parameters (tests, soaks) that leave the committed configs alone.
    """
    for src in Path(source).rglob("*"):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        _link_or_copy(src, Path(target) / src.relative_to(source))
    for model, values in parameters.items():
        config = Path(target) / model / "config.pbtxt"
        text = config.read_text()
        for key, value in values.items():
            entry = f'{{ key: "{key}" value: {{ string_value: "{value}" }} }}'
            pattern = re.compile(r'\{ key: "' + re.escape(key) + r'" value: \{ string_value: "[^"]*" \} \}')
            if pattern.search(text):
                text = pattern.sub(entry, text)
            else:
                text = text.replace("parameters [\n", f"parameters [\n  {entry},\n", 1)
        config.write_text(text)
    return Path(target)
