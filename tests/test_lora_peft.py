"""LoRA adapters made by `peft` itself, against the official PyTorch model with them.

`tests/data/peft/` was written by `benches/peft_reference.py` (peft 0.21, torch 2.11, transformers
5.17; versions in reference.json): two adapters trained a few steps with peft's own LoRA modules
on the official `ChatGLMForConditionalGeneration` (THUDM's modeling_chatglm.py) loaded with the
fixture's `model/` weights, saved with `save_pretrained` (adapter-a as safetensors with every target
module; adapter-b as `adapter_model.bin` with rsLoRA, rank/alpha patterns and trained biases, which
peft saves as `{module}.base_layer.bias`), and what the official model computed with each after
`merge_and_unload()`: the last-position logits of prompt 1 and 16 greedy ids after prompt 0 (the
script also checked peft's unmerged forward against the merged one: 1e-5).

glm2rs must give those numbers both ways: merged at load (`adapter=`) and kept beside the
weights (`adapters=`), also with sequences of several adapters batched in one server."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import openai
import pytest

import glm2rs
from conftest import health

DATA = Path(__file__).parent / "data" / "peft"
REF = json.loads((DATA / "reference.json").read_text())
LOGITS = np.load(DATA / "reference.npz")
NAMES = ["adapter-a", "adapter-b"]


@pytest.fixture(scope="module")
def served(fx):
    """The base model with both adapters beside its weights."""
    return glm2rs.Model.from_pretrained(fx / "model", dtype="float32",
                                        adapters={n: str(DATA / n) for n in NAMES})


def test_reference_adapters_change_the_answer():
    # the check below means something: each adapter moves the official model's greedy answer
    greedy = [REF["base_greedy"]] + [REF["adapters"][n]["greedy"] for n in NAMES]
    assert len({tuple(g) for g in greedy}) == 3
    for n in NAMES:
        assert REF["adapters"][n]["unmerged_vs_merged_max_abs"] < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_merged_at_load_gives_the_official_logits(fx, name):
    m = glm2rs.Model.from_pretrained(fx / "model", dtype="float32", adapter=str(DATA / name))
    got = m.last_logits([REF["prompts"][1]])[0]
    want = LOGITS[f"{name}_merged_1"]
    assert np.abs(got - want).max() < 1e-4
    assert m.generate_ids(REF["prompts"][0], max_new_tokens=16) == REF["adapters"][name]["greedy"]


@pytest.mark.parametrize("name", NAMES)
def test_unmerged_gives_the_official_logits(served, name):
    view = served.with_adapter(name)
    assert view.adapter == name and served.adapter is None
    got = view.last_logits([REF["prompts"][1]])[0]
    assert np.abs(got - LOGITS[f"{name}_merged_1"]).max() < 1e-4
    # all positions of a prompt agree with the merged model too (the adapter touches every row)
    full = view.logits(REF["prompts"][1])
    assert np.abs(full[-1] - got).max() < 1e-5
    assert served.generate_ids(REF["prompts"][0], max_new_tokens=16, adapter=name) == REF["adapters"][name]["greedy"]
    assert view.generate_ids(REF["prompts"][0], max_new_tokens=16) == REF["adapters"][name]["greedy"]


def test_base_model_is_untouched_by_adapters_beside_it(served):
    assert served.adapters == NAMES
    assert served.generate_ids(REF["prompts"][0], max_new_tokens=16) == REF["base_greedy"]


def test_unknown_adapter_is_a_clear_error(served, fx):
    with pytest.raises(glm2rs.InvalidArgumentError, match='no adapter named "nope" .loaded: adapter-a, adapter-b.'):
        served.generate_ids([64790, 64792, 100], max_new_tokens=2, adapter="nope")
    with pytest.raises(glm2rs.InvalidArgumentError, match="no adapter named"):
        served.with_adapter("nope")
    with pytest.raises(glm2rs.LoadError, match="adapter_config.json: No such file"):
        glm2rs.Model.from_pretrained(fx / "model", adapters={"x": str(fx / "model")})


def test_chat_of_an_adapter_view(served, fx):
    """Chat (one call and a session, turn after turn on its cache) runs with the view's adapter:
    the answers of the model with the adapter merged at load."""
    merged = glm2rs.Model.from_pretrained(fx / "model", dtype="float32", adapter=str(DATA / "adapter-a"))
    view = served.with_adapter("adapter-a")
    kw = dict(max_new_tokens=8, do_sample=False)
    assert view.chat("你好", **kw)[0] == merged.chat("你好", **kw)[0] != served.chat("你好", **kw)[0]
    mine, theirs = view.start_chat(), merged.start_chat()
    for q in ["你好", "再说一遍"]:
        assert mine.chat(q, **kw) == theirs.chat(q, **kw)


def test_two_adapters_served_side_by_side_batched(served):
    """Requests naming adapter-a, adapter-b and the base model at once: each answer is that
    adapter's (the official greedy ids), and the decode steps were shared."""
    tok = served.tokenizer
    text = tok.decode(REF["prompts"][0][2:])  # the ids after [gMASK] sop
    assert tok.encode(text) == REF["prompts"][0]
    want = {n: tok.decode(REF["adapters"][n]["greedy"]) for n in NAMES}
    want["tiny"] = tok.decode(REF["base_greedy"])
    with glm2rs.Server(served, port=0, model_name="tiny", max_batch=16) as s:
        cl = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in cl.models.list().data] == ["tiny"] + NAMES
        order = ["adapter-a", "adapter-b", "tiny"] * 4
        out: list = [None] * len(order)

        def run(i):
            r = cl.completions.create(model=order[i], prompt=text, temperature=0, max_tokens=16)
            out[i] = (r.model, r.choices[0].text)

        steps0 = health(s)["steps"]
        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(order))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        steps = health(s)["steps"] - steps0
        for name, got in zip(order, out):
            assert got == (name, want[name])
        assert steps < len(order) * 16 / 2, steps
        # streamed chat with an adapter names it, and a misspelt adapter is refused, not served by the base
        chunks = list(cl.chat.completions.create(model="adapter-b", messages=[{"role": "user", "content": "你好"}],
                                                 temperature=0, max_tokens=4, stream=True))
        assert {c.model for c in chunks} == {"adapter-b"}
        with pytest.raises(openai.NotFoundError, match="adapter-c"):
            cl.completions.create(model="adapter-c", prompt=text, max_tokens=2)


def test_serve_command_lora_modules(fx):
    """`glm2rs serve --lora-modules NAME=DIR ...` (vLLM's flag): the adapters are models of the server."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port, start_cli

    port = free_port()
    mods = [f"{n}={DATA / n}" for n in NAMES]
    p, _ = start_cli(["serve", "--model", str(fx / "model"), "--dtype", "float32", "--port", str(port),
                      "--lora-modules", *mods], "serving")
    try:
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30))
        assert [(m["id"], m["parent"]) for m in models["data"]] == [("model", None)] + [(n, "model") for n in NAMES]
        cl = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        tok = glm2rs.Model.from_pretrained(fx / "model").tokenizer
        r = cl.completions.create(model="adapter-b", prompt=tok.decode(REF["prompts"][0][2:]), temperature=0,
                                  max_tokens=16)
        assert r.choices[0].text == tok.decode(REF["adapters"]["adapter-b"]["greedy"])
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
    for bad, msg in [("adapter-a", "wants NAME=DIR"), (f"x={fx / 'model'}", "adapter_config.json")]:
        r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "serve", "--model", str(fx / "model"),
                            "--lora-modules", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and msg in r.stderr, r.stderr
