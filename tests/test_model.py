"""glm2rs.Model: golden parity on tiny-glm2 and float64 parity on random checkpoints of other shapes."""

from __future__ import annotations

import numpy as np
import pytest

import glm2rs
from reference import forward, random_config, random_weights, write_checkpoint


@pytest.mark.parametrize("subdir", ["model", "model-safetensors"])
def test_logits_match_official(fx, golden, subdir):
    m = glm2rs.Model.from_pretrained(str(fx / subdir), dtype="float32")
    assert m.dtype == "float32"
    fw = golden["forward"]
    for i in range(3):
        ids = [int(x) for x in fw[f"ids_{i}"].reshape(-1)]
        want = fw[f"logits_{i}"]
        got = m.logits(ids)
        assert got.dtype == np.float32 and got.shape == (len(ids), 65024)
        if want.shape[0] == 1:
            got = got[-1:]
        assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("subdir", ["model", "model-safetensors"])
def test_greedy_chat_ids_match_official(fx, golden, subdir):
    m = glm2rs.Model.from_pretrained(str(fx / subdir), dtype="float32")
    tok = m.tokenizer
    for turn in golden["generate"]["chat"]:
        prompt = tok.build_prompt(turn["query"], [tuple(h) for h in turn["history"]])
        ids = tok.encode(prompt)
        out = m.generate_ids(ids, max_new_tokens=turn["max_new_tokens"], do_sample=False)
        assert out == turn["output_ids"]
        assert tok.decode(out).strip() == turn["response"]


def test_config_is_a_dict_with_every_key(model, fx):
    import json

    cfg = model.config
    on_disk = json.loads((fx / "model" / "config.json").read_text())
    assert cfg == on_disk
    assert cfg["multi_query_group_num"] == 2


@pytest.mark.parametrize(
    "over",
    [
        {},  # 3 KV groups, projection 72 != hidden 48
        {"multi_query_group_num": 1, "num_layers": 3},  # one KV group
        {"multi_query_attention": False, "num_attention_heads": 4, "kv_channels": 8},  # no MQA
        {"rope_ratio": 16.0},  # chatglm2-6b-32k style positions
        {"rope_ratio": 50.0, "_chatglm3": True},  # chatglm3-6b-32k: the base scaled instead
        {"rope_ratio": 500.0, "_chatglm3": True, "seq_length": 131072},  # chatglm3-6b-128k
        {"apply_residual_connection_post_layernorm": True, "post_layer_norm": False},
    ],
)
def test_random_checkpoint_matches_float64_reference(tmp_path, fx, over):
    cfg = random_config(**over)
    w = random_weights(cfg, seed=len(over))
    d = write_checkpoint(tmp_path / "m", cfg, w, fx / "model" / "tokenizer.model", shards=2)
    fmt = "chatglm3" if cfg.get("_chatglm3") else None  # a ChatGLM3 tokenizer, so ChatGLM3's code
    m = glm2rs.Model.from_pretrained(str(d), dtype="float32", chat_format=fmt)
    ids = [64790, 64792] + list(np.random.default_rng(1).integers(3, 64000, size=37))
    got = m.logits(ids)
    want = forward(cfg, w, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, err
    # generation with the cache agrees with the reference argmax at every step
    out = m.generate_ids(ids[:20], max_new_tokens=6)
    seq = ids[:20]
    for tok in out:
        ref = forward(cfg, w, seq)[-1]
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 1e-3:  # skip near-ties
            assert tok == int(np.argmax(ref))
        seq = seq + [tok]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_close_to_float32(model, fx, dtype):
    m = glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), dtype=dtype)
    assert m.dtype == dtype
    ids = model.tokenizer.encode(model.tokenizer.build_prompt("晚上睡不着应该怎么办"))
    a, b = m.logits(ids), model.logits(ids)
    assert np.isfinite(a).all()
    tol = 0.05 if dtype == "float16" else 0.3
    assert np.abs(a - b).max() < tol * max(1.0, np.abs(b).max())
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_auto_dtype_on_cpu_is_float32_for_small_models(model):
    assert model.dtype == "float32"
    assert model.device == "cpu"


def test_generate_joins_stream(model, tokenizer):
    p = tokenizer.build_prompt("你好")
    text = model.generate(p, max_new_tokens=24)
    ids = model.generate_ids(tokenizer.encode(p), max_new_tokens=24)
    assert text == tokenizer.decode(ids)
    assert "".join(model.stream(p, max_new_tokens=24)) == text


def test_sampling_is_reproducible_with_seed(model, tokenizer):
    ids = tokenizer.encode(tokenizer.build_prompt("你好"))
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.8, top_k=50)
    a = model.generate_ids(ids, seed=1, **kw)
    assert a == model.generate_ids(ids, seed=1, **kw)
    others = [model.generate_ids(ids, seed=s, **kw) for s in range(2, 6)]
    assert any(o != a for o in others)
    greedy = model.generate_ids(ids, max_new_tokens=16)
    assert any(o != greedy for o in others + [a])


def test_max_length_counts_prompt_and_output(model, tokenizer):
    ids = tokenizer.encode(tokenizer.build_prompt("你好"))
    out = model.generate_ids(ids, max_length=len(ids) + 5)
    assert len(out) == 5
    out = model.generate_ids(ids, max_new_tokens=3, max_length=len(ids) + 10)
    assert len(out) == 3


def test_eos_and_stop_ids_end_generation(model, tokenizer):
    ids = tokenizer.encode(tokenizer.build_prompt("你好"))
    free = model.generate_ids(ids, max_new_tokens=10)
    stop_at = free[3]
    out = model.generate_ids(ids, max_new_tokens=10, stop_token_ids=[stop_at])
    assert out == free[: free.index(stop_at) + 1]


def test_stop_strings_cut_the_text(model, tokenizer):
    p = tokenizer.build_prompt("你好")
    full = model.generate(p, max_new_tokens=24)
    stop = full[8:12]
    cut = model.generate(p, max_new_tokens=24, stop=stop)
    assert cut == full[: full.index(stop)]
    s = model.stream(p, max_new_tokens=24, stop=[stop, "never-there"])
    assert "".join(s) == cut
    assert s.finish_reason == "stop"


def test_tuning_switches_and_with_tuning(model, fx):
    """One typed set of switches: the model reports them; `with_tuning` shares the weights with
    other step-time switches (same numbers on CPU, where they choose nothing) and leaves the
    original as it was."""
    t = model.tuning
    assert t["fused"] == "true" and t["flash"] == "true" and t["cuda_graph"] == "true"
    other = model.with_tuning(cuda_graph=False, flash=False)
    assert other.tuning["cuda_graph"] == "false" and other.tuning["flash"] == "false"
    assert t["split_decode"] == "true" and model.with_tuning(split_decode=False).tuning["split_decode"] == "false"
    assert other.tuning["fused"] == "true" and model.tuning == t
    ids = model.tokenizer.encode("你好")
    assert np.array_equal(model.logits(ids), other.logits(ids))


@pytest.mark.parametrize("env, key, want", [
    ({"GLM2RS_FUSED": "off"}, "fused", "false"),
    ({"GLM2RS_NO_VNNI": "0"}, "vnni", "true"),  # "0" is off for every variable
    ({"GLM2RS_NO_VNNI": "1"}, "vnni", "false"),
    ({"GLM2RS_DEQUANTIZE": "0"}, "dequantize", "false"),
    ({"GLM2RS_GEMVQ": "dp4a"}, "gemvq", "dp4a"),
    ({"GLM2RS_FUSED": "maybe"}, "fused", "true"),  # unknown value: default, with a warning
])
def test_tuning_comes_from_the_environment_once(fx, env, key, want):
    import os
    import subprocess
    import sys

    code = ("import glm2rs; m = glm2rs.Model.from_pretrained(%r, dtype='float32', progress=False); "
            "print(m.tuning[%r])" % (str(fx / "model"), key))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    if "maybe" in env.values():
        assert "GLM2RS_FUSED" in r.stderr and "ignoring" in r.stderr


def test_hub_is_resolved_in_python_before_the_extension(fx, monkeypatch):
    """from_pretrained resolves names through glm2rs.hub, then loads the local path; the extension
    itself never calls back into the package."""
    import glm2rs.hub

    seen = []
    monkeypatch.setattr(glm2rs.hub, "resolve", lambda name, revision=None: seen.append((name, revision)) or str(fx / "model"))
    m = glm2rs.Model.from_pretrained("THUDM/chatglm2-6b", revision="v1", dtype="float32")
    assert seen == [("THUDM/chatglm2-6b", "v1")] and m.config["num_layers"] == 2

    def boom(*a, **k):
        raise AssertionError("the extension called glm2rs.hub")

    monkeypatch.setattr(glm2rs.hub, "resolve", boom)
    assert glm2rs.Model._from_local(str(fx / "model"), dtype="float32").config["num_layers"] == 2
