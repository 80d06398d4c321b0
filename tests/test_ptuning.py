"""P-Tuning v2 prefixes: the official fixture checkpoints (with and without `prefix_projection`)
against the official implementation's goldens, generated ones against the float64 reference
(itself checked against those goldens first), in chats, quantized models and the server."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import glm2rs
from reference import (
    dequantize_official,
    forward,
    load_torch_bin,
    prefix_kv,
    random_config,
    random_prefix,
    random_weights,
    write_checkpoint,
)

# (checkpoint dir, golden json, golden last-position logits, prefix_projection)
CASES = {
    "plain": ("ptuning-checkpoint", "ptuning.json", "ptuning_logits.npy", False),
    "projection": ("ptuning-checkpoint-projection", "ptuning_projection.json", "ptuning_projection_logits.npy", True),
}


def case(fx, name):
    d, gj, gl, proj = CASES[name]
    return fx / d, json.loads((fx / "golden" / gj).read_text()), np.load(fx / "golden" / gl).reshape(-1), proj


@pytest.mark.parametrize("name", CASES)
def test_reference_itself_matches_the_official_goldens(fx, name):
    """The float64 reference that judges generated prefixes below must first agree with what the
    official code computed, so that it cannot share a misreading of the layout with glm2rs."""
    pdir, golden, want, proj = case(fx, name)
    cfg = json.loads((fx / "model" / "config.json").read_text())
    w = {}
    for f in sorted((fx / "model").glob("pytorch_model-*.bin")):
        w.update(load_torch_bin(f))
    kv = prefix_kv(cfg, load_torch_bin(pdir / "pytorch_model.bin"), proj)
    assert kv.shape[1] == golden["pre_seq_len"]
    got = forward(cfg, w, golden["prompt_ids"], prefix=kv)[-1]
    assert np.abs(got - want).max() < 1e-4
    # and the first greedy id, which the 0.02 top-1 margin of the fixture makes exact
    assert int(got.argmax()) == golden["greedy_output_ids"][0]


@pytest.mark.parametrize("name", CASES)
def test_fixture_prefixes_match_official(fx, name):
    pdir, golden, want, _ = case(fx, name)
    m = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=str(pdir))
    got = m.logits(golden["prompt_ids"])[-1]
    assert np.abs(got - want).max() < 1e-4
    tok = m.tokenizer
    ids = tok.encode(tok.build_prompt(golden["greedy_query"]))
    assert ids == golden["prompt_ids"]
    n = len(golden["greedy_output_ids"])
    assert m.generate_ids(ids, max_new_tokens=n) == golden["greedy_output_ids"]
    # a chat session carries the prefix through its turns: turn 1 is the official answer, and
    # turn 2 (which reuses the session's cache) equals a fresh run over the session's ids
    s = m.start_chat()
    first = "".join(s.send(golden["greedy_query"], do_sample=False, max_new_tokens=n))
    assert first == tok.decode(golden["greedy_output_ids"]).strip()
    before = s.token_ids + tok.encode("\n\n[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答：", add_special_tokens=False)[1:]
    second = "".join(s.send("晚上睡不着应该怎么办", do_sample=False, max_new_tokens=8))
    fresh = m.generate_ids(before, max_new_tokens=8)
    assert s.token_ids[: len(before)] == before
    assert second == tok.decode(fresh).strip()


def test_fixture_prefix_is_served_in_every_new_cache(fx):
    """The server puts the prefix in front of every request's cache: sequential and concurrent
    greedy requests all give the official answer."""
    openai = pytest.importorskip("openai")
    pdir, golden, _, _ = case(fx, "projection")
    m = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=str(pdir))
    n = len(golden["greedy_output_ids"])
    want = m.tokenizer.decode(golden["greedy_output_ids"]).strip()
    with glm2rs.Server(m, port=0, model_name="tiny") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask():
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": golden["greedy_query"]}],
                                          temperature=0, max_tokens=n)
            return r.choices[0].message.content, r.usage.prompt_tokens

        assert ask() == (want, len(golden["prompt_ids"]))
        assert ask() == (want, len(golden["prompt_ids"]))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(lambda _: ask(), range(4))) == [(want, len(golden["prompt_ids"]))] * 4


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
    cfg = random_config()  # kv_size = 2 layers x 12 kv_channels x 3 groups x 2 = 144, hidden 48
    d = write_checkpoint(tmp_path / "base", cfg, random_weights(cfg), fx / "model" / "tokenizer.model")
    emb = "transformer.prefix_encoder.embedding.weight"
    for name, shape in [("plain", "[8, 64]"), ("projection", "[5, 64]")]:
        with pytest.raises(glm2rs.ConfigError) as e:
            glm2rs.Model.from_pretrained(str(d), prefix_checkpoint=str(case(fx, name)[0]))
        msg = str(e.value)
        pre = shape[1]
        assert "does not fit" in msg and emb in msg and shape in msg, msg
        assert f"expected [{pre}, 144]" in msg and "kv_size" in msg and "hidden_size 48" in msg, msg
    with pytest.raises(glm2rs.LoadError):
        glm2rs.Model.from_pretrained(str(d), prefix_checkpoint=str(tmp_path / "nope"))


def test_prefix_in_neither_layout_names_the_tensor(tmp_path, fx):
    """A projection prefix laid out as the first-generation ChatGLM-6B encoder (trans.0 hidden ->
    hidden), or missing a tensor, is refused on the fixture model (kv_size 64, hidden 32)."""
    from safetensors.numpy import save_file

    cfg = json.loads((fx / "model" / "config.json").read_text())
    good = random_prefix(cfg, 5, True)
    first_gen = dict(good, **{"transformer.prefix_encoder.trans.0.weight": good["transformer.prefix_encoder.trans.0.weight"][:, :32].copy()})
    missing = {k: v for k, v in good.items() if not k.endswith("trans.2.bias")}
    for i, (weights, needle) in enumerate([
        (first_gen, "transformer.prefix_encoder.trans.0.weight is [32, 32], expected [32, 64]"),
        (missing, "transformer.prefix_encoder.trans.2.bias is missing, expected [64]"),
    ]):
        pdir = tmp_path / f"p{i}"
        pdir.mkdir()
        (pdir / "config.json").write_text(json.dumps(dict(cfg, pre_seq_len=5, prefix_projection=True)))
        save_file(weights, str(pdir / "model.safetensors"))
        with pytest.raises(glm2rs.ConfigError, match=re.escape(needle)):
            glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=str(pdir))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("bits", [8, 4])
def test_prefix_on_a_quantized_model(fx, name, bits):
    pdir, golden, _, proj = case(fx, name)
    ids = golden["prompt_ids"]
    official = glm2rs.Model.from_pretrained(str(fx / f"model-int{bits}"), dtype="float32", prefix_checkpoint=str(pdir))
    on_load = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", quantize=bits, prefix_checkpoint=str(pdir))
    bare = glm2rs.Model.from_pretrained(str(fx / f"model-int{bits}"), dtype="float32")
    a = official.logits(ids)
    # quantize= on load gives the official quantized weights bit for bit, the prefix included
    assert np.array_equal(a, on_load.logits(ids))
    assert np.abs(a - bare.logits(ids)).max() > 1e-3
    # the float64 reference on the official dequantized weights: first checked against the
    # official quantized golden (no prefix), then with the prefix against glm2rs
    cfg = json.loads((fx / f"model-int{bits}" / "config.json").read_text())
    w = dequantize_official(load_torch_bin(fx / f"model-int{bits}" / "pytorch_model.bin"), bits)
    q = json.loads((fx / "golden" / "quantized.json").read_text())[f"int{bits}"]
    want_bare = np.load(fx / "golden" / f"int{bits}_last_logits.npy").reshape(-1)
    assert np.abs(forward(cfg, w, q["prompt_ids"])[-1] - want_bare).max() < 1e-4
    want = forward(cfg, w, ids, prefix=prefix_kv(cfg, load_torch_bin(pdir / "pytorch_model.bin"), proj))
    assert np.abs(a - want).max() < 1e-4


@pytest.mark.parametrize("name", ["plain", "projection"])
def test_prefix_cache_with_a_ptuning_prefix(fx, name):
    """With a P-Tuning prefix in front (not a multiple of the block size), a repeated prompt is
    served from the prefix cache (its blocks hold prefix and prompt entries) and still gives the
    official answer."""
    pdir, golden, _, _ = case(fx, name)
    m = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=str(pdir),
                                     kv_block_size=16)
    ids = golden["prompt_ids"]
    n = len(golden["greedy_output_ids"])
    for round in range(2):
        s = m.stream_ids(ids, max_new_tokens=n, do_sample=False)
        list(s)
        assert s.token_ids == golden["greedy_output_ids"]
        if round == 1:
            assert s.cached_tokens > 0
