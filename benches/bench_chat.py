"""Time to first token of turn 5 of a conversation, with a ChatSession that reuses its KV cache
and with the official way (stream_chat re-encoding the whole history).

    python benches/bench_chat.py MODEL_DIR [--dtype float16] [--answer 16]
"""

from __future__ import annotations

import argparse
import time

import glm2rs

QUESTIONS = [
    "你好",
    "晚上睡不着应该怎么办",
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "请用三句话总结我们的对话。",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--answer", type=int, default=16, help="tokens per answer")
    a = ap.parse_args()
    m = glm2rs.Model.from_pretrained(a.model, dtype=a.dtype)
    kw = dict(do_sample=False, max_new_tokens=a.answer)

    # with reuse: four turns in a session, then time the fifth turn's first piece
    s = m.start_chat()
    for q in QUESTIONS[:4]:
        "".join(s.send(q, **kw))
    history = s.history
    cached = len(s.token_ids)
    t = time.perf_counter()
    turn = s.send(QUESTIONS[4], **kw)
    next(turn)
    ttft_reuse = time.perf_counter() - t
    turn.close()

    # without: the official path re-encodes the four earlier turns
    t = time.perf_counter()
    stream = m.stream_chat(QUESTIONS[4], history, **kw)
    next(stream)
    ttft_full = time.perf_counter() - t
    prompt = len(m.tokenizer.build_chat_input(QUESTIONS[4], history))

    print(f"| turn 5, {m.dtype}, {cached} tokens cached, prompt {prompt} tokens | "
          f"{ttft_reuse:.2f} s with reuse | {ttft_full:.2f} s re-encoding | {ttft_full / ttft_reuse:.1f}x |")


if __name__ == "__main__":
    main()
