"""Stream a ChatGLM2 answer, printing tokens/s.

    python examples/python/stream.py --model THUDM/chatglm2-6b --question 你好
"""

import argparse
import time

import glm2rs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model directory or hub id")
    ap.add_argument("--question", default="你好")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()

    model = glm2rs.Model.from_pretrained(a.model, device=a.device, dtype=a.dtype)
    prompt = model.tokenizer.build_prompt(a.question, [])
    print(f"问：{a.question}\n答：", end="", flush=True)
    start = time.perf_counter()
    stream = model.stream(prompt, max_new_tokens=a.max_new_tokens)
    for piece in stream:
        print(piece, end="", flush=True)
    took = time.perf_counter() - start
    n = len(stream.token_ids)
    print(f"\n[{n} tokens in {took:.2f} s, {n / took:.1f} tokens/s, {model.dtype} on {model.device}]")


if __name__ == "__main__":
    main()
