"""Long context on the CPU: decode speed after prompts of growing length, one model, one process.

    python benches/cpu_long_context.py [--ckpt /tmp/glm6b-2layers] [--layers 2] [--dtype float32]
                                       [--contexts 32,2048,8192] [--decode 16] [--threads N]

A random-weight checkpoint with chatglm2-6b's real shapes (hidden 4096, 32 heads, 2 KV groups,
head_dim 128, MLP 13696), `--layers` of them (written once by make_random_checkpoint.py; per layer
the weights and the KV cache have the 6B model's sizes, so the cost of the cache against the weights
is the 6B model's). For each context: the prompt is prefilled, then `--decode` greedy tokens are
timed (the clock starts at the first new token). Prints tokens/s per context and the ratio to the
shortest, with the CPU's name (`lscpu`), since the processor under this machine changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/glm6b-2layers"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--contexts", default="32,2048,8192")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--fixtures", type=Path, default=Path(os.environ.get("GLM2RS_FIXTURES", "../shared/fixtures/tiny-glm2")))
    ap.add_argument("--out")
    a = ap.parse_args()
    if not (a.ckpt / "config.json").exists():
        here = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(here / "make_random_checkpoint.py"), str(a.ckpt), "--layers", str(a.layers),
                        "--shards", "1", "--fixtures", str(a.fixtures)], check=True)
    import glm2rs

    m = glm2rs.Model.from_pretrained(str(a.ckpt), device="cpu", dtype=a.dtype)
    rng = np.random.default_rng(0)
    results = {"cpu": cpu_name(), "threads": os.cpu_count(), "dtype": a.dtype, "layers": a.layers, "contexts": {}}
    print(f"{results['cpu']}, {os.cpu_count()} threads, {a.layers} layers of chatglm2-6b shapes, {a.dtype}", flush=True)
    base = None
    for n in [int(x) for x in a.contexts.split(",")]:
        ids = [64790, 64792] + [int(x) for x in rng.integers(100, 60000, n - 2)]
        t0 = time.perf_counter()
        s = m.stream_ids(ids, max_new_tokens=a.decode + 1, do_sample=False)
        t_first = None
        for _ in s:
            if t_first is None:
                t_first, n_first = time.perf_counter(), len(s.token_ids)
        rate = (len(s.token_ids) - n_first) / (time.perf_counter() - t_first)
        base = base or rate
        results["contexts"][str(n)] = {"prefill_and_first_s": t_first - t0, "decode_tok_s": rate, "ratio": rate / base}
        print(f"context {n:>6}: prefill + first token {t_first - t0:7.2f} s, decode {rate:7.2f} tok/s "
              f"({rate / base:.2f} of the shortest)", flush=True)
    print(f"KV pool: {m.kv_cache_info()}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
