"""The paged KV cache seen from Python: the pool's settings (`kv_cache_memory`, `kv_block_size`),
its counts (`kv_cache_info`), a pool too small for a request (a clear error, the model still
usable), and chunked prefill (`prefill_chunk`) giving the same tokens as one pass."""

from __future__ import annotations

import numpy as np
import pytest

import glm2rs


def load(fx, **kw):
    return glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", progress=False, **kw)


def test_pool_settings_and_counts(fx):
    m = load(fx, kv_block_size=16)
    info = m.kv_cache_info()
    assert info["block_size"] == 16 and info["blocks_in_use"] == 0
    assert info["max_blocks"] > 0 and info["block_bytes"] > 0
    ids = m.tokenizer.encode("你好" * 20)
    s = m.stream_ids(ids, max_new_tokens=4, do_sample=False)
    next(iter(s))
    held = m.kv_cache_info()["blocks_in_use"]
    assert held == pytest.approx((len(ids) + 1) / 16, abs=1)  # the live stream holds its blocks
    list(s)
    del s
    assert m.kv_cache_info()["blocks_in_use"] == 0  # given back when the stream is gone
    assert m.kv_cache_info()["blocks_allocated"] >= held  # kept for the next sequence


@pytest.mark.parametrize("kw, word", [
    ({"kv_block_size": 24}, "power of two"),
    ({"kv_block_size": 8}, "power of two"),
    ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"kv_cache_memory": -1}, "kv_cache_memory"),
    ({"kv_cache_memory": True}, "kv_cache_memory"),
    ({"kv_cache_memory": 10}, "holds no block"),  # 10 bytes
])
def test_bad_pool_settings_are_clear_errors(fx, kw, word):
    with pytest.raises(glm2rs.Glm2Error, match=word):
        load(fx, **kw)


def test_memory_limit_in_bytes_and_a_request_that_does_not_fit(fx):
    block = load(fx, kv_block_size=16).kv_cache_info()["block_bytes"]
    m = load(fx, kv_block_size=16, kv_cache_memory=str(block * 40))
    assert m.kv_cache_info()["max_blocks"] == 40
    cap = 40 * 16  # positions the pool can hold
    too_long = [64790, 64792] + [100 + i % 500 for i in range(cap + 10)]
    with pytest.raises(glm2rs.Glm2Error, match="KV cache is full"):
        m.generate_ids(too_long, max_new_tokens=2, do_sample=False)
    assert m.kv_cache_info()["blocks_in_use"] == 0  # the failed request's blocks came back
    short = m.tokenizer.encode("你好")
    assert len(m.generate_ids(short, max_new_tokens=3, do_sample=False)) >= 1  # still usable
    # the same limit spelled with a unit
    mib = load(fx, kv_block_size=16, kv_cache_memory="1MiB").kv_cache_info()
    assert mib["max_blocks"] * mib["block_bytes"] <= 1 << 20


def test_chunked_prefill_gives_the_same_tokens(fx):
    m = load(fx)
    assert m.tuning["prefill_chunk"] == "8192"
    ids = m.tokenizer.encode("长一点的输入，跨过好几个块。" * 20)
    whole = m.with_tuning(prefill_chunk=0)
    chunked = m.with_tuning(prefill_chunk=33)
    assert chunked.tuning["prefill_chunk"] == "33"
    np.testing.assert_allclose(chunked.logits(ids), whole.logits(ids), atol=1e-4)
    a = whole.generate_ids(ids, max_new_tokens=10, do_sample=False)
    b = chunked.generate_ids(ids, max_new_tokens=10, do_sample=False)
    assert a == b


def test_chat_sessions_share_nothing_they_should_not(fx):
    """Two chat sessions of one model (one pool): each keeps its own history in its own blocks."""
    m = load(fx, kv_block_size=16)
    a, b = m.start_chat(), m.start_chat()
    kw = dict(max_new_tokens=8, do_sample=False)
    ra1 = a.chat("你好", **kw)
    rb1 = b.chat("今天天气怎么样", **kw)
    ra2 = a.chat("再说一遍", **kw)
    fresh = m.start_chat()
    assert fresh.chat("你好", **kw) == ra1
    assert fresh.chat("再说一遍", **kw) == ra2
    assert m.start_chat().chat("今天天气怎么样", **kw) == rb1
    assert m.kv_cache_info()["blocks_in_use"] > 0  # a, b and fresh keep their caches
    del a, b, fresh
    assert m.kv_cache_info()["blocks_in_use"] == 0


def test_prefix_cache_reuses_prompt_starts_with_the_same_tokens(fx):
    """A prompt whose start was computed before (full blocks) reuses those keys and values: the
    same greedy tokens and logits as without the cache, and `cached_tokens` says how many."""
    m = load(fx, kv_block_size=16)
    off = load(fx, kv_block_size=16, prefix_cache=False)
    tok = m.tokenizer
    base = tok.encode("长一点的输入，跨过好几个块。" * 6)
    first = m.stream_ids(base, max_new_tokens=6, do_sample=False)
    a = list(first)
    assert first.cached_tokens == 0
    again = m.stream_ids(base, max_new_tokens=6, do_sample=False)
    b = list(again)
    assert again.cached_tokens == (len(base) - 1) // 16 * 16 > 0
    assert a == b and again.token_ids == first.token_ids
    longer = base + tok.encode("再加一句话", add_special_tokens=False)
    s = m.stream_ids(longer, max_new_tokens=6, do_sample=False)
    list(s)
    assert s.cached_tokens >= len(base) // 16 * 16
    assert s.token_ids == off.generate_ids(longer, max_new_tokens=6, do_sample=False)
    info = m.kv_cache_info()
    assert info["prefix_cache_hits"] > 0 and info["prefix_cache_queries"] >= info["prefix_cache_hits"]
    assert info["blocks_in_use"] == 0 and info["blocks_cached"] > 0  # kept for later prompts
    o = off.stream_ids(base, max_new_tokens=2, do_sample=False)
    list(o)
    o2 = off.stream_ids(base, max_new_tokens=2, do_sample=False)
    list(o2)
    assert o2.cached_tokens == 0 and off.kv_cache_info()["blocks_cached"] == 0
    # a different start finds nothing
    other = tok.encode("完全不同的开头" * 10)
    s = m.stream_ids(other, max_new_tokens=2, do_sample=False)
    list(s)
    assert s.cached_tokens == 0


def test_cached_blocks_are_evicted_when_the_pool_needs_them(fx):
    block = load(fx, kv_block_size=16).kv_cache_info()["block_bytes"]
    m = load(fx, kv_block_size=16, kv_cache_memory=str(block * 24))
    off = load(fx, kv_block_size=16, prefix_cache=False)
    tok = m.tokenizer
    prompts = [tok.encode(f"第{i}个不同的问题，" * 12) for i in range(12)]
    for p in prompts:  # 12 prompts of ~7 blocks each through a pool of 24: old ones evicted
        assert m.generate_ids(p, max_new_tokens=3, do_sample=False) == off.generate_ids(p, max_new_tokens=3, do_sample=False)
    info = m.kv_cache_info()
    assert info["blocks_in_use"] == 0 and 0 < info["blocks_cached"] <= 24
    s = m.stream_ids(prompts[-1], max_new_tokens=3, do_sample=False)
    list(s)
    assert s.cached_tokens > 0  # the newest is still there


def test_a_new_chat_session_starts_from_the_prefix_cache(fx):
    """A session's first turn finds the blocks another generation computed for the same prompt
    (its answer the same as without the cache), and later turns keep the session's own cache."""
    m = load(fx)
    off = load(fx, prefix_cache=False)
    q = "请详细介绍一下你自己，包括你的名字、你能做什么、你不能做什么。"
    kw = dict(max_new_tokens=8, do_sample=False)
    want = [off.start_chat(), None]
    want[1] = [want[0].chat(q, **kw), want[0].chat("再说一遍", **kw)]
    ids = m.tokenizer.encode(m.tokenizer.build_prompt(q))
    list(m.stream_ids(ids, max_new_tokens=1, do_sample=False))
    hits = m.kv_cache_info()["prefix_cache_hits"]
    s = m.start_chat()
    assert s.chat(q, **kw) == want[1][0]
    assert m.kv_cache_info()["prefix_cache_hits"] >= hits + 16
    assert s.chat("再说一遍", **kw) == want[1][1]
