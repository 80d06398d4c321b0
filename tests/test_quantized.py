"""Official INT8/INT4 checkpoints: parity with the official dequantized computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import glm2rs


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_official_quantized_checkpoint(fx, bits):
    golden = json.loads((fx / "golden" / "quantized.json").read_text())[bits]
    want = np.load(fx / "golden" / f"{bits}_last_logits.npy").reshape(-1)
    m = glm2rs.Model.from_pretrained(str(fx / f"model-{bits}"), dtype="float32")
    assert m.config["quantization_bit"] == int(bits[3:])
    got = m.logits(golden["prompt_ids"])[-1]
    assert np.abs(got - want).max() < 1e-3
    tok = m.tokenizer
    ids = tok.encode(tok.build_prompt(golden["greedy_query"]))
    assert m.generate_ids(ids, max_new_tokens=len(golden["greedy_output_ids"])) == golden["greedy_output_ids"]
    # batched prefill (blocked matmul) and single-row decode (streaming kernel) agree
    step = m.logits(golden["prompt_ids"][:5])[-1]
    assert np.abs(step - m.logits(golden["prompt_ids"][:5])[-1]).max() == 0


def test_quantized_differs_from_float_but_is_close(fx, model):
    golden = json.loads((fx / "golden" / "quantized.json").read_text())["int8"]
    q = glm2rs.Model.from_pretrained(str(fx / "model-int8"), dtype="float32")
    a, b = q.logits(golden["prompt_ids"]), model.logits(golden["prompt_ids"])
    assert 0 < np.abs(a - b).max() < 0.5
