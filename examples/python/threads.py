"""Two threads streaming from one model at once (the GIL is released during each step).

    python examples/python/threads.py --model PATH
"""

import argparse
import threading

import glm2rs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    model = glm2rs.Model.from_pretrained(a.model)
    questions = ["你好", "Tell me a story."]
    answers = {}

    def run(q: str) -> None:
        answers[q] = "".join(model.stream(model.tokenizer.build_prompt(q), max_new_tokens=32))

    threads = [threading.Thread(target=run, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for q in questions:
        print(f"{q} -> {answers[q]!r}")


if __name__ == "__main__":
    main()
