"""Resolving a model name to a local directory: a path as is, a hub id through huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

from ._glm2rs import LoadError

#: Weight layouts in order of preference (only one is downloaded).
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repository id (`owner/name`) rather than a path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def resolve(name_or_path: str, revision: str | None = None) -> str:
    """A local directory (or GGUF file) for `name_or_path`: the path itself, or a hub snapshot.

    Only what glm2rs reads is downloaded: config and tokenizer files and one weight layout.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return str(path)
    if path.exists():
        raise LoadError(f"{name_or_path}: not a model directory")
    if not is_hub_id(name_or_path):
        raise LoadError(f"{name_or_path}: no such model directory (and not a hub id like 'THUDM/chatglm2-6b')")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise LoadError(f"{name_or_path}: loading from the hub needs huggingface_hub ({e})") from e
    try:
        files = set(HfApi().list_repo_files(name_or_path, revision=revision))
        weights = next((w for w in WEIGHT_FILES if w in files), None)
        if weights is None:
            raise LoadError(f"{name_or_path}: the repository has none of {', '.join(WEIGHT_FILES)}")
        if weights.endswith(".index.json"):
            stem = weights.split(".")[0]
            ext = ".safetensors" if "safetensors" in weights else ".bin"
            patterns = [weights, f"{stem}-*{ext}"]
        else:
            patterns = [weights]
        patterns += ["config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"]
        return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)
    except LoadError:
        raise
    except Exception as e:  # network, auth, unknown revision...
        raise LoadError(f"{name_or_path} (revision {revision or 'main'}): {e}") from e
