"""GGUF round trip on a big checkpoint: quantize while loading, write the file, load it back.
Prints file size, quantize+load time, write time and GGUF load time.

    python benches/bench_gguf.py MODEL_DIR OUT_DIR --type 4 --type q4_0
"""

from __future__ import annotations

import argparse
import os
import time

import glm2rs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--type", action="append", required=True)
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print("| type | quantize on load s | write s | file GiB | load GGUF s |")
    print("| --- | --- | --- | --- | --- |")
    for t in a.type:
        t0 = time.perf_counter()
        m = glm2rs.Model.from_pretrained(a.model, dtype=a.dtype, quantize=t)
        t1 = time.perf_counter()
        path = os.path.join(a.out, f"model-{t}.gguf")
        m.save_quantized(path)
        t2 = time.perf_counter()
        del m
        m = glm2rs.Model.from_pretrained(path, dtype=a.dtype)
        t3 = time.perf_counter()
        print(f"| {m.quantization} | {t1 - t0:.1f} | {t2 - t1:.1f} | {os.path.getsize(path) / 2**30:.2f} | {t3 - t2:.1f} |",
              flush=True)
        del m
        os.remove(path)


if __name__ == "__main__":
    main()
