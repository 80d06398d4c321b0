"""Evaluation: the official C-Eval procedure (ChatGLM2's `evaluate_ceval.py`) and perplexity."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

CHOICES = ["A", "B", "C", "D"]
EXTRACTION_PROMPT = "综上所述，ABCD中正确的选项是："


def _bar(done: int, total: int, label: str) -> None:
    """A bar redrawn in place on a terminal; plain lines (start, every tenth, end) in a log."""
    if not sys.stderr.isatty():
        tenth = 10 * done // max(total, 1)
        if done in (0, total) or tenth != 10 * (done - 1) // max(total, 1):
            print(f"{label} {done}/{total}", file=sys.stderr, flush=True)
        return
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def choice_ids(tokenizer) -> list[int]:
    """The first token id of each choice letter, as the official script takes them."""
    return [tokenizer.encode(c, add_special_tokens=False)[0] for c in CHOICES]


def round1(text: str) -> str:
    return f"[Round 1]\n\n问：{text}\n\n答："


def score_zero_shot(model, question: str, max_new_tokens: int = 512) -> tuple[int, str]:
    """The official two steps: a greedy answer to the question, then the last-position logits of
    the question, the answer and the extraction prompt over the choice letters."""
    tok = model.tokenizer
    answer = tok.decode(model.generate_ids(tok.encode(round1(question)), max_new_tokens=max_new_tokens))
    ids = tok.encode(round1(question + answer + "\n" + EXTRACTION_PROMPT))
    last = model.logits(ids)[-1]
    return int(np.argmax(last[choice_ids(tok)])), answer


def answer_only_prompt(question: str, shots: list[dict]) -> str:
    parts = [f"{s['inputs_pretokenized']}\n答案：{CHOICES[int(s['label'])]}\n\n" for s in shots]
    return "".join(parts) + f"{question}\n答案："


def score_answer_only(model, question: str, shots: list[dict]) -> int:
    """Few-shot, answer only (the base-model evaluation): next-token logits over the letters."""
    tok = model.tokenizer
    last = model.logits(tok.encode(answer_only_prompt(question, shots)))[-1]
    return int(np.argmax(last[choice_ids(tok)]))


def predict_batch(model, questions: list[str], *, answer_only: bool = False, shots: list[dict] | None = None,
                  max_new_tokens: int = 512, batch_size: int = 8) -> list[int]:
    """The choices (0..3) for several questions at once: the greedy answers of step 1 are generated
    together (one batched forward per step) and the logits of step 2 (or of the answer-only prompt)
    come from batched forwards. Each question gets exactly what it gets alone."""
    tok = model.tokenizer
    letters = choice_ids(tok)
    if answer_only:
        prompts = [tok.encode(answer_only_prompt(q, shots or [])) for q in questions]
    else:
        first = [tok.encode(round1(q)) for q in questions]
        answers = []
        for i in range(0, len(first), batch_size):
            outs = model.generate_batch_ids(first[i:i + batch_size], max_new_tokens=max_new_tokens)
            answers += [tok.decode(o) for o in outs]
        prompts = [tok.encode(round1(q + a + "\n" + EXTRACTION_PROMPT)) for q, a in zip(questions, answers)]
    last = model.last_logits(prompts, batch_size=batch_size)
    return [int(np.argmax(row[letters])) for row in last]


def ceval(model, data: str | Path, *, answer_only: bool = False, shots: int = 5, max_new_tokens: int = 512,
          limit: int | None = None, batch_size: int = 8) -> dict:
    """Accuracy per jsonl file, per category folder and weighted overall; `batch_size` questions
    run together."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such C-Eval file or directory")
    files = sorted(data.rglob("*.jsonl")) if data.is_dir() else [data]
    if not files:
        raise FileNotFoundError(f"no .jsonl files under {data}")
    per_file, counts, categories = {}, {}, defaultdict(lambda: [0, 0])
    todo = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        fewshot = rows[:shots] if answer_only else []
        rows = rows[len(fewshot):]
        if limit is not None:
            rows = rows[:limit]
        todo.append((f, fewshot, rows))
    total = sum(len(r) for _, _, r in todo)
    done = 0
    _bar(0, total, "C-Eval")
    for f, fewshot, rows in todo:
        correct = 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            preds = predict_batch(model, [r["inputs_pretokenized"] for r in chunk], answer_only=answer_only,
                                  shots=fewshot, max_new_tokens=max_new_tokens, batch_size=batch_size)
            correct += sum(int(p == int(r["label"])) for p, r in zip(preds, chunk))
            done += len(chunk)
            _bar(done, total, "C-Eval")
        key = str(f.relative_to(data)) if data.is_dir() else f.name
        per_file[key] = correct / len(rows) if rows else 0.0
        counts[key] = len(rows)
        cat = f.parent.name if data.is_dir() and f.parent != data else "all"
        categories[cat][0] += correct
        categories[cat][1] += len(rows)
    n = sum(counts.values())
    overall = sum(per_file[k] * counts[k] for k in per_file) / n if n else 0.0
    return {
        "mode": "answer-only" if answer_only else "zero-shot-cot",
        "files": {k: {"accuracy": per_file[k], "count": counts[k]} for k in per_file},
        "categories": {c: {"accuracy": v[0] / v[1] if v[1] else 0.0, "count": v[1]} for c, v in categories.items()},
        "overall": overall,
        "count": n,
    }


def perplexity(model, text: str, *, window: int = 512, stride: int = 256) -> dict:
    """Perplexity with a sliding window (as transformers' guide): each window sees up to
    `window` tokens and scores only the tokens not scored by the previous one."""
    if stride <= 0 or window <= 1 or stride > window:
        raise ValueError("need window > 1 and 0 < stride <= window")
    tok = model.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    prefix = tok.encode("", add_special_tokens=True)  # [gMASK] sop
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    nll, count, prev_end = 0.0, 0, 0
    starts = list(range(0, len(ids), stride))
    for n, begin in enumerate(starts):
        end = min(begin + window, len(ids))
        chunk = prefix + ids[begin:end]
        logits = model.logits(chunk).astype(np.float64)
        # position p of the chunk predicts chunk[p + 1]
        first_target = max(prev_end, begin + 1)
        for t in range(first_target, end):
            p = len(prefix) + (t - begin) - 1
            row = logits[p]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll += lse - row[ids[t]]
            count += 1
        prev_end = end
        _bar(n + 1, len(starts), "perplexity")
        if end == len(ids):
            break
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
