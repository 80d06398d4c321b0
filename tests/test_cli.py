"""The `glm2rs` command driven as a person would: the terminal chat through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time


def read_until(fd, needle: str, timeout: float = 60.0) -> str:
    out = b""
    end = time.time() + timeout
    while needle.encode() not in out:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {out.decode(errors='replace')!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def test_terminal_chat_ask_clear_stop(fx):
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "glm2rs.cli", "chat", "--model", str(fx / "model"), "--temperature", "0",
                          "--max-new-tokens", "12"], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        read_until(master, "用户：")
        os.write(master, "你好\n".encode())
        text = read_until(master, "tokens/s]")
        assert "ChatGLM：" in text
        read_until(master, "用户：")
        os.write(master, b"clear\n")
        assert "clear" in read_until(master, "用户：")
        os.write(master, b"stop\n")
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_terminal_chat_ends_on_ctrl_d(fx):
    p = subprocess.run([sys.executable, "-m", "glm2rs.cli", "chat", "--model", str(fx / "model")], input="",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "glm2rs chat" in p.stdout
