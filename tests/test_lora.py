"""LoRA adapters in peft's saved format, merged at load (`Model.from_pretrained(..., adapter=)`).

The reference merges as peft does (`peft/tuners/lora/layer.py`: `LoraLayer.update_layer` sets
`scaling = lora_alpha / r`, or `lora_alpha / math.sqrt(r)` with `use_rslora`; `Linear.get_delta_weight`
returns `transpose(weight_B @ weight_A, fan_in_fan_out) * scaling`, which `merge` adds to the base
weight; `rank_pattern` / `alpha_pattern` override r / alpha for matching module names), in float64,
and runs the float64 forward of `reference.py` on the merged weights. Saved adapter keys follow
`get_peft_model_state_dict`: `base_model.model.{module}.lora_A.weight` / `.lora_B.weight`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import glm2rs
from reference import forward, random_config, random_weights, write_checkpoint

ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
IDS = [64790, 64792] + [int(x) for x in np.random.default_rng(3).integers(3, 64000, size=29)]


def modules(cfg, targets):
    """The modules peft's `target_modules` select (a module whose name ends with a target)."""
    out = []
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        for m in (f"{p}.self_attention.query_key_value", f"{p}.self_attention.dense",
                  f"{p}.mlp.dense_h_to_4h", f"{p}.mlp.dense_4h_to_h"):
            if m.rsplit(".", 1)[-1] in targets:
                out.append(m)
    return out


def make_adapter(d, cfg, weights, targets, r, alpha, *, rslora=False, seed=0, rank_pattern=None,
                 alpha_pattern=None, key=".weight", extra_config=None, bias=False):
    """An adapter directory in peft's format; returns the weights merged as peft merges them."""
    rng = np.random.default_rng(seed)
    tensors, merged = {}, {k: v.astype(np.float64) for k, v in weights.items()}
    for m in modules(cfg, targets):
        w = weights[m + ".weight"]
        name = m.rsplit(".", 1)[-1]
        rr = (rank_pattern or {}).get(name, r)
        aa = (alpha_pattern or {}).get(name, alpha)
        a = (rng.standard_normal((rr, w.shape[1])) * 0.1).astype(np.float32)
        b = (rng.standard_normal((w.shape[0], rr)) * 0.1).astype(np.float32)
        tensors[f"base_model.model.{m}.lora_A{key}"] = a
        tensors[f"base_model.model.{m}.lora_B{key}"] = b
        scaling = aa / np.sqrt(rr) if rslora else aa / rr
        merged[m + ".weight"] = merged[m + ".weight"] + scaling * (b.astype(np.float64) @ a.astype(np.float64))
        if bias and m + ".bias" in weights:  # `bias="lora_only"`: the trained bias replaces the base one
            tensors[f"base_model.model.{m}.bias"] = (rng.standard_normal(w.shape[0]) * 0.2).astype(np.float32)
            merged[m + ".bias"] = tensors[f"base_model.model.{m}.bias"].astype(np.float64)
    d.mkdir(parents=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": targets, "fan_in_fan_out": False, "bias": "none", "use_rslora": rslora,
              "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
              "lora_dropout": 0.05, "base_model_name_or_path": "THUDM/chatglm2-6b"}
    config.update(extra_config or {})
    (d / "adapter_config.json").write_text(json.dumps(config))
    return merged


@pytest.fixture(scope="module")
def base(tmp_path_factory, fx):
    cfg = random_config()
    w = random_weights(cfg, seed=11)
    d = write_checkpoint(tmp_path_factory.mktemp("lora") / "base", cfg, w, fx / "model" / "tokenizer.model")
    return cfg, w, d


@pytest.mark.parametrize("case", [
    dict(targets=ALL, r=4, alpha=8),
    dict(targets=["query_key_value", "dense"], r=2, alpha=16, rslora=True),
    dict(targets=ALL, r=4, alpha=8, rank_pattern={"dense_4h_to_h": 2}, alpha_pattern={"query_key_value": 32}),
    dict(targets=["dense_h_to_4h"], r=3, alpha=3, key=".default.weight"),  # older peft's saved keys
    dict(targets=ALL, r=4, alpha=8, extra_config={"fan_in_fan_out": True}),  # peft resets it for nn.Linear
    dict(targets=["query_key_value"], r=2, alpha=4, bias=True, extra_config={"bias": "lora_only"}),
], ids=["all-modules", "rslora", "patterns", "default-keys", "fan_in_fan_out", "trained-bias"])
def test_adapter_gives_the_merged_model(tmp_path, base, case):
    cfg, w, d = base
    case = dict(case)
    merged = make_adapter(tmp_path / "adapter", cfg, w, case.pop("targets"), case.pop("r"), case.pop("alpha"), **case)
    m = glm2rs.Model.from_pretrained(str(d), dtype="float32", adapter=str(tmp_path / "adapter"), progress=False)
    got = m.logits(IDS)
    want = forward(cfg, merged, IDS)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, err
    # the adapter changed the model: the base weights alone are far from it
    plain = glm2rs.Model.from_pretrained(str(d), dtype="float32", progress=False).logits(IDS)
    assert np.abs(plain - want).max() / np.abs(want).max() > 100 * max(err, 1e-7)


def test_adapter_merges_before_quantization(tmp_path, base, fx):
    """quantize= applies to the merged weights: the same as quantizing a checkpoint merged
    beforehand (float32, so both quantize the same values up to float32 rounding)."""
    cfg, w, d = base
    merged = make_adapter(tmp_path / "adapter", cfg, w, ALL, 4, 8)
    md = write_checkpoint(tmp_path / "merged", cfg, {k: v.astype(np.float32) for k, v in merged.items()},
                         fx / "model" / "tokenizer.model")
    for q in ("8", "q8_0"):
        got = glm2rs.Model.from_pretrained(str(d), dtype="float32", quantize=q, adapter=str(tmp_path / "adapter"),
                                           progress=False).logits(IDS)
        want = glm2rs.Model.from_pretrained(str(md), dtype="float32", quantize=q, progress=False).logits(IDS)
        plain = glm2rs.Model.from_pretrained(str(d), dtype="float32", quantize=q, progress=False).logits(IDS)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() / scale < 2e-3, q
        assert np.abs(plain - want).max() / scale > 2e-2, q


def test_adapters_that_do_not_fit_are_clear_errors(tmp_path, base, fx):
    cfg, w, d = base
    load = lambda model, a: glm2rs.Model.from_pretrained(str(model), dtype="float32", adapter=str(a), progress=False)
    # no adapter_config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(glm2rs.Glm2Error, match="adapter_config.json"):
        load(d, tmp_path / "empty")
    # another peft method
    make_adapter(tmp_path / "prefix", cfg, w, ALL, 4, 8, extra_config={"peft_type": "PREFIX_TUNING"})
    with pytest.raises(glm2rs.Glm2Error, match="PREFIX_TUNING"):
        load(d, tmp_path / "prefix")
    make_adapter(tmp_path / "dora", cfg, w, ALL, 4, 8, extra_config={"use_dora": True})
    with pytest.raises(glm2rs.Glm2Error, match="DoRA"):
        load(d, tmp_path / "dora")
    # made for a deeper model: layer 5 does not exist here
    deep = random_config(num_layers=6)
    make_adapter(tmp_path / "deep", deep, random_weights(deep, seed=1), ["dense"], 2, 4)
    with pytest.raises(glm2rs.Glm2Error, match="does not have.*layers.5.self_attention.dense"):
        load(d, tmp_path / "deep")
    # made for other shapes
    wide = random_config(hidden_size=64)
    make_adapter(tmp_path / "wide", wide, random_weights(wide, seed=2), ["dense_4h_to_h"], 2, 4)
    with pytest.raises(glm2rs.Glm2Error, match="dense_4h_to_h"):
        load(d, tmp_path / "wide")
    # rank in the config different from the matrices
    make_adapter(tmp_path / "rank", cfg, w, ["dense"], 2, 4, extra_config={"r": 8})
    with pytest.raises(glm2rs.Glm2Error, match="rank 8"):
        load(d, tmp_path / "rank")
    # quantized checkpoints: the official int8 layout, and a quantized GGUF
    make_adapter(tmp_path / "ok", cfg, w, ALL, 2, 4)
    with pytest.raises(glm2rs.Glm2Error, match="stores quantized"):
        load(fx / "model-int8", tmp_path / "ok")
    g = tmp_path / "m.gguf"
    glm2rs.Model.from_pretrained(str(d), dtype="float32", quantize="q8_0", progress=False).save_quantized(str(g))
    with pytest.raises(glm2rs.Glm2Error, match="float checkpoint"):
        load(g, tmp_path / "ok")
    # and the same adapter loads on its base model
    load(d, tmp_path / "ok")
