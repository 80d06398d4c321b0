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


def start_cli(args: list[str], ready: str, *, env: dict | None = None, python_flags: tuple = ()):
    """`python -m glm2rs.cli ARGS` in a child process, once a line of its stderr contains `ready`:
    (process, that line). SIGINT is restored for it (a test run started in the background has it
    ignored, which the child would inherit); a child that ends first fails the test with its output."""
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, *python_flags, "-m", "glm2rs.cli", *args], stderr=subprocess.PIPE,
                         text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        while True:
            line = p.stderr.readline()
            lines.append(line)
            assert line or p.poll() is None, f"glm2rs {args[0]} exited:\n" + "".join(lines)[-4000:]
            if ready in line:
                return p, line
    except BaseException:
        p.kill()
        p.stderr.close()
        raise


def health(server) -> dict:
    """A running server's `/health` body."""
    import urllib.request

    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        return json.load(r)
