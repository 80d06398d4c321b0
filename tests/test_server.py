"""`glm2rs.Server` on loopback, driven by the real `openai` client and raw HTTP: the OpenAI API
(streamed and not), the official api.py contract, bad requests, API keys, cancellation, overload
and batching."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest

openai = pytest.importorskip("openai")

import glm2rs  # noqa: E402
from conftest import health  # noqa: E402


@pytest.fixture(scope="module")
def server(model):
    with glm2rs.Server(model, port=0, model_name="tiny-glm2") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path, body, headers=None, raw=False):
    c = http.client.HTTPConnection(server.host, server.port, timeout=60)
    data = body if raw else json.dumps(body)
    c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


def get(server, path, headers=None):
    c = http.client.HTTPConnection(server.host, server.port, timeout=60)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


Q = "你好，介绍一下你自己"


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-glm2"]


def test_chat_stream_equals_non_stream_and_model(client, model):
    kw = dict(model="tiny-glm2", messages=[{"role": "user", "content": Q}], temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    assert text == model.chat(Q, max_new_tokens=24, do_sample=False)[0]
    pieces, reasons, usage = [], [], None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert "".join(pieces) == text
    assert len(pieces) > 1  # really streamed
    assert reasons == [full.choices[0].finish_reason]
    assert usage is not None
    tokens = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage, k) for k in tokens] == [getattr(full.usage, k) for k in tokens]
    # the same prompt again: its full blocks come from the prefix cache
    cached = usage.prompt_tokens_details.cached_tokens
    assert full.usage.prompt_tokens_details.cached_tokens <= cached < usage.prompt_tokens
    assert cached == (usage.prompt_tokens - 1) // 16 * 16


def test_length_finish_and_usage(client, model, tokenizer):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], temperature=0,
                                       max_tokens=7)
    assert r.choices[0].finish_reason == "length"
    prompt_ids = tokenizer.encode(tokenizer.build_prompt(Q, []))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == len(prompt_ids) + 7
    assert r.choices[0].message.content == model.chat(Q, max_new_tokens=7, do_sample=False)[0]


def test_history_messages(client, model):
    hist = [{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"}]
    r = client.chat.completions.create(model="m", messages=hist + [{"role": "user", "content": "三"}],
                                       temperature=0, max_tokens=12)
    want = model.chat("三", history=[("一", "二")], max_new_tokens=12, do_sample=False)[0]
    assert r.choices[0].message.content == want


def test_completions_stream_stop_and_seed(client, model):
    prompt = "The quick brown fox"
    want = model.generate(prompt, max_new_tokens=20, do_sample=False)
    r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=20)
    assert r.choices[0].text == want
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompt, temperature=0, max_tokens=20, stream=True) if c.choices)
    assert streamed == want
    # a stop string cuts the text before it
    stop = want[len(want) // 2: len(want) // 2 + 2]
    cut = want[: want.find(stop)]
    r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=20, stop=[stop, "never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    # default max_tokens is OpenAI's 16
    assert client.completions.create(model="m", prompt=prompt, temperature=0).usage.completion_tokens == 16
    # the same seed gives the same sample
    a = [client.completions.create(model="m", prompt=prompt, temperature=1.0, max_tokens=16, seed=s).choices[0].text
         for s in (7, 7, 8)]
    assert a[0] == a[1] and a[0] != a[2]


def test_official_api_contract(server, model):
    hist = [["你是谁", "我是 ChatGLM"]]
    # top_p this small keeps only the most likely token: the answer is the greedy one
    st, body = post(server, "/", {"prompt": "你好", "history": hist, "max_length": 64, "top_p": 1e-9,
                                  "temperature": 0.95})
    assert st == 200
    r = json.loads(body)
    want = model.chat("你好", history=[tuple(h) for h in hist], max_length=64, do_sample=False)[0]
    assert r["response"] == want
    assert r["history"] == hist + [["你好", want]]
    assert r["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r["time"])
    # only the prompt is required
    st, body = post(server, "/", {"prompt": "hi", "max_length": 40})
    assert st == 200 and json.loads(body)["history"][0][0] == "hi"


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [1]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好 " * 5000}]}),
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}),
    ("/", {"history": []}),
    ("/", {"prompt": "hi", "history": "nope"}),
    ("/", {"prompt": "hi", "max_length": 0}),
    ("/", {"prompt": "你好 " * 5000}),
])
def test_bad_requests_get_4xx_and_server_goes_on(server, client, path, body):
    st, out = post(server, path, body, raw=isinstance(body, bytes))
    assert 400 <= st < 500, (st, out)
    err = json.loads(out)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_errors_name_the_field(server):
    st, out = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert st == 400 and json.loads(out)["error"]["param"] == "max_tokens"
    st, out = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好 " * 5000}]})
    assert st == 400 and json.loads(out)["error"]["code"] == "context_length_exceeded"
    assert json.loads(out)["error"]["param"] == "messages"
    st, out = post(server, "/v1/completions", {"model": "m", "prompt": "你好 " * 5000})
    assert st == 400 and json.loads(out)["error"]["code"] == "context_length_exceeded"
    assert json.loads(out)["error"]["param"] == "prompt"
    st, _ = get(server, "/v1/nothing")
    assert st == 404
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=[], max_tokens=2)


def test_web_page_is_served(server):
    st, page = get(server, "/")
    assert st == 200 and b"/v1/chat/completions" in page and b"<textarea" in page
    assert get(server, "/chat")[1] == page
    assert b"https://" not in page and b"http://" not in page  # no CDN: everything is in the page


def test_api_key(model):
    with glm2rs.Server(model, port=0, api_key="sekrit") as s:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        st, out = post(s, "/", {"prompt": "hi"})
        assert st == 401 and json.loads(out)["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3).usage.completion_tokens == 3
        assert get(s, "/")[0] == 200  # the page itself; its requests carry the key


def wait_for(cond, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def open_stream(s, max_tokens=3000):
    c = http.client.HTTPConnection(s.host, s.port, timeout=60)
    c.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "long", "max_tokens": max_tokens, "stream": True, "temperature": 0}),
        headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    r.fp.readline()  # the first event line arrived: the request is running
    return c


def test_disconnect_frees_the_slot_and_overload_is_503(model):
    with glm2rs.Server(model, port=0, max_batch=1, max_queue=1) as s:
        a = open_stream(s)
        assert wait_for(lambda: health(s)["running"] == 1)
        # the second waits in the queue, the third finds it full
        t = threading.Thread(target=lambda: post(s, "/v1/completions", {"prompt": "q", "max_tokens": 3}))
        t.start()
        assert wait_for(lambda: health(s)["queued"] == 1)
        st, out = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert st == 503 and json.loads(out)["error"]["code"] == "overloaded"
        # the client goes away mid-stream: its slot is freed, the queued request runs
        a.sock.shutdown(2)
        a.close()
        t.join(timeout=60)
        assert not t.is_alive()
        assert wait_for(lambda: health(s)["running"] == 0 and health(s)["queued"] == 0)
        st, _ = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert st == 200


def test_concurrent_streams_are_batched(model):
    with glm2rs.Server(model, port=0, max_batch=16) as s:
        cl = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [f"prompt number {i}" for i in range(8)]
        out = [None] * len(prompts)

        def run(i):
            text = ""
            for ch in cl.completions.create(model="m", prompt=prompts[i], temperature=0, max_tokens=40,
                                            stream=True):
                if ch.choices:
                    text += ch.choices[0].text
            out[i] = text

        steps0 = health(s)["steps"]
        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        steps = health(s)["steps"] - steps0
        # each text is what the model gives alone
        for p, o in zip(prompts, out):
            assert o == model.generate(p, max_new_tokens=40, do_sample=False)
        # 8 x 40 tokens took far fewer than 320 steps: decode steps were shared
        assert steps < 8 * 40 / 2, steps


def test_load_32_concurrent_streaming_clients_none_lost(model):
    """The load test of benches/load_test.py, bounded: 32 streaming clients at once all complete."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parent.parent / "benches" / "load_test.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    with glm2rs.Server(model, port=0, max_batch=32) as s:
        prompts = [f"client {i}" for i in range(32)]
        r = lt.run(s.host, s.port, prompts, 24, concurrent=True)
        assert r["completed"] == 32 and r["lost"] == 0, r["errors"]
        assert r["tokens"] == 32 * 24
        assert health(s)["completed"] >= 32 and health(s)["running"] == 0


def test_stop_does_not_wait_for_silent_or_streaming_clients(model):
    import socket

    s = glm2rs.Server(model, port=0)
    silent = socket.create_connection((s.host, s.port))
    silent.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    streaming = http.client.HTTPConnection(s.host, s.port, timeout=60)
    streaming.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                      body=json.dumps({"model": "m", "prompt": "你好", "max_tokens": 4000, "stream": True}))
    r = streaming.getresponse()
    assert r.status == 200 and r.readline()  # the stream has started
    t = time.perf_counter()
    s.stop()
    took = time.perf_counter() - t
    assert not s.running
    assert took < 10, f"stop took {took:.1f} s"
    silent.close()
    streaming.close()


def test_multi_turn_chat_reuses_the_cached_history(fx):
    """Turn 2 of a conversation over /v1/chat/completions finds turn 1's prompt and answer in the
    prefix cache: `usage.prompt_tokens_details.cached_tokens` (OpenAI's field) counts them, and
    the answers are those of a server without the cache (greedy), streamed or not."""
    openai = pytest.importorskip("openai")
    kw = dict(dtype="float32", progress=False, kv_block_size=16)
    on = glm2rs.Model.from_pretrained(str(fx / "model"), **kw)
    off = glm2rs.Model.from_pretrained(str(fx / "model"), prefix_cache=False, **kw)

    def conversation(m, stream):
        with glm2rs.Server(m, port=0, model_name="tiny") as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            msgs, out = [], []
            for q in ["你好，请介绍一下你自己，说得详细一点。", "再说一遍", "谢谢"]:
                msgs.append({"role": "user", "content": q})
                if stream:
                    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                                            max_tokens=24, stream=True,
                                                            stream_options={"include_usage": True}))
                    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                    usage = chunks[-1].usage
                else:
                    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24)
                    text, usage = r.choices[0].message.content, r.usage
                out.append((text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
                msgs.append({"role": "assistant", "content": text})
            return out

    for stream in (False, True):
        with_cache, without = conversation(on, stream), conversation(off, stream)
        assert [(t, p) for t, p, _ in with_cache] == [(t, p) for t, p, _ in without]
        assert all(c == 0 for _, _, c in without)
        assert with_cache[1][2] >= 16 and with_cache[2][2] >= with_cache[1][2]
        assert all(c < p for _, p, c in with_cache)


def test_metrics_endpoint_in_prometheus_format(model, server, client):
    def scrape():
        c = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
        c.request("GET", "/metrics")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/plain")
        vals = {}
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                vals[k] = float(v)
        return vals

    before = scrape()
    for name in ["glm2rs_num_requests_running", "glm2rs_num_requests_waiting", "glm2rs_kv_cache_blocks_used",
                 "glm2rs_kv_cache_blocks_free", "glm2rs_kv_cache_blocks_total", "glm2rs_prefix_cache_queries_total",
                 "glm2rs_prefix_cache_hits_total", "glm2rs_prompt_tokens_total", "glm2rs_generation_tokens_total",
                 "glm2rs_time_to_first_token_seconds_count", "glm2rs_time_per_output_token_seconds_count",
                 "glm2rs_e2e_request_latency_seconds_count", "glm2rs_num_preemptions_total"]:
        assert name in before, name
    r = client.completions.create(model="tiny-glm2", prompt="你好" * 30, max_tokens=5, temperature=0)
    after = scrape()
    assert after["glm2rs_prompt_tokens_total"] - before["glm2rs_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["glm2rs_generation_tokens_total"] - before["glm2rs_generation_tokens_total"] == r.usage.completion_tokens
    assert after["glm2rs_time_to_first_token_seconds_count"] == before["glm2rs_time_to_first_token_seconds_count"] + 1
    assert after["glm2rs_e2e_request_latency_seconds_count"] == before["glm2rs_e2e_request_latency_seconds_count"] + 1
    assert after["glm2rs_prefix_cache_queries_total"] >= before["glm2rs_prefix_cache_queries_total"] + r.usage.prompt_tokens
    assert after['glm2rs_request_success_total{finished_reason="length"}'] >= 1


def test_more_kv_memory_asked_than_exists(fx):
    """A pool of 24 blocks of 16 positions and 8 concurrent streams that need ~10 blocks each:
    requests wait for memory or are preempted and recomputed; every one ends with the answer a
    server with room gives (greedy), none hangs; a prompt larger than the whole pool is a 400
    naming the limit; the server keeps answering."""
    openai = pytest.importorskip("openai")
    kw = dict(dtype="float32", progress=False, kv_block_size=16)
    block = glm2rs.Model.from_pretrained(str(fx / "model"), **kw).kv_cache_info()["block_bytes"]
    small = glm2rs.Model.from_pretrained(str(fx / "model"), kv_cache_memory=str(block * 24), **kw)
    roomy = glm2rs.Model.from_pretrained(str(fx / "model"), **kw)
    questions = [f"第{i}个问题：请把这句话重复很多很多遍，越长越好。" * 3 for i in range(8)]

    def answers(m):
        with glm2rs.Server(m, port=0, model_name="tiny", max_batch=8) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

            def ask(q):
                chunks = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                   temperature=0, max_tokens=40, stream=True)
                return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(8) as ex:
                got = list(ex.map(ask, questions))
            if m is small:
                with pytest.raises(openai.BadRequestError, match="KV cache"):
                    c.completions.create(model="tiny", prompt="很长" * 400, max_tokens=2)
                assert ask("你好")  # still serving
                conn = http.client.HTTPConnection(srv.url.split("//")[1], timeout=30)
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                pre = [l for l in text.splitlines() if l.startswith("glm2rs_num_preemptions_total")]
                assert float(pre[0].split()[-1]) > 0  # memory ran out and sequences were preempted
            return got

    assert answers(small) == answers(roomy)
