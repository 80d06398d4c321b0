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
    with pytest.raises(glm2rs.LoadError, match="network unreachable"):
        glm2rs.Model.from_pretrained("THUDM/chatglm2-6b", revision="main")
