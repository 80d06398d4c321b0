"""glm2rs.Tokenizer: identical to the official tokenizer on every fixture case."""

from __future__ import annotations

import glm2rs


def test_every_fixture_case(tokenizer, golden):
    cases = golden["tokenizer"]
    assert len(cases) == 327
    bad = []
    for c in cases:
        if (
            tokenizer.encode(c["text"]) != c["input_ids"]
            or tokenizer.encode(c["text"], add_special_tokens=False) != c["ids_no_special"]
            or tokenizer.decode(c["ids_no_special"]) != c["decoded"]
        ):
            bad.append(c["text"])
    assert not bad, bad[:10]


def test_prompts(tokenizer, golden):
    for p in golden["prompts"]:
        prompt = tokenizer.build_prompt(p["query"], [tuple(h) for h in p["history"]])
        assert prompt == p["prompt"]
        assert tokenizer.encode(prompt) == p["input_ids"]


def test_special_tokens(tokenizer):
    assert [tokenizer.special_id(t) for t in ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]] == list(
        range(64789, 64794)
    )
    assert tokenizer.vocab_size == 64794
    # special tokens written in text are ordinary text, as in the official tokenizer
    ids = tokenizer.encode("[gMASK]sop", add_special_tokens=False)
    assert 64790 not in ids and 64792 not in ids
    # special ids and ids beyond the tokenizer (the model's padded vocabulary) decode to ""
    assert tokenizer.decode([64790, 64792, 2, 65000]) == ""


def test_chatglm3_role_tokens(fx):
    tok = glm2rs.Tokenizer.from_file(str(fx / "model" / "tokenizer.model"), chatglm3=True)
    assert [tok.special_id(t) for t in ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]] == [
        64794,
        64795,
        64796,
        64797,
    ]


def test_saved_tokenizer_json_encodes_identically(tokenizer, golden, tmp_path):
    tokenizers = __import__("tokenizers")
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    hf = tokenizers.Tokenizer.from_file(str(path))
    for c in golden["tokenizer"]:
        assert hf.encode(c["text"]).ids == c["input_ids"], c["text"]
        assert hf.encode(c["text"], add_special_tokens=False).ids == c["ids_no_special"]
