"""Kernel-level profile of decoding (or a 2048-token prefill) with Nsight Compute, per token.

    # the workload, run under ncu (on the GPU machine):
    ncu --target-processes all --launch-skip 4000 --launch-count 1200 --csv --page raw \
        --metrics gpu__time_duration.sum -o - python benches/ncu_profile.py run CKPT decode > raw.csv
    # the summary: kernels per token, GPU time per token by kernel
    python benches/ncu_profile.py summarize raw.csv --layers 28

The workload loads the checkpoint in bfloat16 on cuda, prefills 32 tokens and decodes 400 (decode),
or runs four 2048-token prefills (prefill; `run CKPT prefill 32000` for another length). GLM2RS_FUSED=0 gives the decode step of candle's own ops.

Without Nsight Compute, a prefill's kernels side by side with transformers' GLM (SDPA), through
the PyTorch profiler (CUPTI sees every kernel of the process, glm2rs's too):

    python benches/ncu_profile.py kineto CKPT 8192     # GPU time by kernel, both engines
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def run(ckpt: str, mode: str, length: int = 2048) -> None:
    import glm2rs

    m = glm2rs.Model.from_pretrained(ckpt, device="cuda", dtype="bfloat16", prefix_cache=False)
    ids = [64790, 64792] + [(7 * i) % 60000 + 100 for i in range(length - 2)]
    if mode == "decode":
        for _ in m.stream_ids(ids[:32], max_new_tokens=400):
            pass
    else:
        for _ in range(4):
            m.last_logits([ids])


def kineto(ckpt: str, lengths: list[int]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import glm2rs
    from long_context import hf_glm_6b  # benches/ is on the path of a script run from it

    def ids_of(n):
        return [64790, 64792] + [(7 * i) % 60000 + 100 for i in range(n - 2)]

    def table(label, prof, top=14):
        by = defaultdict(lambda: [0, 0.0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by[e.name[:70]][0] += 1
                by[e.name[:70]][1] += e.device_time
        total = sum(t for _, t in by.values())
        print(f"\n{label}: {total / 1e3:.1f} ms of GPU time in kernels")
        print("| kernel | launches | ms | share |")
        print("| --- | --- | --- | --- |")
        for k, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"| {k} | {c} | {t / 1e3:.1f} | {100 * t / total:.0f}% |")

    # each engine loaded once, every length profiled after a warm-up pass of the same length
    m = glm2rs.Model.from_pretrained(ckpt, device="cuda", dtype="bfloat16", progress=False, prefix_cache=False)
    for n in lengths:
        m.last_logits([ids_of(n)])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.last_logits([ids_of(n)])
        table(f"glm2rs prefill of {n} tokens", prof)
    del m
    hf = hf_glm_6b()
    with torch.no_grad():
        for n in lengths:
            x = torch.tensor([ids_of(n)], device="cuda")
            hf(input_ids=x, logits_to_keep=1)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                hf(input_ids=x, logits_to_keep=1)
                torch.cuda.synchronize()
            table(f"transformers SDPA prefill of {n} tokens", prof)


def summarize(path: str, layers: int) -> None:
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    reader = csv.DictReader(lines)
    for r in reader:
        name = r.get("Kernel Name") or r.get("Function Name") or ""
        t = r.get("gpu__time_duration.sum", "")
        try:
            rows.append((name, float(t.replace(",", ""))))
        except ValueError:
            continue  # the units row
    if not rows:
        print("no kernels in the profile")
        return
    # one decode step = `layers` attention kernels (fused) or ask the count of rms norms / 2
    att = sum(1 for n, _ in rows if "decode_attention" in n)
    norms = sum(1 for n, _ in rows if "rmsnorm" in n)
    steps = att / layers if att else norms / (2 * layers + 1)
    total = sum(t for _, t in rows)
    by = defaultdict(lambda: [0, 0.0])
    for n, t in rows:
        key = n.split("(")[0][:60]
        by[key][0] += 1
        by[key][1] += t
    unit = "ns"
    print(f"{len(rows)} kernels, {steps:.1f} steps: {len(rows) / max(steps, 1e-9):.0f} kernels and "
          f"{total / max(steps, 1e-9) / 1e3:.1f} us of GPU time per step ({unit} in the profile)")
    print("| kernel | per step | us per step |")
    print("| --- | --- | --- |")
    for k, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"| {k} | {c / max(steps, 1e-9):.1f} | {t / max(steps, 1e-9) / 1e3:.1f} |")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], *[int(n) for n in sys.argv[4:5]])
    elif sys.argv[1] == "kineto":
        kineto(sys.argv[2], [int(n) for n in sys.argv[3:]])
    else:
        layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 28
        summarize(sys.argv[2], layers)
