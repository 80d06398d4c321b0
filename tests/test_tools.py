"""OpenAI `tools` on `/v1/chat/completions` (issue #19), driven by the `openai` client.

The prompt the server builds is checked token by token against THUDM/ChatGLM3's format, written
out here from the official code:
- `openai_api_demo/utils.py` `process_chatglm_messages`: with tools, a first system message
  `"Answer the following questions as best as you can. You have access to the following tools:"`
  carrying them replaces the client's first system message; a `function` (tool) message becomes an
  `observation` turn; an assistant function call becomes an assistant turn with the tool's name as
  metadata;
- `tokenization_chatglm.py` `build_chat_input`: `[gMASK] sop`, then per message
  `build_single_message(role, metadata, content)` = `<|role|>` + encode(metadata + "\\n") +
  encode(content), where a system message with tools has `content + "\\n" + json.dumps(tools,
  indent=4, ensure_ascii=False)`; the query last, then `<|assistant|>`.
Since the server's prompt ids are not returned, the check is the first generated token's
log-probabilities (top 5, float32) against `log_softmax(last_logits(official ids))`: any token of
the prompt that differed would change them; and `usage.prompt_tokens`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import glm2rs

import sys, os  # noqa: E401
sys.path.insert(0, os.path.dirname(__file__))  # tests/scripted.py

openai = pytest.importorskip("openai")

TOOLS = [{"type": "function", "function": {
    # keys deliberately not sorted: json.dumps keeps the client's order
    "name": "get_weather", "description": "查询某个城市的天气",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "城市名"}}}}}]
PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"


@pytest.fixture(scope="module")
def server3(glm3):
    with glm2rs.Server(glm3, port=0, model_name="glm3") as s:
        yield s


@pytest.fixture(scope="module")
def server(model):
    """A ChatGLM2 model's server."""
    with glm2rs.Server(model, port=0, model_name="m") as s:
        yield s


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)


def official_ids(tok, messages, tools=None, forced=None):
    """build_chat_input over process_chatglm_messages (see the module docstring)."""
    special = {r: tok.special_id(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")}

    def single(role, metadata, content):
        return [special[role]] + tok.encode(f"{metadata}\n", add_special_tokens=False) + \
            tok.encode(content, add_special_tokens=False)

    ids = [tok.special_id("[gMASK]"), tok.special_id("sop")]
    dropped = False
    if tools:
        functions = [t["function"] for t in tools]
        ids += single("system", "", PREAMBLE + "\n" + json.dumps(functions, indent=4, ensure_ascii=False))
    for m in messages:
        if tools and m["role"] == "system" and not dropped:
            dropped = True
            continue
        if m["role"] == "tool":
            ids += single("observation", "", m["content"])
        elif m["role"] == "assistant" and m.get("tool_calls"):
            for c in m["tool_calls"]:
                args = json.loads(c["function"]["arguments"])
                kw = ", ".join(f"{k}={v!r}" for k, v in args.items())
                ids += single("assistant", c["function"]["name"], f"```python\ntool_call({kw})\n```")
        else:
            ids += single(m["role"], "", m["content"])
    ids.append(special["assistant"])
    if forced:
        ids += tok.encode(f"{forced}\n", add_special_tokens=False)
    return ids


def first_token_check(glm3, s, messages, **kw):
    r = client(s).chat.completions.create(model="glm3", messages=messages, temperature=0, max_tokens=1,
                                          logprobs=True, top_logprobs=5, **kw)
    want_ids = official_ids(glm3.tokenizer, messages, kw.get("tools") if kw.get("tool_choice") != "none" else None,
                            (kw.get("tool_choice") or {}).get("function", {}).get("name")
                            if isinstance(kw.get("tool_choice"), dict) else None)
    assert r.usage.prompt_tokens == len(want_ids)
    logits = glm3.last_logits([want_ids])[0].astype(np.float64)
    lsm = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    top = np.argsort(-lsm)[:5]
    got = r.choices[0].logprobs.content[0].top_logprobs
    assert [t.logprob for t in got] == pytest.approx([lsm[i] for i in top], abs=1e-4)
    return r


def test_tools_prompt_is_chatglm3s_format(glm3, server3):
    msgs = [{"role": "system", "content": "replaced by the tools turn"},
            {"role": "user", "content": "北京今天天气怎么样？"}]
    first_token_check(glm3, server3, msgs, tools=TOOLS)
    # a whole round: the call, its result as the last message
    msgs += [{"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 12, "sky": "晴"}'}]
    first_token_check(glm3, server3, msgs, tools=TOOLS)


def test_tool_choice_none_and_named(glm3, server3):
    msgs = [{"role": "user", "content": "北京今天天气怎么样？"}]
    # "none": the tools stay out of the prompt
    first_token_check(glm3, server3, msgs, tools=TOOLS, tool_choice="none")
    # a named function: its name is written as the answer's first line
    first_token_check(glm3, server3, msgs, tools=TOOLS,
                      tool_choice={"type": "function", "function": {"name": "get_weather"}})


def test_bad_tools_are_400s_naming_the_field(server3, server):
    c = client(server3)
    msgs = [{"role": "user", "content": "hi"}]
    for kw, param in [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="glm3", messages=msgs, max_tokens=2, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
    with pytest.raises(openai.BadRequestError, match="tool call needs function.name"):
        c.chat.completions.create(model="glm3", max_tokens=2, messages=[
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            {"role": "user", "content": "hi"}])
    # a ChatGLM2 model has no tool format
    with pytest.raises(openai.BadRequestError, match="ChatGLM3") as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=msgs, tools=TOOLS, max_tokens=2)
    assert e.value.body["param"] == "tools"


def test_a_plain_answer_with_tools_streams_as_text(glm3, server3):
    """With tools the model may answer in text: streamed and whole agree, no tool_calls."""
    c = client(server3)
    kw = dict(model="glm3", messages=[{"role": "user", "content": "你好"}], tools=TOOLS, temperature=0,
              max_tokens=12)
    whole = c.chat.completions.create(**kw)
    parts, finish, calls = [], None, []
    for ev in c.chat.completions.create(stream=True, **kw):
        if ev.choices:
            d = ev.choices[0].delta
            parts.append(d.content or "")
            calls += d.tool_calls or []
            finish = ev.choices[0].finish_reason or finish
    m = whole.choices[0].message
    assert finish == whole.choices[0].finish_reason
    if m.tool_calls:  # the random model's first lines happened to look like a call: both say so alike
        assert calls and calls[0].function.name == m.tool_calls[0].function.name
        assert "".join(c.function.arguments or "" for c in calls) == m.tool_calls[0].function.arguments
    else:
        assert "".join(parts) == m.content and not calls


# --- a model that calls the tool: a scripted checkpoint (tests/scripted.py) of the real architecture
# whose greedy answers are this call, and after the tool's result, this text

QUESTION = "北京今天天气怎么样？"
RESULT = '{"sky": "晴", "temperature": 12}'
CALL = "get_weather\n```python\ntool_call(city='北京')\n```"
ANSWER = "北京晴，12度。"


@pytest.fixture(scope="module")
def caller(fx, tmp_path_factory, glm3):
    import scripted

    tok = glm3.tokenizer
    a, obs, user = (tok.special_id(n) for n in ("<|assistant|>", "<|observation|>", "<|user|>"))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    call = enc(CALL)
    fence = call[call.index(enc("\n")[-1]) + 1]  # the fence's first token, as it follows a newline
    answer = enc("\n") + enc(ANSWER)  # an empty metadata line, then the text
    chains = [(enc(QUESTION)[-1], [a] + call, obs), (enc(RESULT)[-1], [a] + answer, user)]
    d = scripted.write(tmp_path_factory.mktemp("scripted"), fx, chains, fence, a)
    m = glm2rs.Model.from_pretrained(str(d), dtype="float32", chat_format="chatglm3")
    with glm2rs.Server(m, port=0, model_name="glm3") as s:
        s_dir = d
        yield type("Caller", (), {"url": s.url, "model_dir": s_dir})()


def test_tool_call_round_trip_with_the_openai_client(caller):
    c = client(caller)
    msgs = [{"role": "user", "content": QUESTION}]
    r = c.chat.completions.create(model="glm3", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    # streamed: the call's id, type and name first, then its arguments; the same call
    deltas, finish = [], None
    for ev in c.chat.completions.create(model="glm3", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64,
                                        stream=True):
        if ev.choices:
            assert not ev.choices[0].delta.content
            deltas += ev.choices[0].delta.tool_calls or []
            finish = ev.choices[0].finish_reason or finish
    assert finish == "tool_calls" and deltas[0].function.name == "get_weather" and deltas[0].id
    assert all(d.index == 0 for d in deltas) and all(d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "北京"}
    # a named tool_choice: the model writes only the arguments
    r2 = c.chat.completions.create(model="glm3", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r2.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    # the result goes back as a tool message; the model answers in text
    msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    for stream in (False, True):
        if stream:
            text = "".join(ev.choices[0].delta.content or "" for ev in c.chat.completions.create(
                model="glm3", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64, stream=True)
                if ev.choices)
        else:
            r3 = c.chat.completions.create(model="glm3", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64)
            assert r3.choices[0].finish_reason == "stop" and not r3.choices[0].message.tool_calls
            text = r3.choices[0].message.content
        assert text == ANSWER


def test_a_session_with_tools_returns_the_call_and_takes_the_result(fx, tmp_path_factory, glm3, caller):
    """`start_chat(tools=...)`: the tools are the system turn (token by token the server's prompt
    for the same conversation), `ChatTurn.tool_call` is the call, `send(result, role="observation")`
    continues from the cached call."""
    m = glm2rs.Model.from_pretrained(str(caller.model_dir), dtype="float32", chat_format="chatglm3")
    tok = m.tokenizer
    s = m.start_chat(tools=TOOLS)
    turn = s.send(QUESTION, do_sample=False, max_new_tokens=64)
    "".join(turn)
    assert turn.tool_call is not None and turn.tool_call["name"] == "get_weather"
    assert json.loads(turn.tool_call["arguments"]) == {"city": "北京"}
    want = official_ids(tok, [{"role": "user", "content": QUESTION}], TOOLS)
    assert s.token_ids[: len(want)] == want
    h = s.history
    assert h[-1]["role"] == "assistant" and h[-1]["metadata"] == "get_weather"
    turn2 = s.send(RESULT, role="observation", do_sample=False, max_new_tokens=64)
    assert "".join(turn2) == ANSWER and turn2.tool_call is None
    # the observation turn continued the cache: <|observation|> + "\n" + the result, <|assistant|>
    obs = [tok.special_id("<|observation|>")] + tok.encode("\n", add_special_tokens=False) + \
        tok.encode(RESULT, add_special_tokens=False) + [tok.special_id("<|assistant|>")]
    n = s.token_ids.index(tok.special_id("<|observation|>"))
    assert s.token_ids[n: n + len(obs)] == obs
    with pytest.raises(glm2rs.InvalidArgumentError, match="tools or system"):
        m.start_chat(system="x", tools=TOOLS)
    with pytest.raises(glm2rs.InvalidArgumentError, match="role"):
        s.send("x", role="tool")
    with pytest.raises(glm2rs.InvalidArgumentError, match="ChatGLM3"):
        glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32").start_chat(tools=TOOLS)
