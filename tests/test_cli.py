"""The `glm2rs` command driven as a person would: the terminal chat through a pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_terminal_chat_ask_clear_stop(fx):
    pexpect = pytest.importorskip("pexpect") if os.environ.get("CI") != "true" else __import__("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "glm2rs.cli", "chat", "--model", str(fx / "model"),
                                           "--temperature", "0", "--max-new-tokens", "12"],
                          encoding="utf-8", timeout=60)
    try:
        child.expect("用户：")
        child.sendline("你好")
        child.expect(r"tokens/s\]")
        assert "ChatGLM：" in child.before
        child.expect("用户：")
        child.sendline("clear")
        child.expect("empties the history")
        child.expect("用户：")
        child.sendline("stop")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_terminal_chat_ends_on_ctrl_d(fx):
    p = subprocess.run([sys.executable, "-m", "glm2rs.cli", "chat", "--model", str(fx / "model")], input="",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "glm2rs chat" in p.stdout
