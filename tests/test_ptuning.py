"""P-Tuning v2 prefixes: the official fixture checkpoint and generated ones against float64."""

from __future__ import annotations

import json

import numpy as np
import pytest

import glm2rs
from reference import forward, prefix_kv, random_config, random_prefix, random_weights, write_checkpoint


def test_fixture_prefix_matches_official(fx):
    golden = json.loads((fx / "golden" / "ptuning.json").read_text())
    want = np.load(fx / "golden" / "ptuning_logits.npy").reshape(-1)
    m = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32",
                                     prefix_checkpoint=str(fx / "ptuning-checkpoint"))
    got = m.logits(golden["prompt_ids"])[-1]
    assert np.abs(got - want).max() < 1e-4
    tok = m.tokenizer
    ids = tok.encode(tok.build_prompt(golden["greedy_query"]))
    assert m.generate_ids(ids, max_new_tokens=len(golden["greedy_output_ids"])) == golden["greedy_output_ids"]
    # the prefix changes the answer, and a chat session carries it through turns
    plain = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32")
    assert np.abs(plain.logits(golden["prompt_ids"])[-1] - got).max() > 1e-3
    s = m.start_chat()
    first = "".join(s.send(golden["greedy_query"], do_sample=False, max_new_tokens=24))
    assert first == tok.decode(golden["greedy_output_ids"]).strip()


@pytest.mark.parametrize("projection", [False, True])
def test_generated_prefix_matches_float64_reference(tmp_path, fx, projection):
    cfg = random_config()
    w = random_weights(cfg, seed=3)
    d = write_checkpoint(tmp_path / "base", cfg, w, fx / "model" / "tokenizer.model")
    pre = 5
    pw = random_prefix(cfg, pre, projection)
    pdir = tmp_path / "ptuning"
    pdir.mkdir()
    (pdir / "config.json").write_text(json.dumps(dict(cfg, pre_seq_len=pre, prefix_projection=projection)))
    from safetensors.numpy import save_file

    save_file(pw, str(pdir / "model.safetensors"))
    m = glm2rs.Model.from_pretrained(str(d), dtype="float32", prefix_checkpoint=str(pdir))
    ids = [64790, 64792] + list(np.random.default_rng(2).integers(3, 64000, size=20))
    want = forward(cfg, w, ids, prefix=prefix_kv(cfg, pw, projection))
    got = m.logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_prefix_of_another_model_is_a_clear_error(tmp_path, fx):
    cfg = random_config()
    d = write_checkpoint(tmp_path / "base", cfg, random_weights(cfg), fx / "model" / "tokenizer.model")
    with pytest.raises(glm2rs.ConfigError, match="does not fit"):
        glm2rs.Model.from_pretrained(str(d), prefix_checkpoint=str(fx / "ptuning-checkpoint"))
    with pytest.raises(glm2rs.LoadError):
        glm2rs.Model.from_pretrained(str(d), prefix_checkpoint=str(tmp_path / "nope"))


def test_prefix_on_a_quantized_model(fx):
    golden = json.loads((fx / "golden" / "ptuning.json").read_text())
    pdir = str(fx / "ptuning-checkpoint")
    official = glm2rs.Model.from_pretrained(str(fx / "model-int8"), dtype="float32", prefix_checkpoint=pdir)
    on_load = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", quantize=8, prefix_checkpoint=pdir)
    bare = glm2rs.Model.from_pretrained(str(fx / "model-int8"), dtype="float32")
    a = official.logits(golden["prompt_ids"])
    assert np.array_equal(a, on_load.logits(golden["prompt_ids"]))
    assert np.abs(a - bare.logits(golden["prompt_ids"])).max() > 1e-3
    # close to the float model with the same prefix
    f = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=pdir)
    assert np.abs(a - f.logits(golden["prompt_ids"])).max() < 0.5
