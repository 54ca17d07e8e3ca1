"""A copy of the exported model repository with some config.pbtxt parameters changed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict


def repository_variant(source: Path, target: Path, parameters: Dict[str, Dict[str, str]]) -> Path:
    """Copy ``source`` to ``target`` (ONNX files hard-linked) and set ``parameters[model][key] = value``."""
    for src in Path(source).rglob("*"):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        dst = Path(target) / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".onnx":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
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
