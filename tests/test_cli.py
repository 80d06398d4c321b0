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


def test_serve_command_serves_and_stops_on_ctrl_c(fx):
    import json
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    # Ctrl-C is SIGINT; a test run started in the background (`cmd &` without job control) has
    # SIGINT ignored, which the child would inherit (and Python then leaves it ignored): restore it.
    p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "glm2rs.cli", "serve", "--model",
                          str(fx / "model"), "--port", str(port), "--api-key", "k"], stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stderr.readline()
        while "serving" not in line:
            assert p.poll() is None, "glm2rs serve exited"
            line = p.stderr.readline()
        assert f"127.0.0.1:{port}" in line
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
        models = json.load(urllib.request.urlopen(req, timeout=30))
        assert models["data"][0]["id"] == "model"
        # the real openai client against the real `glm2rs serve`: streamed text equals the whole
        openai = pytest.importorskip("openai")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        kw = dict(model="model", messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=12)
        whole = c.chat.completions.create(**kw)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                           if ch.choices)
        assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens == 12
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler dumps every thread on SIGABRT
            p.send_signal(signal.SIGABRT)
            p.wait(timeout=10)
            pytest.fail("glm2rs serve did not stop on SIGINT; its stderr:\n" + p.stderr.read()[-6000:])
        assert rc == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
    # a port in use is a clear error, exit status 1
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        sk.listen()
        busy = sk.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "serve", "--model", str(fx / "model"), "--port",
                            str(busy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen" in r.stderr


def test_bench_command(fx):
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "bench", "--model", str(fx / "model"), "--prompt-len", "16",
                        "--gen-len", "8", "--batch", "4", "--repeat", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "decode_tokens_per_s" in r.stdout and "batch 4: 32 tokens" in r.stdout


def test_serve_drains_and_exits_on_sigterm(fx):
    """SIGTERM (Docker, systemd, Kubernetes) stops the server as Ctrl-C does: a request in flight
    gets its whole answer, the process says it is stopping and exits 0 (before: killed at once)."""
    import json
    import signal
    import socket
    import threading
    import urllib.request

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "glm2rs.cli", "serve", "--model", str(fx / "model"), "--port",
                          str(port)], stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        while "serving" not in line:
            assert p.poll() is None, "glm2rs serve exited"
            line = p.stderr.readline()
        got = {}

        def ask():
            body = json.dumps({"prompt": "hello", "max_tokens": 64, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            got["r"] = json.load(urllib.request.urlopen(req, timeout=30))

        t = threading.Thread(target=ask)
        t.start()
        t.join(timeout=0.05)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
        t.join(timeout=30)
        assert rc == 0
        assert "stopping" in p.stderr.read()
        assert got["r"]["usage"]["completion_tokens"] >= 1
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
