"""Bad input gives a clear glm2rs.Glm2Error subclass, never a panic or a hang."""

from __future__ import annotations

import json
import shutil

import pytest

import glm2rs
from reference import random_config, random_weights, write_checkpoint


def copy_model(fx, tmp_path, sub="model"):
    d = tmp_path / sub
    shutil.copytree(fx / sub, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def test_hierarchy():
    for e in [glm2rs.LoadError, glm2rs.ConfigError, glm2rs.CheckpointError, glm2rs.TokenizerError,
              glm2rs.InvalidArgumentError]:
        assert issubclass(e, glm2rs.Glm2Error)


def test_wrong_path(tmp_path):
    with pytest.raises(glm2rs.LoadError, match="no such model directory"):
        glm2rs.Model.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(glm2rs.LoadError, match="config.json"):
        glm2rs.Model.from_pretrained(str(tmp_path / "empty"))


def test_truncated_bin_shard_names_the_file(fx, tmp_path):
    d = copy_model(fx, tmp_path)
    shard = d / "pytorch_model-00002-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(glm2rs.CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        glm2rs.Model.from_pretrained(str(d))


def test_missing_shard_names_the_file(fx, tmp_path):
    d = copy_model(fx, tmp_path)
    (d / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(glm2rs.CheckpointError, match="pytorch_model-00001-of-00002.bin.*missing"):
        glm2rs.Model.from_pretrained(str(d))


def test_truncated_safetensors(fx, tmp_path):
    d = copy_model(fx, tmp_path, "model-safetensors")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(glm2rs.CheckpointError, match="model.safetensors"):
        glm2rs.Model.from_pretrained(str(d))


def test_wrong_tensor_shape_names_the_tensor(fx, tmp_path):
    cfg = random_config()
    w = random_weights(cfg)
    w["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"] = w[
        "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"][:, :-1].copy()
    d = write_checkpoint(tmp_path / "m", cfg, w, fx / "model" / "tokenizer.model")
    with pytest.raises(glm2rs.CheckpointError, match=r"layers\.1\.mlp\.dense_4h_to_h\.weight.*shape"):
        glm2rs.Model.from_pretrained(str(d))


def test_missing_tensor_is_named(fx, tmp_path):
    cfg = random_config()
    w = random_weights(cfg)
    del w["transformer.encoder.final_layernorm.weight"]
    d = write_checkpoint(tmp_path / "m", cfg, w, fx / "model" / "tokenizer.model")
    with pytest.raises(glm2rs.CheckpointError, match="final_layernorm.weight"):
        glm2rs.Model.from_pretrained(str(d))


@pytest.mark.parametrize(
    "key,value",
    [("rmsnorm", False), ("original_rope", False), ("quantization_bit", 3), ("multi_query_group_num", 3),
     ("num_layers", "two")],
)
def test_unsupported_config_values_name_the_key(fx, tmp_path, key, value):
    d = copy_model(fx, tmp_path, "model-safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(glm2rs.ConfigError, match=key if key != "num_layers" else "invalid type"):
        glm2rs.Model.from_pretrained(str(d))


def test_broken_tokenizer_model(fx, tmp_path):
    d = copy_model(fx, tmp_path, "model-safetensors")
    (d / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(glm2rs.TokenizerError):
        glm2rs.Model.from_pretrained(str(d))


def test_prompt_longer_than_context(fx, tmp_path):
    cfg = random_config(seq_length=32)
    d = write_checkpoint(tmp_path / "m", cfg, random_weights(cfg), fx / "model" / "tokenizer.model")
    m = glm2rs.Model.from_pretrained(str(d))
    long_ids = [64790, 64792] + [100] * 40
    with pytest.raises(glm2rs.InvalidArgumentError, match="context"):
        m.generate_ids(long_ids, max_new_tokens=4)
    with pytest.raises(glm2rs.InvalidArgumentError, match="context"):
        m.logits(long_ids)
    with pytest.raises(glm2rs.InvalidArgumentError, match="context"):
        m.stream("word " * 100)
    # near the end of the context, generation stops with "length" instead of failing
    s = m.stream("hi", max_new_tokens=1000)
    assert len("".join(s)) >= 0 and s.finish_reason in ("length", "stop")
    assert len(s.token_ids) <= 32


@pytest.mark.parametrize(
    "kw",
    [
        dict(do_sample=True, temperature=0.0),
        dict(do_sample=True, top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(max_new_tokens=-1),
        dict(max_new_tokens=0),
        dict(top_k=-3),
        dict(max_length=3),
        dict(stop=""),
        dict(stop=5),
        dict(stop_token_ids=[-1]),
        dict(temperature="hot"),
        dict(do_sample="yes"),
        dict(max_new_tokens=2.5),
        dict(top_k=True),
        dict(seed=-1),
        dict(unknown_keyword=1),
    ],
)
def test_bad_generation_arguments(model, tokenizer, kw):
    ids = tokenizer.encode(tokenizer.build_prompt("你好"))
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.generate_ids(ids, **kw)


def test_bad_ids(model):
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.logits([])
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.logits([-5])
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.logits([70000])
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.tokenizer.decode([-1])


@pytest.mark.parametrize("kw", [dict(device="tpu"), dict(device="cuda:x"), dict(dtype="int3"),
                                dict(chat_format="llama")])
def test_bad_load_arguments(fx, kw):
    with pytest.raises(glm2rs.InvalidArgumentError):
        glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), **kw)


def test_cuda_device_without_cuda_build_is_a_clear_error(fx):
    """The CPU wheel asked for a GPU says what to install instead (issue #18's newcomer items)."""
    with pytest.raises(glm2rs.InvalidArgumentError, match="no CUDA support.*CUDA wheel"):
        glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), device="cuda")
    with pytest.raises(glm2rs.InvalidArgumentError, match="no Metal support"):
        glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), device="metal")


def test_cuda_memory_needs_a_cuda_device_and_build():
    with pytest.raises(glm2rs.InvalidArgumentError, match="CUDA device"):
        glm2rs.cuda_memory("cpu")
    with pytest.raises(glm2rs.InvalidArgumentError):
        glm2rs.cuda_memory("cuda:x")
    try:
        m = glm2rs.cuda_memory("cuda")
    except glm2rs.InvalidArgumentError as e:  # a CPU build says so
        assert "CUDA" in str(e)
    else:  # a CUDA build reports the pool
        assert set(m) == {"used", "used_peak", "reserved", "reserved_peak"}
        assert m["used_peak"] >= m["used"] and m["reserved"] >= m["used"]
