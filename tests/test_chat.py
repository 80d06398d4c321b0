"""Chat: the official chat on the fixture, sessions that reuse the KV cache, ChatGLM3 prompts."""

from __future__ import annotations

import threading

import pytest

import glm2rs
from reference import random_config, random_weights, write_checkpoint


def test_chat_reproduces_official_greedy_responses(model, golden):
    for turn in golden["generate"]["chat"]:
        history = [tuple(h) for h in turn["history"]]
        response, new_history = model.chat(turn["query"], history, do_sample=False, max_new_tokens=24)
        assert response == turn["response"]
        assert new_history == history + [(turn["query"], turn["response"])]


def test_stream_chat_deltas_join_to_the_chat_response(model, golden):
    turn = golden["generate"]["chat"][1]
    history = [tuple(h) for h in turn["history"]]
    s = model.stream_chat(turn["query"], history, do_sample=False, max_new_tokens=24)
    pieces = list(s)
    assert "".join(pieces) == turn["response"] == s.response
    assert s.history[-1] == (turn["query"], turn["response"])
    # deltas, not the cumulative text the official stream_chat yields
    assert len(pieces) > 1 and not pieces[-1].startswith(pieces[0] + pieces[1])


def test_session_turns_equal_fresh_runs_over_its_tokens(model, tokenizer):
    s = model.start_chat()
    first = "".join(s.send("你好", do_sample=False, max_new_tokens=8))
    ids1 = s.token_ids
    prompt1 = tokenizer.encode(tokenizer.build_prompt("你好", []))
    gen1 = model.generate_ids(prompt1, max_new_tokens=8)
    gen1_kept = gen1[:-1] if gen1[-1] == 2 else gen1
    assert ids1 == prompt1 + gen1_kept
    assert s.history == [("你好", first)]

    cont = tokenizer.encode("\n\n[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答：", add_special_tokens=False)[1:]
    before = ids1 + cont
    second = "".join(s.send("晚上睡不着应该怎么办", do_sample=False, max_new_tokens=8))
    ids2 = s.token_ids
    assert ids2[: len(before)] == before
    fresh = model.generate_ids(before, max_new_tokens=8)
    fresh_kept = fresh[:-1] if fresh[-1] == 2 else fresh
    assert ids2[len(before):] == fresh_kept
    assert second == tokenizer.decode(fresh).strip()
    assert [q for q, _ in s.history] == ["你好", "晚上睡不着应该怎么办"]
    s.reset()
    assert s.token_ids == [] and s.history == []


def test_closing_a_turn_early_keeps_what_was_said(model):
    s = model.start_chat()
    turn = s.send("Tell me a story.", do_sample=False, max_new_tokens=24)
    got = next(turn) + next(turn)
    turn.close()
    assert s.history[0][0] == "Tell me a story."
    assert s.history[0][1] == got.strip() or got.startswith(s.history[0][1])
    n = len(s.token_ids)
    "".join(s.send("And then?", do_sample=False, max_new_tokens=4))
    assert len(s.token_ids) > n


def test_long_conversations_drop_the_oldest_turns(fx, tmp_path):
    cfg = random_config(seq_length=96)
    d = write_checkpoint(tmp_path / "m", cfg, random_weights(cfg), fx / "model" / "tokenizer.model")
    m = glm2rs.Model.from_pretrained(str(d))
    s = m.start_chat()
    drops = 0
    for i in range(8):
        before = len(s.history)
        "".join(s.send(f"question number {i}", do_sample=False, max_new_tokens=10))
        assert len(s.token_ids) <= 96
        assert s.history[-1][0] == f"question number {i}"
        if len(s.history) <= before:
            drops += 1
            # re-encoded: the ids start with the full prompt of the kept history
            prompt = m.tokenizer.build_chat_input(s.history[-1][0], s.history[:-1])
            assert s.token_ids[: len(prompt)] == prompt
    assert drops >= 1
    with pytest.raises(glm2rs.InvalidArgumentError, match="context"):
        s.send("word " * 200, max_new_tokens=10)
    "".join(s.send("still works?", do_sample=False, max_new_tokens=4))


def test_two_sessions_in_two_threads(model):
    qs = ["你好", "Tell me a story."]
    want = []
    for q in qs:
        s = model.start_chat()
        want.append("".join(s.send(q, do_sample=False, max_new_tokens=16)))
    got = [None, None]

    def run(i):
        s = model.start_chat()
        got[i] = "".join(s.send(qs[i], do_sample=False, max_new_tokens=16))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert got == want


def test_chatglm2_has_no_system_role(model):
    with pytest.raises(glm2rs.InvalidArgumentError, match="system"):
        model.start_chat(system="You are helpful.")
    with pytest.raises(glm2rs.InvalidArgumentError, match="system"):
        model.chat("hi", [{"role": "system", "content": "You are helpful."}])


def test_chatglm3_prompt_ids(glm3):
    tok = glm3.tokenizer
    assert glm3.chat_format == "chatglm3"
    history = [
        {"role": "system", "content": "You are ChatGLM3."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好👋!"},
    ]
    ids = tok.build_chat_input("晚上睡不着应该怎么办", history)

    def msg(role_id, content):
        return [role_id] + tok.encode("\n", add_special_tokens=False) + tok.encode(content, add_special_tokens=False)

    want = [64790, 64792] + msg(64794, "You are ChatGLM3.") + msg(64795, "你好") + msg(64796, "你好👋!")
    want += msg(64795, "晚上睡不着应该怎么办") + [64796]
    assert ids == want


def test_chatglm3_session_with_system_prompt(glm3):
    tok = glm3.tokenizer
    s = glm3.start_chat(system="You are ChatGLM3.")
    reply = "".join(s.send("你好", do_sample=False, max_new_tokens=6))
    prompt = tok.build_chat_input("你好", [{"role": "system", "content": "You are ChatGLM3."}])
    assert s.token_ids[: len(prompt)] == prompt
    assert s.history[0] == {"role": "user", "content": "你好"}
    assert s.history[1]["role"] == "assistant" and s.history[1]["content"] == reply
    # the second turn continues with <|user|> ... <|assistant|>
    n = len(s.token_ids)
    "".join(s.send("再见", do_sample=False, max_new_tokens=4))
    cont = [64795] + tok.encode("\n", add_special_tokens=False) + tok.encode("再见", add_special_tokens=False) + [64796]
    assert s.token_ids[n : n + len(cont)] == cont
    # a one-shot chat takes dict history and returns it extended
    resp, hist = glm3.chat("再见", [{"role": "system", "content": "You are ChatGLM3."}], do_sample=False,
                           max_new_tokens=4)
    assert hist[-1]["role"] == "assistant" and hist[-1]["content"] == resp


def test_session_chat_returns_the_whole_response(model):
    a = model.start_chat()
    want = "".join(a.send("你好", do_sample=False, max_new_tokens=8))
    b = model.start_chat()
    assert b.chat("你好", do_sample=False, max_new_tokens=8) == want
    assert b.history == a.history and b.token_ids == a.token_ids
    assert model.tokenizer.eos_token_id == 2
