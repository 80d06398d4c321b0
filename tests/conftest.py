"""Shared fixtures: the reference checkpoint (GLM2RS_FIXTURES) and random checkpoints made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def fixtures_dir() -> Path | None:
    d = Path(os.environ.get("GLM2RS_FIXTURES", ROOT.parent / "shared" / "fixtures" / "tiny-glm2"))
    if (d / "golden").is_dir():
        return d
    if os.environ.get("CI") == "true":
        pytest.fail(f"fixtures not found at {d} (CI=true: a missing fixture is a failure)")
    return None


@pytest.fixture(scope="session")
def fx() -> Path:
    d = fixtures_dir()
    if d is None:
        pytest.skip("tiny-glm2 fixtures not found (set GLM2RS_FIXTURES)")
    return d


@pytest.fixture(scope="session")
def golden(fx):
    g = fx / "golden"
    return {
        "tokenizer": json.loads((g / "tokenizer.json").read_text()),
        "prompts": json.loads((g / "prompts.json").read_text()),
        "generate": json.loads((g / "generate.json").read_text()),
        "forward": dict(np.load(g / "forward.npz")),
    }


@pytest.fixture(scope="session")
def model(fx):
    import glm2rs

    return glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32")


@pytest.fixture(scope="session")
def glm3(fx):
    """The fixture read as a ChatGLM3 model (its tokenizer with the role tokens)."""
    import glm2rs

    return glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), dtype="float32", chat_format="chatglm3")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer
