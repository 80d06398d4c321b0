"""GGUF that llama.cpp reads, and llama.cpp's GGUF that glm2rs reads, proved against llama.cpp
itself (`llama-cpp-python`, which builds llama.cpp from source; `test.sh` installs it).

glm2rs -> llama.cpp: `save_quantized` writes llama.cpp's `chatglm` layout (see src/gguf/llama.rs);
llama.cpp loads each file (dense float32, q8_0, q4_0, q4k and the official int8/int4 checkpoints)
and computes on the fixture's prompt the logits glm2rs computes from the same file, with the same
greedy continuation; its tokenizer (built from the file's token list) splits the golden texts as
the official tokenizer does.

llama.cpp -> glm2rs: see test_llamacpp_converter_file_runs_in_glm2rs (the converter itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import glm2rs
from conftest import fixtures_dir  # noqa: F401 (the fx fixture comes from conftest)

llama_cpp = pytest.importorskip("llama_cpp") if not __import__("os").environ.get("CI") else __import__("llama_cpp")


def llama(path, **kw):
    # float32 KV cache: llama.cpp's default f16 cache rounds the keys and values glm2rs keeps in float32
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                           type_k=0, type_v=0, **kw)


def llama_greedy(ll, ids, n):
    out = []
    for t in ll.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("src,quantize,tol", [
    ("model", None, 1e-4),
    ("model", "q8_0", 1e-4),
    ("model", "q4_0", 1e-4),
    ("model", "q4k", 1e-4),
    # official rows become Q8_0/Q4_0 blocks (the same weights); llama.cpp quantizes the
    # activations to 8 bits for those products, glm2rs multiplies them in float32
    ("model-int8", None, 0.5),
    ("model-int4", None, 0.5),
])
def test_llamacpp_runs_glm2rs_gguf(fx, golden, tmp_path, src, quantize, tol):
    ids = golden["prompts"][1]["input_ids"]
    m = glm2rs.Model.from_pretrained(fx / src, dtype="float32", quantize=quantize)
    path = tmp_path / "m.gguf"
    m.save_quantized(str(path))
    back = glm2rs.Model.from_pretrained(path, dtype="float32")
    mine = back.logits(ids)
    assert np.abs(mine - m.logits(ids)).max() == 0  # glm2rs reads its own file back exactly
    ll = llama(path)
    ll.eval(ids)
    theirs = np.array(ll.scores[: len(ids)])
    assert np.abs(theirs - mine).max() < tol
    # the same choice at every position, or (official rows) a near tie within the tolerance
    pick = theirs.argmax(1)
    assert all(mine[i, pick[i]] >= mine[i].max() - tol for i in range(len(ids)))
    if tol < 1e-3:
        assert (pick == mine.argmax(1)).all()
    assert llama_greedy(ll, ids, 16) == back.generate_ids(ids, max_new_tokens=16)


@pytest.mark.parametrize("chat_format", ["chatglm2", "chatglm3"])
def test_llamacpp_tokenizer_from_glm2rs_gguf(fx, golden, tmp_path, chat_format):
    m = glm2rs.Model.from_pretrained(fx / "model", chat_format=chat_format)
    path = tmp_path / "m.gguf"
    m.save_quantized(str(path))
    ll = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    cases = golden["tokenizer"]
    # llama.cpp reads the literal text "sop" as the control token (the official tokenizer: as text)
    plain = [c for c in cases if "sop" not in c["text"]]
    assert len(plain) > 300
    for c in plain:
        assert ll.tokenize(c["text"].encode(), add_bos=False, special=False) == c["ids_no_special"], c["text"]
        text = ll.detokenize(c["ids_no_special"]).decode("utf-8", "replace")
        assert text.removeprefix(" ") == c["decoded"], c["text"]  # llama.cpp keeps the first piece's space
    roles = [ll.tokenize(r.encode(), add_bos=False, special=True) for r in ["<|user|>", "<|assistant|>"]]
    if chat_format == "chatglm3":
        assert roles == [[64795], [64796]]
    else:
        assert all(len(r) > 1 for r in roles)  # ChatGLM2 has no role tokens


def test_llamacpp_converter_file_runs_in_glm2rs(fx, golden, tmp_path):
    """A file as llama.cpp's converter writes it for ChatGLM3 (tests/llamacpp_convert.py, checked
    against the digest of the real converter's file), run by glm2rs: the official model's logits,
    ChatGLM3's tokenizer (role tokens) and the same answers as llama.cpp from that file."""
    from llamacpp_convert import convert, digest

    path = tmp_path / "conv.gguf"
    convert(fx / "model-safetensors", path)
    recorded = Path(__file__).parent / "data" / "llamacpp_converter.json"
    assert digest(path) == json.loads(recorded.read_text())["digest"]
    m = glm2rs.Model.from_pretrained(path, dtype="float32")
    assert m.chat_format == "chatglm3" and m.quantization is None
    fwd = golden["forward"]
    got = m.logits([int(x) for x in fwd["ids_0"]])
    assert np.abs(got - fwd["logits_0"]).max() < 1e-4
    for c in golden["tokenizer"]:
        assert m.tokenizer.encode(c["text"], add_special_tokens=False) == c["ids_no_special"], c["text"]
        assert m.tokenizer.decode(c["ids_no_special"]) == c["decoded"]
    assert m.tokenizer.encode("<|user|>", add_special_tokens=False) != [64795]  # text stays text
    ids = golden["prompts"][1]["input_ids"]
    ll = llama(path)
    assert llama_greedy(ll, ids, 16) == m.generate_ids(ids, max_new_tokens=16)
    # and a GGUF of another model family is refused with the reason
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(glm2rs.CheckpointError, match="general.architecture is \"llama\""):
        glm2rs.Model.from_pretrained(tmp_path / "llama.gguf")
