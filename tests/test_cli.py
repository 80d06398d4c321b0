"""The `glm2rs` command driven as a person would: the terminal chat through a pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import free_port, start_cli


def test_terminal_chat_ask_clear_stop(fx):
    pexpect = pytest.importorskip("pexpect") if os.environ.get("CI") != "true" else __import__("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "glm2rs.cli", "chat", "--model", str(fx / "model"),
                                           "--temperature", "0", "--max-new-tokens", "12"],
                          encoding="utf-8", timeout=60)
    try:
        child.expect("用户：")
        child.sendline("你好")
        child.expect(r"\[(\d+) tokens, first after [\d.]+ s, [\d.]+ tokens/s\]")
        # the answer's tokens only (the turn's prompt is about 17 more)
        assert 1 <= int(child.match.group(1)) <= 12, child.match.group(0)
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


def test_version_and_help_with_defaults():
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "--version"], capture_output=True, text=True)
    import glm2rs

    assert r.returncode == 0 and r.stdout.strip() == f"glm2rs {glm2rs.__version__}"
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "(default: 128)" in r.stdout and "(default: cpu)" in r.stdout and '"cuda:N"' in r.stdout


def test_turn_stats_count_the_answer_and_time_the_decode():
    from glm2rs.cli import turn_stats

    assert turn_stats(10.0, 11.0, 13.0, 5) == "[5 tokens, first after 1.00 s, 2.00 tokens/s]"
    assert turn_stats(10.0, 10.5, 10.5, 1) == "[1 tokens, first after 0.50 s, 0.00 tokens/s]"
    assert turn_stats(10.0, None, 12.0, 0) == "[0 tokens in 2.00 s]"


def test_terminal_chat_ends_on_ctrl_d(fx):
    p = subprocess.run([sys.executable, "-m", "glm2rs.cli", "chat", "--model", str(fx / "model")], input="",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "glm2rs chat" in p.stdout


def test_serve_command_serves_and_stops_on_ctrl_c(fx):
    import json
    import signal
    import socket
    import urllib.request

    port = free_port()
    # Ctrl-C is SIGINT (start_cli restores it for the child)
    p, line = start_cli(["serve", "--model", str(fx / "model"), "--port", str(port), "--api-key", "k"], "serving",
                        python_flags=("-X", "faulthandler"))
    try:
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
    import threading
    import urllib.request

    port = free_port()
    p, _ = start_cli(["serve", "--model", str(fx / "model"), "--port", str(port)], "serving")
    try:
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


def test_progress_in_a_log_is_plain_lines(fx):
    """Loading progress and the bench's per-run counter redraw with `\\r` on a terminal only: into
    a pipe or log file they write whole lines (issue #18's newcomer items)."""
    code = ("import glm2rs\n"
            f"glm2rs.Model.from_pretrained({str(fx / 'model')!r}, dtype='float32', progress=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].split()[-1].split("/")[0] == lines[-1].split()[-1].split("/")[1], lines
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "bench", "--model", str(fx / "model"), "--prompt-len", "8",
                        "--gen-len", "4", "--repeat", "1", "--batch", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "decode_tokens_per_s" in r.stdout


def test_doctor_says_what_this_installation_can_use():
    import glm2rs

    info = glm2rs.build_info()
    assert info["version"] == glm2rs.__version__
    assert "python" in info["features"] and isinstance(info["cpu"], list)
    if "cuda" not in info["features"]:
        assert "no CUDA support" in info["cuda_problem"] and info["gpus"] == []
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "doctor"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"glm2rs {glm2rs.__version__}" in r.stdout and "CUDA:" in r.stdout and "CPU extensions" in r.stdout
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        assert "sse4.2" in r.stdout  # every x86-64 this wheel runs on has it
