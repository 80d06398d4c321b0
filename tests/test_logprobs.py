"""Log-probabilities (issue #19): each generated token's logprob is log_softmax of the model's
logits at that step (`Model.logits` of the ids so far), the alternatives sorted and of the asked
size; the same numbers from Python, and in OpenAI's shapes from the server (chat `logprobs` /
`top_logprobs`, completions' integer `logprobs`), streamed or not."""

from __future__ import annotations

import numpy as np
import pytest

import glm2rs


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def check_against_logits(model, prompt_ids, gen_ids, lps, k):
    assert len(lps) == len(gen_ids)
    for i, (tok, lp) in enumerate(zip(gen_ids, lps)):
        ref = log_softmax(model.logits(prompt_ids + gen_ids[:i])[-1])
        assert lp["token"] == tok
        assert abs(lp["logprob"] - ref[tok]) < 1e-4
        top = lp["top_logprobs"]
        assert len(top) == k
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        want = np.argsort(-ref, kind="stable")[:k]
        assert [t for t, _ in top] == [int(t) for t in want]
        for t, p in top:
            assert abs(p - ref[t]) < 1e-4


@pytest.mark.parametrize("sample", [False, True])
def test_python_logprobs_equal_log_softmax_of_logits(model, sample):
    prompt = "你好，请介绍一下你自己"
    kw = dict(max_new_tokens=8, logprobs=3)
    if sample:
        kw.update(do_sample=True, temperature=0.7, top_p=0.9, seed=3)  # raw logits, not the tempered ones
    text, lps = model.generate(prompt, **kw)
    s = model.stream(prompt, **kw)
    assert "".join(s) == text
    assert s.logprobs == lps
    ids = model.tokenizer.encode(prompt)
    check_against_logits(model, ids, list(s.token_ids), lps, 3)
    if not sample:  # greedy: the chosen token is the likeliest, and asking changes no token
        assert all(lp["top_logprobs"][0][0] == lp["token"] for lp in lps)
        assert model.generate(prompt, max_new_tokens=8) == text
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.generate(prompt, logprobs=21)
    with pytest.raises(glm2rs.InvalidArgumentError):
        model.generate(prompt, logprobs=-1)


def test_server_logprobs_in_openai_shapes(model):
    openai = pytest.importorskip("openai")
    tok = model.tokenizer
    with glm2rs.Server(model, port=0, model_name="tiny") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "你好"}]
        r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8, logprobs=True,
                                      top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens
        ids = tok.encode(tok.build_prompt("你好"))
        gen = model.stream_ids(ids, max_new_tokens=8, logprobs=2)
        list(gen)
        want = gen.logprobs
        assert [round(e.logprob, 4) for e in content] == [round(w["logprob"], 4) for w in want]
        for e, w in zip(content, want):
            assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
            assert e.bytes is not None and len(e.bytes) == len(e.token.encode()) or "\ufffd" in e.token
        # streamed: the same entries, spread over the chunks
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=2, stream=True))
        streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
        assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
        # legacy completions
        r = c.completions.create(model="tiny", prompt="你好", temperature=0, max_tokens=6, logprobs=3)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == r.usage.completion_tokens
        assert all(len(t) <= 3 for t in lp.top_logprobs) and lp.text_offset[0] == 0
        assert lp.text_offset == sorted(lp.text_offset)
        # without the fields: null, as before
        r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=2)
        assert r.choices[0].logprobs is None
        for bad in [dict(top_logprobs=2), dict(logprobs=True, top_logprobs=21), dict(logprobs="yes")]:
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, **bad)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=6)


def test_completions_echo_scores_the_prompt(model):
    """`echo` with `logprobs` (what lm-evaluation-harness's local-completions sends for
    loglikelihoods, with max_tokens 0): the prompt's tokens, each scored by the logits before it,
    the first null; the tokens join to the prompt and text_offset points into it."""
    import http.client
    import json

    tok = model.tokenizer
    prompt = "The capital of France is Paris. 北京是中国的首都。"
    ids = tok.encode(prompt)
    logits = model.logits(ids)
    with glm2rs.Server(model, port=0, model_name="tiny") as srv:
        def post(body):
            c = http.client.HTTPConnection(srv.url.split("//")[1], timeout=60)
            c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read())

        st, r = post({"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0})
        assert st == 200, r
        ch = r["choices"][0]
        assert ch["text"] == prompt and r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == 0
        lp = ch["logprobs"]
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert "".join(lp["tokens"]) == prompt
        for i in range(1, len(ids)):
            ref = log_softmax(logits[i - 1])
            assert abs(lp["token_logprobs"][i] - ref[ids[i]]) < 1e-4
            assert len(lp["top_logprobs"][i]) <= 2
            assert prompt[lp["text_offset"][i]:].startswith(lp["tokens"][i])
        # echo and a completion: the prompt's entries, then the generated ones
        st, r = post({"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0})
        assert st == 200, r
        ch = r["choices"][0]
        assert ch["text"].startswith(prompt) and len(ch["logprobs"]["tokens"]) == len(ids) + r["usage"]["completion_tokens"]
        assert ch["logprobs"]["text_offset"] == sorted(ch["logprobs"]["text_offset"])
        st, r = post({"prompt": prompt, "max_tokens": 3, "echo": True, "stream": True})
        assert st == 400 and r["error"]["param"] == "echo"
        st, r = post({"prompt": prompt, "max_tokens": 0})  # 0 without echo: still refused
        assert st == 400 and r["error"]["param"] == "max_tokens"
