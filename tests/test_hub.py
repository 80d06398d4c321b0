"""glm2rs.hub: local paths as they are, hub ids through huggingface_hub with `revision`."""

from __future__ import annotations

import pytest

import glm2rs
from glm2rs import hub


def test_hub_ids_and_paths():
    assert hub.is_hub_id("THUDM/chatglm2-6b")
    for not_id in ["./model", "/abs/model", "~/m", "a/b/c", "model", "../x"]:
        assert not hub.is_hub_id(not_id), not_id


def test_local_dir_is_used_as_is(fx):
    assert hub.resolve(str(fx / "model")) == str(fx / "model")
    with pytest.raises(glm2rs.LoadError):
        hub.resolve(str(fx / "model" / "config.json"))


def test_hub_download_honours_revision_and_fetches_one_layout(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def list_repo_files(self, repo, revision=None):
            calls["list"] = (repo, revision)
            return ["config.json", "tokenizer.model", "pytorch_model.bin.index.json",
                    "pytorch_model-00001-of-00007.bin", "model.safetensors.index.json",
                    "model-00001-of-00007.safetensors", "modeling_chatglm.py"]

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls["snapshot"] = (repo, revision, allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(hub, "_unreachable", lambda *a, **k: None)  # this machine has no hub
    assert hub.resolve("THUDM/chatglm2-6b", revision="v1.0") == str(tmp_path)
    assert calls["list"] == ("THUDM/chatglm2-6b", "v1.0")
    repo, rev, patterns = calls["snapshot"]
    assert rev == "v1.0"
    assert "model.safetensors.index.json" in patterns and "model-*.safetensors" in patterns
    assert not any(p.endswith(".bin") for p in patterns)


def test_hub_failure_is_a_load_error(monkeypatch):
    import huggingface_hub

    class Offline:
        def list_repo_files(self, repo, revision=None):
            raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(hub, "_unreachable", lambda *a, **k: None)  # the host answers, the listing fails
    with pytest.raises(glm2rs.LoadError, match="network unreachable"):
        glm2rs.Model.from_pretrained("THUDM/chatglm2-6b", revision="main")


def _cache_with_fixture(fx, home):
    """A Hugging Face cache under `home` holding the fixture as `THUDM/chatglm2-6b` at main, laid
    out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    import shutil

    repo = home / "hub" / "models--THUDM--chatglm2-6b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    shutil.copytree(fx / "model", snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def _load_in_child(home, env_extra):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **env_extra)
    code = ("import glm2rs, time, warnings\n"
            "warnings.simplefilter('always')\n"
            "t = time.perf_counter()\n"
            "try:\n"
            "    m = glm2rs.Model.from_pretrained('THUDM/chatglm2-6b', dtype='float32')\n"
            "    print('LOADED', m.config['num_layers'], round(time.perf_counter() - t, 1))\n"
            "except glm2rs.Glm2Error as e:\n"
            "    print(type(e).__name__, e, round(time.perf_counter() - t, 1))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_cached_hub_model_loads_offline_and_without_network(fx, tmp_path):
    """A model already in the Hugging Face cache loads with HF_HUB_OFFLINE=1 (no network call) and,
    with a warning and no retries, when the hub cannot be reached (a closed local port as the
    endpoint); a model not in the cache fails at once with a LoadError that says what to do, offline
    or unreachable (issue #18)."""
    _cache_with_fixture(fx, tmp_path)
    r = _load_in_child(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert r.stdout.startswith("LOADED 2"), r.stdout + r.stderr
    r = _load_in_child(tmp_path, {"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.stdout.startswith("LOADED 2"), r.stdout + r.stderr
    assert "cannot be reached" in r.stderr and "cached snapshot" in r.stderr
    assert float(r.stdout.split()[-1]) < 5  # no 25 s of retries
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _load_in_child(empty, {"HF_HUB_OFFLINE": "1"})
    assert r.stdout.startswith("LoadError") and "HF_HUB_OFFLINE" in r.stdout, r.stdout + r.stderr
    assert float(r.stdout.split()[-1]) < 5
    r = _load_in_child(empty, {"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.stdout.startswith("LoadError") and "cannot be reached" in r.stdout and "local directory" in r.stdout
    assert float(r.stdout.split()[-1]) < 5


def test_a_proxy_leaves_the_reachability_to_huggingface_hub(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub._unreachable("http://127.0.0.1:9") is None
    monkeypatch.delenv("HTTPS_PROXY")
    for k in ("https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert hub._unreachable("http://127.0.0.1:9")  # refused
