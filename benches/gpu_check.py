"""GPU smoke check and first figures (run on the device machine): fixture parity on CUDA in float32,
then a random-weight chatglm2-6b in bfloat16: load time, prefill of 2048 tokens, decode tokens/s.

    python benches/gpu_check.py FIXTURES_DIR [--big]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import glm2rs


def parity(fx: Path) -> None:
    m = glm2rs.Model.from_pretrained(str(fx / "model-safetensors"), device="cuda", dtype="float32")
    fw = dict(np.load(fx / "golden" / "forward.npz"))
    worst = 0.0
    for i in range(3):
        ids = [int(x) for x in fw[f"ids_{i}"].reshape(-1)]
        got = m.logits(ids)
        want = fw[f"logits_{i}"]
        got = got[-1:] if want.shape[0] == 1 else got
        worst = max(worst, float(np.abs(got - want).max()))
    chats = json.loads((fx / "golden" / "generate.json").read_text())["chat"]
    same = 0
    for t in chats:
        prompt = m.tokenizer.build_prompt(t["query"], [tuple(h) for h in t["history"]])
        out = m.generate_ids(m.tokenizer.encode(prompt), max_new_tokens=t["max_new_tokens"])
        same += out == t["output_ids"]
    print(f"cuda float32 parity: max logit error {worst:.2e}, greedy chats equal {same}/{len(chats)}", flush=True)


def big(fx: Path) -> None:
    d = Path("/tmp/glm6b")
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, "benches/make_random_checkpoint.py", str(d), "--dtype", "bfloat16",
                        "--fixtures", str(fx)], check=True)
    t0 = time.perf_counter()
    m = glm2rs.Model.from_pretrained(str(d), device="cuda", dtype="bfloat16")
    load = time.perf_counter() - t0
    ids = [64790, 64792] + [int(x) for x in np.random.default_rng(0).integers(100, 60000, 2046)]
    m.generate_ids(ids[:64], max_new_tokens=2)  # warm up
    t = time.perf_counter()
    m.generate_ids(ids, max_new_tokens=1)
    pre = time.perf_counter() - t
    s = m.stream_ids(ids[:32], max_new_tokens=129)
    t_first, n_first = None, 0
    for _ in s:
        if t_first is None:
            t_first, n_first = time.perf_counter(), len(s.token_ids)
    dec = (len(s.token_ids) - n_first) / (time.perf_counter() - t_first)
    print(f"cuda bf16 6B: load {load:.1f} s, prefill 2048 {pre:.3f} s, decode {dec:.1f} tok/s", flush=True)


if __name__ == "__main__":
    fx = Path(sys.argv[1])
    parity(fx)
    if "--big" in sys.argv:
        big(fx)
