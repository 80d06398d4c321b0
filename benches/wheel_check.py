"""A CUDA wheel on this GPU (issue #18): the first process's wait, then speed and greedy ids.

    python benches/wheel_check.py cold --fixtures FIXTURES            # one fresh process, no JIT cache
    python benches/wheel_check.py parity --fixtures FIXTURES          # the fixture on the GPU vs golden
    python benches/wheel_check.py speed --ckpt /tmp/glm6b --out a.json  # 6B: prefill, decode, ids
    python benches/wheel_check.py compare a.json b.json                 # two wheels side by side

`cold` starts a new Python process with `CUDA_CACHE_DISABLE=1` (the driver's JIT cache off, as on
a fresh machine) that imports glm2rs, loads the tiny fixture on the GPU and generates one token;
prints the seconds to the model being ready and to the first token, and the wheel's build info.
`parity` loads the fixture (float, int8, int4) on the GPU in float32 and compares its logits and greedy
chat ids with what the official implementation computed.
`speed` times on the GPU (random 6B weights, bf16): decode after a short prompt, prefill of 2K and
8K and decode after each, int4 (quantized at load) decode after a short prompt, and records 32
greedy ids after each prompt; `compare` prints both
wheels' figures and whether the ids are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

COLD = r"""
import sys, time
t0 = time.perf_counter()
import glm2rs
t_import = time.perf_counter() - t0
m = glm2rs.Model.from_pretrained(sys.argv[1], device="cuda", progress=False)
t_ready = time.perf_counter() - t0
m.generate(m.tokenizer.build_prompt("你好"), max_new_tokens=1)
t_first = time.perf_counter() - t0
info = glm2rs.build_info()
print(f"import {t_import:.2f} s, model ready {t_ready:.2f} s, first token {t_first:.2f} s; "
      f"features {info['features']}, gpus {[(g['name'], g['compute_capability']) for g in info['gpus']]}")
"""


def cold(args) -> int:
    env = {**os.environ, "CUDA_CACHE_DISABLE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", COLD, os.path.join(args.fixtures, "model")], env=env,
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    print(p.stdout.strip() or p.stderr[-3000:])
    print(f"process wall time {wall:.2f} s (CUDA_CACHE_DISABLE=1)")
    return p.returncode


def parity(args) -> int:
    """The tiny fixture on the GPU in float32 against what the official implementation computed."""
    import numpy as np

    import glm2rs

    g = os.path.join(args.fixtures, "golden")
    fwd = np.load(os.path.join(g, "forward.npz"))
    ok = True

    def check(label, got, want, tol):
        nonlocal ok
        err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
        ok &= err < tol
        print(f"{label}: max |logit difference| {err:.2e} ({'ok' if err < tol else 'FAIL'}, < {tol})")

    m = glm2rs.Model.from_pretrained(os.path.join(args.fixtures, "model"), device=args.device, dtype="float32",
                                     progress=False)
    check("forward, all positions", m.logits(fwd["ids_0"].tolist()), fwd["logits_0"], 1e-3)
    for i in (1, 2):
        check(f"forward {i}, last position", m.logits(fwd[f"ids_{i}"].tolist())[-1], fwd[f"logits_{i}"][0], 1e-3)
    chat = json.load(open(os.path.join(g, "generate.json")))["chat"][0]
    ids = m.generate_ids(m.tokenizer.encode(m.tokenizer.build_prompt(chat["query"])),
                         max_new_tokens=chat["max_new_tokens"])
    ok &= ids == chat["output_ids"]
    print(f"greedy chat ids equal the official: {ids == chat['output_ids']}")
    quant = json.load(open(os.path.join(g, "quantized.json")))
    for bits in ("int8", "int4"):
        q = glm2rs.Model.from_pretrained(os.path.join(args.fixtures, f"model-{bits}"), device=args.device,
                                         dtype="float32", progress=False)
        want = np.load(os.path.join(g, f"{bits}_last_logits.npy")).reshape(-1)
        check(f"official {bits} checkpoint, last position", q.logits(quant[bits]["prompt_ids"])[-1], want, 1e-3)
    return 0 if ok else 1


def speed(args) -> int:
    import numpy as np

    import glm2rs
    from long_context import decode_rate, prompt  # benches/ is on the path of a script run from it

    def decode(m, ids: list[int], steps: int) -> tuple[float, list[int]]:
        rate, out_ids = decode_rate(m, ids, steps)
        return rate, out_ids[:32]

    m = glm2rs.Model.from_pretrained(args.ckpt, device="cuda", dtype="bfloat16", progress=False, prefix_cache=False)
    rng = np.random.default_rng(0)
    out = {"build": glm2rs.build_info()["features"], "runs": {}}
    for n in (32, 2048, 8192):
        ids = prompt(rng, n)
        m.last_logits([ids])  # warm-up (and the graph capture)
        t = time.perf_counter()
        m.last_logits([ids])
        prefill = time.perf_counter() - t
        rate, out_ids = decode(m, ids, 64)
        out["runs"][str(n)] = {"prefill_s": prefill, "decode_tok_s": rate, "ids": out_ids}
        print(f"{n}: prefill {prefill:.3f} s, decode {rate:.1f} tok/s", flush=True)
    # int4 (quantized at load): decode after a short prompt
    del m
    m = glm2rs.Model.from_pretrained(args.ckpt, device="cuda", dtype="bfloat16", quantize=4, progress=False,
                                     prefix_cache=False)
    ids = prompt(rng, 32)
    m.generate_ids(ids, max_new_tokens=4)  # warm-up
    rate, out_ids = decode(m, ids, 128)
    out["runs"]["int4, 32"] = {"prefill_s": 0.0, "decode_tok_s": rate, "ids": out_ids}
    print(f"int4, 32: decode {rate:.1f} tok/s", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


def compare(args) -> int:
    a, b = (json.load(open(p)) for p in (args.a, args.b))
    print(f"| prompt | prefill {args.a} | prefill {args.b} | decode {args.a} | decode {args.b} | greedy ids equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    same = True
    for n, ra in a["runs"].items():
        rb = b["runs"][n]
        eq = ra["ids"] == rb["ids"]
        same &= eq
        print(f"| {n} | {ra['prefill_s']:.3f} s | {rb['prefill_s']:.3f} s | {ra['decode_tok_s']:.1f} | "
              f"{rb['decode_tok_s']:.1f} | {eq} |")
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cold")
    c.add_argument("--fixtures", required=True)
    p = sub.add_parser("parity")
    p.add_argument("--fixtures", required=True)
    p.add_argument("--device", default="cuda")
    s = sub.add_parser("speed")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--out", required=True)
    k = sub.add_parser("compare")
    k.add_argument("a")
    k.add_argument("b")
    args = ap.parse_args()
    return {"cold": cold, "parity": parity, "speed": speed, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
