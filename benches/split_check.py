"""Repeatability of a model split over GPUs (run on a machine with two GPUs):

    python benches/split_check.py NUM_GPUS REPS [CHECKPOINT_SUBDIR]

Loads tiny-glm2 (GLM2RS_FIXTURES, default ../shared/fixtures/tiny-glm2) in float32 over NUM_GPUS
GPUs, then REPS times generates 16 greedy tokens for three prompts one at a time and batched, and
counts the repetitions whose ids differ from the first one-at-a-time repetition. Any mismatch is a
bug: the same work on the same data must give the same ids.
"""

import os
import sys
from pathlib import Path

import glm2rs

gpus, reps = int(sys.argv[1]), int(sys.argv[2])
sub = sys.argv[3] if len(sys.argv) > 3 else "model-safetensors"
fx = Path(os.environ.get("GLM2RS_FIXTURES", "../shared/fixtures/tiny-glm2"))
m = glm2rs.Model.from_pretrained(str(fx / sub), device="cuda", dtype="float32", num_gpus=gpus)
tok = m.tokenizer
prompts = [tok.encode(p) for p in ("你好", "a longer prompt with more tokens in it", "x")]
ref = None
bad_single = bad_batch = 0
for _ in range(reps):
    single = [m.generate_ids(p, max_new_tokens=16) for p in prompts]
    batch = m.generate_batch_ids(prompts, max_new_tokens=16)
    ref = ref or single
    bad_single += single != ref
    bad_batch += batch != ref
print(f"{gpus} GPUs, {sub}: {reps} repetitions, one-at-a-time mismatches {bad_single}, "
      f"batched != one at a time {bad_batch}")
sys.exit(1 if bad_single or bad_batch else 0)
