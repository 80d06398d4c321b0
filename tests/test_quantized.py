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


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_reproduces_the_official_checkpoint(fx, bits):
    golden = json.loads((fx / "golden" / "quantized.json").read_text())[f"int{bits}"]
    mine = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", quantize=bits)
    official = glm2rs.Model.from_pretrained(str(fx / f"model-int{bits}"), dtype="float32")
    assert mine.quantization == f"int{bits}"
    ids = golden["prompt_ids"]
    assert np.array_equal(mine.logits(ids), official.logits(ids))


@pytest.mark.parametrize("qtype", ["8", "4", "q8_0", "q4_0", "q4_1", "q5_0", "q4k"])
def test_save_and_load_back_gives_identical_logits(fx, tmp_path, qtype):
    m = glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), dtype="float32", quantize=qtype)
    ids = json.loads((fx / "golden" / "quantized.json").read_text())["int8"]["prompt_ids"]
    before = m.logits(ids)
    path = tmp_path / "m.gguf"
    m.save_quantized(str(path))
    back = glm2rs.Model.from_pretrained(str(path), dtype="float32")
    assert back.quantization == m.quantization
    assert back.config["num_layers"] == m.config["num_layers"]
    assert back.tokenizer.encode("你好👋 hello") == m.tokenizer.encode("你好👋 hello")
    assert np.array_equal(back.logits(ids), before)
    assert back.generate_ids(ids, max_new_tokens=8) == m.generate_ids(ids, max_new_tokens=8)
    # quantized weights are smaller than the float16 ones
    dense = glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), dtype="float16")
    assert m.weight_bytes < 2 * dense.weight_bytes


def test_quantize_errors(fx, tmp_path):
    with pytest.raises(glm2rs.InvalidArgumentError, match="quantize"):
        glm2rs.Model.from_pretrained(str(fx / "model"), quantize="q3")
    with pytest.raises(glm2rs.InvalidArgumentError, match="already quantized"):
        glm2rs.Model.from_pretrained(str(fx / "model-int8"), quantize=4)
    m = glm2rs.Model.from_pretrained(str(fx / "model"), quantize="q4_0")
    path = tmp_path / "m.gguf"
    m.save_quantized(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(glm2rs.CheckpointError, match="m.gguf"):
        glm2rs.Model.from_pretrained(str(path)).logits([64790, 64792, 100])


def test_cli_quantize(fx, tmp_path):
    import subprocess
    import sys

    dst = tmp_path / "q.gguf"
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "quantize", str(fx / "model"), str(dst), "--type", "q4_0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and dst.exists()
    m = glm2rs.Model.from_pretrained(str(dst))
    assert m.quantization == "q4_0"
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "quantize", str(fx / "model"), str(dst), "--type", "bad"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "quantize" in r.stderr
