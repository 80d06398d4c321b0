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

Where a long prefill's time goes beyond the kernels' own speed (the card's power limit), and
whether cuBLAS treats candle's GEMM call as PyTorch's:

    python benches/ncu_profile.py chunks CKPT 32000    # attention per chunk, clocks and watts
    python benches/ncu_profile.py gemm 8192 32000      # chatglm2-6b's prompt GEMMs: mm vs bmm(1)
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


def chunks(ckpt: str, n: int) -> None:
    """A prefill of `n` tokens in chunks of 8,192, in one pass and in chunks of 16,384: wall time,
    kernel time, the attention kernel's time per layer in each chunk, the GEMMs, and the SM clock
    and power nvidia-smi reports while it runs (sampled every 50 ms)."""
    import subprocess
    import threading
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    import glm2rs

    ids = [64790, 64792] + [(7 * i) % 60000 + 100 for i in range(n - 2)]
    m = glm2rs.Model.from_pretrained(ckpt, device="cuda", dtype="bfloat16", progress=False, prefix_cache=False)
    samples: list[str] = []
    running = [False]

    def sample() -> None:
        while running[0]:
            out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=False).stdout.strip()
            samples.append(out)
            time.sleep(0.05)

    for label, chunk, mm in [("chunks of 8192", 8192, m.with_tuning(prefill_chunk=8192)),
                             ("one pass", n, m.with_tuning(prefill_chunk=0)),
                             ("chunks of 16384", 16384, m.with_tuning(prefill_chunk=16384))]:
        mm.last_logits([ids])
        samples.clear()
        running[0] = True
        th = threading.Thread(target=sample)
        th.start()
        t = time.perf_counter()
        for _ in range(3):
            mm.last_logits([ids])
        wall = (time.perf_counter() - t) / 3
        running[0] = False
        th.join()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            mm.last_logits([ids])
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        fl = [e.device_time for e in ev if e.name.startswith("flash_wgmma") or e.name.startswith("flash_prefill")]
        gemms = sum(e.device_time for e in ev if e.name.startswith("nvjet") or "gemm" in e.name)
        total = sum(e.device_time for e in ev)
        # each chunk's launches (the last layer's last row is a decode step, not among them)
        g = max(len(fl) // -(-n // chunk), 1)
        per = [sum(fl[i:i + g]) / g / 1e3 for i in range(0, len(fl) - g + 1, g)]
        print(f"{label}: wall {wall:.3f} s, kernels {total / 1e3:.1f} ms, prompt attention {sum(fl) / 1e3:.1f} ms "
              f"(per layer in each chunk: {', '.join(f'{p:.3f}' for p in per)} ms), GEMMs {gemms / 1e3:.1f} ms")
        print(f"    SM MHz, W while timed: {samples[len(samples) // 4: len(samples) // 4 + 8]}")


def gemm(ms: list[int]) -> None:
    """chatglm2-6b's four prompt GEMMs at M rows, bf16: PyTorch's `mm` against a strided-batched
    product of batch 1 (the cuBLAS call candle makes), and `addmm` through cuBLASLt, timed back to
    back (20 each) with the kernels cuBLAS chose."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    shapes = {"query_key_value": (4608, 4096), "dense": (4096, 4096), "dense_h_to_4h": (27392, 4096),
              "dense_4h_to_h": (4096, 13696)}
    ws = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, kk) in shapes.items()}
    for m in ms:
        xs = {k: torch.randn(m, kk, device="cuda", dtype=torch.bfloat16) for k, (_, kk) in shapes.items()}
        ways = {
            "mm": lambda k: torch.mm(xs[k], ws[k].t()),
            "bmm(1)": lambda k: torch.bmm(xs[k][None], ws[k].t()[None])[0],
            "addmm (Lt)": lambda k: torch._addmm_activation(torch.zeros(ws[k].shape[0], device="cuda", dtype=torch.bfloat16),
                                                           xs[k], ws[k].t(), use_gelu=False),
        }
        for name in ["mm", "bmm(1)", "addmm (Lt)", "mm", "bmm(1)"]:
            f = ways[name]
            ms_by = {}
            for k in shapes:
                f(k)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    f(k)
                torch.cuda.synchronize()
                ms_by[k] = (time.perf_counter() - t) / 20 * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for k in shapes:
                    f(k)
                torch.cuda.synchronize()
            kernels = [e.name[:60] for e in p.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and "Memset" not in e.name]
            layer = sum(ms_by.values())
            print(f"M {m} {name:11s}: {layer:.3f} ms per layer (x28 {28 * layer:.1f} ms): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ms_by.items()))
            print(f"    {kernels}")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], *[int(n) for n in sys.argv[4:5]])
    elif sys.argv[1] == "kineto":
        kineto(sys.argv[2], [int(n) for n in sys.argv[3:]])
    elif sys.argv[1] == "chunks":
        chunks(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 32000)
    elif sys.argv[1] == "gemm":
        gemm([int(n) for n in sys.argv[2:]] or [8192, 32000])
    else:
        layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 28
        summarize(sys.argv[2], layers)
