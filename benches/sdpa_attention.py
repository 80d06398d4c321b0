"""PyTorch's own attention kernels on chatglm2-6b's prompt shapes, the peer of benches/flash_bench.cu.

    python benches/sdpa_attention.py 2048 8192 32000

Causal attention of one layer (32 query heads, 2 key/value groups expanded as transformers'
GLM does, head_dim 128, bfloat16) through `scaled_dot_product_attention` with each backend PyTorch
has here (cuDNN, FlashAttention-2, memory-efficient): ms per layer and TFLOP/s counted as in
flash_bench.cu (4 t (t / 2) 128 heads FLOP).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    heads, groups, d = 32, 2, 128
    for t in map(int, sys.argv[1:] or ["2048", "8192", "32000"]):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, heads, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, groups, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, groups, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
        flop = 4.0 * t * (t / 2.0) * d * heads
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    torch.cuda.synchronize()
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    reps = 10
                    a.record()
                    for _ in range(reps):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    b.record()
                    b.synchronize()
                    ms = a.elapsed_time(b) / reps
                print(f"sdpa {name:<12} t {t:6d}: {ms:8.3f} ms per layer, {flop / ms / 1e9:6.1f} TFLOP/s", flush=True)
            except RuntimeError as e:
                print(f"sdpa {name:<12} t {t:6d}: not available ({str(e).splitlines()[0][:80]})")


if __name__ == "__main__":
    main()
