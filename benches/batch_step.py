"""Host cost of a batched decoding step: the tiny fixture on the CPU, where the model's own work
is small and what the engine does around it (per-sequence caches, sampling, bookkeeping) shows.
Used to compare wheels side by side (issue #14: the redesign's batch-64 figure).

    PYTHONPATH=SITE python benches/batch_step.py [--fixtures DIR] [--batch 64] [--new 65] [--runs 3]

Prints the best aggregate decode tokens/s of `runs` runs: a `new`-token batched generation less a
1-token one (the prompts' prefill), 64 prompts of 32 tokens.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import glm2rs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", type=Path, default=Path(os.environ.get("GLM2RS_FIXTURES", "../shared/fixtures/tiny-glm2")))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    m = glm2rs.Model.from_pretrained(str(a.fixtures / "model"), dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    prompts = [[64790, 64792] + [int(x) for x in rng.integers(100, 60000, 30)] for _ in range(a.batch)]
    m.generate_batch_ids(prompts, max_new_tokens=4)
    best = 0.0
    for _ in range(a.runs):
        t = time.perf_counter()
        m.generate_batch_ids(prompts, max_new_tokens=1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = m.generate_batch_ids(prompts, max_new_tokens=a.new)
        tn = time.perf_counter() - t
        best = max(best, (sum(len(o) for o in out) - a.batch) / max(tn - t1, 1e-9))
    print(f"glm2rs {glm2rs.__version__} batch {a.batch}: {best:.0f} tok/s")


if __name__ == "__main__":
    main()
