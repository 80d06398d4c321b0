"""Resolving a model name to a local directory: a path as is, a hub id through huggingface_hub."""

from __future__ import annotations

import os
import warnings
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
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise LoadError(f"{name_or_path}: loading from the hub needs huggingface_hub ({e})") from e
    if constants.HF_HUB_OFFLINE:
        # as huggingface_hub does offline: the cache only, no network call at all
        return _from_cache(name_or_path, revision, "HF_HUB_OFFLINE is set", warn=False)
    unreachable = _unreachable(constants.ENDPOINT)
    if unreachable:
        # huggingface_hub would retry for about 25 s before giving up: decide now
        return _from_cache(name_or_path, revision,
                           f"the hub at {constants.ENDPOINT} cannot be reached ({unreachable})")
    try:
        files = set(huggingface_hub.HfApi().list_repo_files(name_or_path, revision=revision))
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
        return huggingface_hub.snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)
    except LoadError:
        raise
    except Exception as e:  # network, auth, unknown revision...
        # no network (or the hub down): a snapshot already in the cache still loads, as with
        # transformers; otherwise say both things that went wrong
        return _from_cache(name_or_path, revision, f"the hub could not serve it ({e})", cause=e)


def _from_cache(name: str, revision: str | None, problem: str, warn: bool = True,
                cause: BaseException | None = None) -> str:
    """The cached snapshot of `name` when the hub cannot serve it (`problem` says why; a warning
    says so when `warn`), or a LoadError saying both what went wrong and what to do."""
    cached = _cached(name, revision)
    if cached:
        if warn:
            warnings.warn(f"{name}: {problem}; using the cached snapshot {cached}", stacklevel=4)
        return cached
    raise LoadError(f"{name} (revision {revision or 'main'}): {problem}, and it is not in the Hugging Face cache: "
                    "download it once with network access (check the network or HF_ENDPOINT), or pass a local "
                    "directory") from cause


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why the hub's host cannot be reached (no such host, connection refused, no answer within
    `timeout` s), or None when a TCP connection opens (or the endpoint is not a URL we can probe)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    if not u.hostname:
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None  # through a proxy the host is not reached directly: let huggingface_hub try
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        return str(e) or type(e).__name__
    return None


def _cached(name: str, revision: str | None) -> str | None:
    """The cached snapshot of `name` at `revision` if it holds a config and one weight layout."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no cache): None
        return None
    if (d / "config.json").is_file() and any((d / w).is_file() for w in WEIGHT_FILES):
        return str(d)
    return None
