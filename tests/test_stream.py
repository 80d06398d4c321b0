"""model.stream(): UTF-8-safe pieces, GIL released per step, threads sharing one model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import glm2rs
from reference import random_config, random_weights, write_checkpoint


def test_split_multibyte_characters_are_held_back(tokenizer):
    # "你好👋": 👋 is four byte-fallback tokens <0xF0><0x9F><0x91><0x8B>
    ids = tokenizer.encode("你好👋!", add_special_tokens=False)
    assert ids[-5:-1] == [243, 162, 148, 142]
    pieces = tokenizer.stream_decode(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "你好👋!"
    assert pieces[-5:-2] == ["", "", ""]  # nothing until the character is complete
    assert pieces[-2] == "👋"
    assert all("\ufffd" not in p for p in pieces)


def test_random_id_sequences_join_to_the_full_decode(tokenizer):
    rng = np.random.default_rng(0)
    text = "中文、English, русский, 日本語のかな, 한국어, emoji 🎉🚀 and ümlauts."
    real = tokenizer.encode(text, add_special_tokens=False)
    for trial in range(300):
        # mixtures of real pieces, raw byte tokens, specials and out-of-vocabulary ids
        choice = rng.integers(0, 4, size=30)
        ids = []
        for c in choice:
            if c == 0:
                ids.append(int(rng.choice(real)))
            elif c == 1:
                ids.append(int(rng.integers(3, 259)))
            elif c == 2:
                ids.append(int(rng.integers(0, 65024)))
            else:
                ids.extend(tokenizer.encode("终于👋", add_special_tokens=False))
        pieces = tokenizer.stream_decode(ids)
        assert "".join(pieces) == tokenizer.decode(ids), ids


def test_stream_pieces_join_to_decode_of_generated_ids(model, tokenizer):
    p = tokenizer.build_prompt("Tell me a story.")
    for seed in range(8):
        s = model.stream(p, max_new_tokens=40, do_sample=True, temperature=1.5, seed=seed)
        pieces = list(s)
        assert "".join(pieces) == tokenizer.decode(s.token_ids)
        assert s.finish_reason in ("stop", "length")
        assert all(pieces)


def test_close_frees_and_ends_the_stream(model, tokenizer):
    s = model.stream(tokenizer.build_prompt("你好"), max_new_tokens=24)
    first = next(s)
    assert first
    s.close()
    with pytest.raises(StopIteration):
        next(s)
    assert len(s.token_ids) >= 1


@pytest.fixture(scope="module")
def bigger(tmp_path_factory, fx):
    """A random model large enough that one step takes tens of milliseconds."""
    cfg = random_config(
        hidden_size=256, num_attention_heads=8, kv_channels=32, multi_query_group_num=2, ffn_hidden_size=768,
        num_layers=4, seq_length=2048,
    )
    d = write_checkpoint(tmp_path_factory.mktemp("big"), cfg, random_weights(cfg), fx / "model" / "tokenizer.model")
    return glm2rs.Model.from_pretrained(str(d), dtype="float32")


def test_model_work_releases_the_gil(bigger):
    ids = [64790, 64792] + [int(x) for x in np.random.default_rng(0).integers(100, 60000, 1500)]
    done = threading.Event()
    took = []

    def work():
        t0 = time.perf_counter()
        bigger.logits(ids)
        took.append(time.perf_counter() - t0)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    gaps, last = [], time.perf_counter()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    th.join()
    assert took[0] > 0.1, "the call must be long enough to tell"
    # With the GIL held for the call, this thread could not run for its whole duration.
    assert max(gaps) < 0.5 * took[0], (max(gaps), took[0])


def test_two_threads_stream_at_once_on_one_model(bigger):
    prompts = ["[Round 1]\n\n问：你好\n\n答：", "[Round 1]\n\n问：Tell me a story.\n\n答："]
    expected = [bigger.generate(p, max_new_tokens=30) for p in prompts]
    results = [None, None]
    spans = [None, None]

    def run(i):
        t0 = time.perf_counter()
        results[i] = "".join(bigger.stream(prompts[i], max_new_tokens=30))
        spans[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    # the two generations overlapped in time
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def test_stream_ids_equals_generate_ids(model, tokenizer):
    ids = tokenizer.encode(tokenizer.build_prompt("你好"))
    s = model.stream_ids(ids, max_new_tokens=12)
    text = "".join(s)
    assert s.token_ids == model.generate_ids(ids, max_new_tokens=12)
    assert text == tokenizer.decode(s.token_ids)
