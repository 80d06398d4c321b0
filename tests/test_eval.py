"""glm2rs.eval: the official C-Eval procedure and perplexity, checked by hand from model.logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from glm2rs import eval as ev

QUESTIONS = [
    "1+1等于多少？\nA. 1\nB. 2\nC. 3\nD. 4",
    "水的化学式是什么？\nA. H2O\nB. CO2\nC. O2\nD. NaCl",
    "Which planet is largest?\nA. Mars\nB. Venus\nC. Jupiter\nD. Earth",
    "中国的首都是哪里？\nA. 上海\nB. 北京\nC. 广州\nD. 深圳",
    "光速约为多少？\nA. 3e8 m/s\nB. 3e5 m/s\nC. 340 m/s\nD. 1 m/s",
]


def letter_ids(tok):
    # by hand: the first id of each letter encoded without special tokens
    return [tok.encode(c, add_special_tokens=False)[0] for c in "ABCD"]


def hand_zero_shot(model, q, max_new_tokens):
    tok = model.tokenizer
    prompt = "[Round 1]\n\n问：" + q + "\n\n答："
    answer = tok.decode(model.generate_ids(tok.encode(prompt), max_new_tokens=max_new_tokens))
    second = "[Round 1]\n\n问：" + q + answer + "\n综上所述，ABCD中正确的选项是：" + "\n\n答："
    last = model.logits(tok.encode(second))[-1]
    return int(np.argmax([last[i] for i in letter_ids(tok)]))


def test_ceval_zero_shot_matches_a_hand_computation(model, tmp_path):
    preds = [hand_zero_shot(model, q, 8) for q in QUESTIONS]
    # labels: file a gets 2 of 3 right, file b 1 of 2
    labels = [preds[0], preds[1], (preds[2] + 1) % 4, preds[3], (preds[4] + 2) % 4]
    (tmp_path / "STEM").mkdir()
    (tmp_path / "Humanities").mkdir()
    rows = [{"inputs_pretokenized": q, "label": lab} for q, lab in zip(QUESTIONS, labels)]
    (tmp_path / "STEM" / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:3]))
    (tmp_path / "Humanities" / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[3:]))
    out = ev.ceval(model, tmp_path, max_new_tokens=8)
    assert out["files"]["STEM/a.jsonl"] == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert out["files"]["Humanities/b.jsonl"] == {"accuracy": pytest.approx(1 / 2), "count": 2}
    assert out["categories"]["STEM"]["accuracy"] == pytest.approx(2 / 3)
    assert out["categories"]["Humanities"]["accuracy"] == pytest.approx(1 / 2)
    assert out["overall"] == pytest.approx(3 / 5) and out["count"] == 5


def test_ceval_batches_give_the_hand_computed_choices(model):
    want = [hand_zero_shot(model, q, 8) for q in QUESTIONS]
    for bs in (1, 2, 5):
        assert ev.predict_batch(model, QUESTIONS, max_new_tokens=8, batch_size=bs) == want
    with pytest.raises(ValueError):
        ev.ceval(model, ".", batch_size=0)


def test_ceval_answer_only_few_shot(model, tmp_path):
    tok = model.tokenizer
    shots = [{"inputs_pretokenized": QUESTIONS[0], "label": 1}, {"inputs_pretokenized": QUESTIONS[1], "label": 0}]
    prompt = QUESTIONS[0] + "\n答案：B\n\n" + QUESTIONS[1] + "\n答案：A\n\n" + QUESTIONS[2] + "\n答案："
    last = model.logits(tok.encode(prompt))[-1]
    want = int(np.argmax([last[i] for i in letter_ids(tok)]))
    rows = shots + [{"inputs_pretokenized": QUESTIONS[2], "label": want}]
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    out = ev.ceval(model, f, answer_only=True, shots=2)
    assert out["count"] == 1 and out["overall"] == 1.0


def test_perplexity_is_exp_mean_nll(model):
    tok = model.tokenizer
    text = "晚上睡不着应该怎么办？Tell me a story about a dragon who could not sleep."
    ids = tok.encode(text, add_special_tokens=False)
    full = [64790, 64792] + ids
    logits = model.logits(full).astype(np.float64)
    nll = []
    for t in range(1, len(ids)):
        row = logits[2 + t - 1]
        nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[t]])
    want = math.exp(np.mean(nll))
    got = ev.perplexity(model, text, window=len(ids) + 5, stride=len(ids))
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(want, rel=1e-6)
    # a sliding window scores every token once too, with less context
    slid = ev.perplexity(model, text, window=8, stride=4)
    assert slid["tokens"] == len(ids) - 1 and math.isfinite(slid["perplexity"])
    with pytest.raises(ValueError):
        ev.perplexity(model, text, window=4, stride=8)


def test_cli_eval_ppl(fx, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("你好，世界。Hello world, this is a perplexity test.")
    out = tmp_path / "o.json"
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "eval", "ppl", "--model", str(fx / "model"),
                        "--file", str(f), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["perplexity"] > 1 and res["tokens"] > 5
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "eval", "ceval", "--model", str(fx / "model"),
                        "--data", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 1 and "no such C-Eval" in r.stderr
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "glm2rs.cli", "eval", "ceval", "--model", str(fx / "model"),
                        "--data", str(tmp_path / "empty")], capture_output=True, text=True)
    assert r.returncode == 1 and "no .jsonl" in r.stderr
