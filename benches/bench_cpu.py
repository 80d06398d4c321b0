"""CPU benchmark: load time, peak RSS, prefill and decode tokens/s of glm2rs on a checkpoint
(by default a random-weight chatglm2-6b written by make_random_checkpoint.py).

    python benches/bench_cpu.py MODEL_DIR --dtype float16 --prompt 128 --new 16

Each configuration runs in a fresh process so that its peak RSS is its own.
Prints one markdown table row per run (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def run_one(model_dir: str, dtype: str, prompt_len: int, new: int, reps: int, quantize: str | None = None) -> dict:
    import numpy as np

    import glm2rs

    t0 = time.perf_counter()
    m = glm2rs.Model.from_pretrained(model_dir, dtype=dtype, progress=True, quantize=quantize)
    load_s = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rng = np.random.default_rng(0)
    ids = [64790, 64792] + [int(x) for x in rng.integers(100, 60000, prompt_len - 2)]
    # One stream: its first piece comes after the forward over the prompt and the first token
    # (the prefill figure); the pieces after it give the decode rate.
    t0 = time.perf_counter()
    stream = m.stream_ids(ids, max_new_tokens=new + 1)
    t_first, n_first = None, 0
    for _ in stream:
        if t_first is None:
            t_first, n_first = time.perf_counter(), len(stream.token_ids)
    t_end = time.perf_counter()
    prefill_s = (t_first or t_end) - t0
    for _ in range(reps - 1):  # more prefill samples: keep the best
        t = time.perf_counter()
        m.generate_ids(ids, max_new_tokens=1)
        prefill_s = min(prefill_s, time.perf_counter() - t)
    n_dec = len(stream.token_ids) - n_first
    decode_tps = n_dec / (t_end - t_first) if t_first and n_dec > 0 and t_end > t_first else float("nan")
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "dtype": m.dtype + (f" + {m.quantization}" if m.quantization else ""),
        "weights_gib": round(m.weight_bytes / 2**30, 2),
        "layers": m.config["num_layers"],
        "load_s": round(load_s, 2),
        "rss_after_load_gib": round(rss_load, 2),
        "peak_rss_gib": round(rss_peak, 2),
        "prompt_tokens": prompt_len,
        "prefill_s": round(prefill_s, 3),
        "prefill_tok_s": round(prompt_len / prefill_s, 2),
        "decode_tokens": n_dec,
        "decode_tok_s": round(decode_tps, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dtype", action="append", help="float16, bfloat16, float32 (repeatable)")
    ap.add_argument("--quantize", action="append", help="8, 4, q8_0, q4_0, ... (repeatable; runs with --dtype's first)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtypes = a.dtype or ["float16"]
    if a.child:
        q = a.quantize[0] if a.quantize else None
        print(json.dumps(run_one(a.model, dtypes[0], a.prompt, a.new, a.reps, q)))
        return
    runs = [(d, None) for d in dtypes] if not a.quantize else [(dtypes[0], q) for q in a.quantize]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
          file=sys.stderr)
    print("| weights | layers | weight GiB | load s | RSS after load GiB | peak RSS GiB | prompt | prefill tok/s | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d, q in runs:
        cmd = [sys.executable, __file__, a.model, "--dtype", d, "--prompt", str(a.prompt), "--new", str(a.new),
               "--reps", str(a.reps), "--child"] + (["--quantize", q] if q else [])
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if res.returncode != 0:
            print(f"| {d} {q or ''} | failed (exit {res.returncode}) | | | | | | | |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        if a.json:
            print(json.dumps(r), file=sys.stderr)
        print(f"| {r['dtype']} | {r['layers']} | {r['weights_gib']} | {r['load_s']} | {r['rss_after_load_gib']} | {r['peak_rss_gib']} | "
              f"{r['prompt_tokens']} | {r['prefill_tok_s']} | {r['decode_tok_s']} |", flush=True)


if __name__ == "__main__":
    main()
