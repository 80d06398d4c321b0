"""`glm2rs ray-serve`: starts a local Ray instance, serves, and stops it on Ctrl-C (its own file:
it runs after test_ray.py has shut its cluster down, so the two Ray instances never overlap)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from conftest import free_port, start_cli

try:
    import ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the machine
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"ray[serve] is not installed ({e}); test.sh installs it") from e
    pytest.skip(f"ray[serve] cannot be imported here ({e}): pip install 'glm2rs[ray]'", allow_module_level=True)


def start_ray_serve(args: list[str], env: dict | None = None):
    """`glm2rs ray-serve ARGS` in a child process, once it says it serves: (process, that line)."""
    return start_cli(["ray-serve", *args], "glm2rs on Ray Serve", env=env)


def test_ray_serve_command_serves_and_stops_on_ctrl_c(fx):
    port = free_port()
    p, line = start_ray_serve(["--model", str(fx / "model"), "--replicas", "1", "--port", str(port),
                               "--api-key", "k", "--dtype", "float32", "--no-prefix-routing"])
    try:
        assert f"127.0.0.1:{port}" in line
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "model", "max_tokens": 6, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "你好"}]}).encode(),
                                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
        r = json.load(urllib.request.urlopen(req, timeout=60))
        assert r["usage"]["completion_tokens"] == 6 and r["model"] == "model"
        # streamed, straight from the replica (no ingress): the same text in SSE events, then [DONE]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "model", "max_tokens": 6, "temperature": 0,
                                                      "stream": True,
                                                      "messages": [{"role": "user", "content": "你好"}]}).encode(),
                                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if json.loads(e)["choices"])
        assert text == r["choices"][0]["message"]["content"]
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()


def test_ray_serve_help_and_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "glm2rs.cli", "ray-serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--replicas" in out.stdout and "--address" in out.stdout
    out = subprocess.run([sys.executable, "-m", "glm2rs.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert "ray-serve" in out.stdout
    out = subprocess.run([sys.executable, "-m", "glm2rs.cli", "ray-serve", "--model", "x", "--replicas", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "replicas must be at least 1" in out.stderr


def test_ray_serve_joins_a_running_cluster_and_leaves_it_running(fx):
    """`--address`: deploy onto a cluster started by `ray start --head`; Ctrl-C removes the
    application, and the cluster keeps running."""
    import shutil

    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, port = free_port(), free_port()
    env = dict(os.environ)
    subprocess.run([ray_cli, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120, env=env)
    p = None
    try:
        p, line = start_ray_serve(["--model", str(fx / "model"), "--replicas", "1", "--port", str(port),
                                   "--address", "auto"], env)
        assert "removes the application" in line
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60))
        assert models["data"][0]["id"] == "model"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0
        # the cluster is still up, without the application
        st = subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(address='auto'); "
                             "print(ray.cluster_resources()['CPU'], sorted(serve.status().applications))"],
                            capture_output=True, text=True, timeout=60, env=env)
        assert st.returncode == 0 and st.stdout.split() == ["2.0", "[]"], (st.stdout, st.stderr[-2000:])
    finally:
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            p.stderr.close()
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
