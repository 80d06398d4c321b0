"""Long context on one GPU: glm2rs against transformers' own GLM model (SDPA) in the same run.

    python benches/long_context.py --fixtures DIR [--ckpt /tmp/glm6b] [--contexts 2048,8192,32000]
                                   [--decode 64] [--batch 64x4096,256x512] [--parity] [--hf] [--out results.json]

- glm2rs, random chatglm2-6b weights in bfloat16, batch 1: prefill of each context (best of 2, the
  allocator's peak), then decoding after it (tokens/s after the first token), with the split
  (flash-decoding) attention and, same process and weights, without it (`split_decode=False`);
  greedy ids of both compared.
- batch: `NxL` (comma-separated list): N sequences of L prompt tokens decoded together, aggregate tokens/s.
- hf: transformers' `GlmForCausalLM` with `attn_implementation="sdpa"`, the same shapes (random
  weights of its own: speed does not depend on them), prefill (`logits_to_keep=1`, as glm2rs keeps
  the last row only) and 32 eager decode steps after it, `torch.cuda.max_memory_allocated`.
- parity: the split kernel against the one-block kernel and candle's unfused ops, in float32 where
  sums in another order stay far below any logit gap: a 2-layer model of the real 6B attention
  shapes (32 heads, 2 KV groups, head_dim 128) at 200 / 3,000 / 9,000 tokens and a batch mixing
  those lengths; the tiny fixture with a 3,500-token prompt; each also with the prompt prefilled
  in chunks of 1,000 tokens (`prefill_chunk`). Greedy ids must be equal.
- chunked: the 6B bf16 prompt of 8,192 tokens prefilled in one piece and in chunks of N tokens
  (`--chunked N`, read back through the paged cache): greedy ids compared, chunked prefill timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import glm2rs
from gpu_bench import make_big  # benches/ is on the path of a script run from it

RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def prompt(rng, n: int) -> list[int]:
    return [64790, 64792] + [int(x) for x in rng.integers(100, 60000, n - 2)]


def decode_rate(m, ids: list[int], steps: int) -> tuple[float, list[int]]:
    """Tokens/s of the decode after the prompt (the clock starts at the first new token)."""
    s = m.stream_ids(ids, max_new_tokens=steps + 1, do_sample=False)
    t_first, n_first = None, 0
    for _ in s:
        if t_first is None:
            t_first, n_first = time.perf_counter(), len(s.token_ids)
    rate = (len(s.token_ids) - n_first) / max(time.perf_counter() - t_first, 1e-9)
    return rate, list(s.token_ids)


def greedy(m, ids: list[int], steps: int) -> list[int]:
    return list(m.generate_ids(ids, max_new_tokens=steps, do_sample=False))


def parity(fx: Path, mid: Path) -> bool:
    ok = True
    rng = np.random.default_rng(1)
    # (the modes without the prefix cache: each computes its whole prompt; `cached` runs each
    # prompt twice, the second time from the blocks the first left in the cache)
    m = glm2rs.Model.from_pretrained(str(mid), device="cuda", dtype="float32", prefix_cache=False)
    cached = glm2rs.Model.from_pretrained(str(mid), device="cuda", dtype="float32")
    modes = {"split": m, "one_block": m.with_tuning(split_decode=False), "unfused": m.with_tuning(fused=False),
             "chunked": m.with_tuning(prefill_chunk=1000)}
    lengths = (200, 3000, 9000)
    prompts = [prompt(rng, n) for n in lengths]
    for ids in prompts:
        got = {k: greedy(mm, ids, 24) for k, mm in modes.items()}
        greedy(cached, ids, 1)
        got["prefix_cached"] = greedy(cached, ids, 24)
        same = got["split"] == got["one_block"] == got["unfused"] == got["chunked"] == got["prefix_cached"]
        ok &= same
        RESULTS.setdefault("parity", {})[f"6b-shapes/{len(ids)}"] = {k: v[-24:] for k, v in got.items()} | {"equal": same}
        log(f"parity 6B attention shapes, f32, {len(ids)} tokens: split == one-block == unfused == chunked == "
            f"prefix-cached: {same}")
    # a batch mixing short and long sequences: each row as when decoded alone
    mixed = [prompts[1], prompt(rng, 50), prompts[2], prompt(rng, 700)]
    alone = [greedy(m, ids, 12)[-12:] for ids in mixed]
    batch = [list(o)[-12:] for o in m.generate_batch_ids(mixed, max_new_tokens=12, do_sample=False)]
    same = batch == alone
    ok &= same
    RESULTS["parity"]["6b-shapes/batch"] = {"equal": same}
    log(f"parity 6B attention shapes, f32, batch of {[len(p) for p in mixed]}: batch == alone: {same}")
    del m, modes, cached
    t = glm2rs.Model.from_pretrained(str(fx / "model"), device="cuda", dtype="float32", prefix_cache=False)
    ids = prompt(rng, 3500)
    got = {k: greedy(mm, ids, 24) for k, mm in
           {"split": t, "one_block": t.with_tuning(split_decode=False), "unfused": t.with_tuning(fused=False),
            "chunked": t.with_tuning(prefill_chunk=1000)}.items()}
    c = glm2rs.Model.from_pretrained(str(fx / "model"), device="cpu", dtype="float32", prefix_cache=False)
    cpu, cpu_chunked = greedy(c, ids, 24), greedy(c.with_tuning(prefill_chunk=1000), ids, 24)
    same = got["split"] == got["one_block"] == got["unfused"] == got["chunked"] == cpu == cpu_chunked
    ok &= same
    RESULTS["parity"]["tiny/3500"] = {"equal": same}
    log(f"parity tiny fixture, f32, 3500 tokens: split == one-block == unfused == chunked == CPU == CPU chunked: {same}")
    return ok


def glm2rs_figures(d: Path, contexts: list[int], steps: int, batch: list[tuple[int, int]], chunked: int = 0,
                   block_size: int = 64) -> None:
    # without the prefix cache: a prompt timed twice (or decoded by two kernels) is computed each time
    m = glm2rs.Model.from_pretrained(str(d), device="cuda", dtype="bfloat16", kv_block_size=block_size,
                                     prefix_cache=False)
    log(f"glm2rs KV pool: {m.kv_cache_info()}")
    rng = np.random.default_rng(0)
    m.last_logits([prompt(rng, 64)])  # warm up
    decode_rate(m, prompt(rng, 64), 8)
    short, _ = decode_rate(m, prompt(rng, 32), steps)
    RESULTS["glm2rs_short_decode_tok_s"] = short
    log(f"glm2rs bf16 decode after 32 tokens: {short:.1f} tok/s")
    one_block = m.with_tuning(split_decode=False)
    no_flash = m.with_tuning(flash=False)
    mma = m.with_tuning(wgmma=False)  # the mma.sync flash kernel (what GPUs other than Hopper run)
    whole = m.with_tuning(prefill_chunk=0)
    chunk = m.tuning["prefill_chunk"]
    for n in contexts:
        ids = prompt(rng, n)
        glm2rs.cuda_memory("cuda", reset_peak=True)
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            m.last_logits([ids])
            ts.append(time.perf_counter() - t)
        split, ids_split = decode_rate(m, ids, steps)
        peak = glm2rs.cuda_memory("cuda", reset_peak=True)["used_peak"] / 2**30
        t = time.perf_counter()
        whole.last_logits([ids])
        t_whole = time.perf_counter() - t
        peak_whole = glm2rs.cuda_memory("cuda")["used_peak"] / 2**30
        t = time.perf_counter()
        no_flash.last_logits([ids])
        blocked = time.perf_counter() - t
        mma.last_logits([ids])
        t = time.perf_counter()
        mma.last_logits([ids])
        t_mma = time.perf_counter() - t
        old, ids_old = decode_rate(one_block, ids, steps)
        r = {"prefill_s": min(ts), "prefill_chunk": chunk, "prefill_whole_s": t_whole, "prefill_blocked_s": blocked, "prefill_mma_sync_s": t_mma,
             "decode_tok_s": split, "decode_one_block_tok_s": old, "allocated_peak_gib": peak,
             "allocated_peak_whole_gib": peak_whole, "ids_equal": ids_split == ids_old,
             "ids_common_prefix": next((i for i, (a, b) in enumerate(zip(ids_split, ids_old)) if a != b), len(ids_split))}
        RESULTS.setdefault("glm2rs", {})[str(n)] = r
        log(f"glm2rs bf16 {n}: prefill {r['prefill_s']:.3f} s (chunks of {chunk}; in one pass {t_whole:.3f} s, "
            f"peak {peak_whole:.2f} GiB; flash=False: {blocked:.3f} s; mma.sync flash kernel {t_mma:.3f} s), decode {split:.1f} tok/s "
            f"(one-block kernel {old:.1f}), allocated peak {peak:.2f} GiB, ids equal {r['ids_equal']} "
            f"(the first {r['ids_common_prefix']} of {len(ids_split)} new ids)")
    if chunked:
        ids = prompt(rng, 8192)
        mc = m.with_tuning(prefill_chunk=chunked)
        whole = greedy(m, ids, 32)
        t = time.perf_counter()
        parts = greedy(mc, ids, 1)
        t_chunked = time.perf_counter() - t
        parts = greedy(mc, ids, 32)
        same = whole == parts
        RESULTS["glm2rs_chunked"] = {"context": 8192, "chunk": chunked, "ids_equal": same, "prefill_and_first_token_s": t_chunked}
        log(f"glm2rs bf16 8192 prefilled in chunks of {chunked}: greedy ids (32) equal to one piece: {same}; "
            f"chunked prefill + first token {t_chunked:.3f} s")
    for b, n in batch:
        prompts = [prompt(rng, n) for _ in range(b)]
        res = {}
        for label, mm in (("split", m), ("one_block", one_block)):
            t = time.perf_counter()
            mm.generate_batch_ids(prompts, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            out = mm.generate_batch_ids(prompts, max_new_tokens=33, do_sample=False)
            t33 = time.perf_counter() - t
            res[label] = (sum(len(o) for o in out) - b) / max(t33 - t1, 1e-9)
        RESULTS.setdefault("glm2rs_batch", []).append(
            {"batch": b, "context": n, "tok_s": res["split"], "one_block_tok_s": res["one_block"]})
        log(f"glm2rs bf16 batch {b} x {n}: decode {res['split']:.0f} tok/s aggregate (one-block {res['one_block']:.0f})")
    del m, one_block, no_flash, whole


def hf_glm_6b():
    """transformers' own GLM model (`GlmForCausalLM`, SDPA attention) with chatglm2-6b's shapes,
    random bfloat16 weights on the GPU (speed does not depend on them)."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                    max_position_embeddings=32768, attention_bias=True, rms_norm_eps=1e-5, pad_token_id=0,
                    eos_token_id=2, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        return GlmForCausalLM(cfg).eval()


def hf_figures(contexts: list[int]) -> None:
    import torch
    import transformers

    model = hf_glm_6b()
    impl = getattr(model.config, "_attn_implementation", "?")
    log(f"transformers {transformers.__version__} GlmForCausalLM, attention {impl}, torch {torch.__version__}")
    RESULTS["hf_versions"] = {"transformers": transformers.__version__, "torch": torch.__version__, "attention": impl}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt(rng, 64)], device="cuda"), logits_to_keep=1)
        for n in contexts:
            ids = torch.tensor([prompt(rng, n)], device="cuda")
            torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(32):
                o = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            dec = 32 / (time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated() / 2**30
            RESULTS.setdefault("hf", {})[str(n)] = {"prefill_s": min(ts), "decode_eager_tok_s": dec, "allocated_peak_gib": peak}
            log(f"transformers sdpa bf16 {n}: prefill {min(ts):.3f} s, eager decode {dec:.1f} tok/s, allocated peak {peak:.2f} GiB")
            del out, past, o
    del model
    torch.cuda.empty_cache()


def table(contexts: list[int]) -> None:
    g, h = RESULTS.get("glm2rs", {}), RESULTS.get("hf", {})
    log("\n| context | prefill, transformers SDPA | prefill, glm2rs | ratio | decode after it, glm2rs (split) | one-block kernel | glm2rs peak GiB | transformers peak GiB |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in contexts:
        a, b = h.get(str(n), {}), g.get(str(n), {})
        ratio = a["prefill_s"] / b["prefill_s"] if a and b else float("nan")
        log(f"| {n:,} | {a.get('prefill_s', float('nan')):.3f} s | {b.get('prefill_s', float('nan')):.3f} s | {ratio:.2f}x "
            f"| {b.get('decode_tok_s', float('nan')):.1f} tok/s | {b.get('decode_one_block_tok_s', float('nan')):.1f} tok/s "
            f"| {b.get('allocated_peak_gib', float('nan')):.2f} | {a.get('allocated_peak_gib', float('nan')):.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True, type=Path)
    ap.add_argument("--ckpt", default="/tmp/glm6b", type=Path)
    ap.add_argument("--contexts", default="2048,8192,32000")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--batch", default="", help="NxL[,NxL...]: N sequences of L prompt tokens")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--skip-glm2rs", action="store_true")
    ap.add_argument("--chunked", type=int, default=0, help="also prefill 8,192 tokens in chunks of N and compare ids")
    ap.add_argument("--block-size", type=int, default=16, help="KV cache block size")
    ap.add_argument("--out")
    a = ap.parse_args()
    contexts = [int(x) for x in a.contexts.split(",") if x]
    batch = [tuple(int(x) for x in b.split("x")) for b in a.batch.split(",") if b]
    ok = True
    try:
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], check=False)
        if a.parity:
            mid = make_big(a.fixtures, a.ckpt.parent / (a.ckpt.name + "-2layers"), layers=2)
            ok &= parity(a.fixtures, mid)
        if not a.skip_glm2rs:
            glm2rs_figures(make_big(a.fixtures, a.ckpt), contexts, a.decode, batch, a.chunked, a.block_size)
        if a.hf:
            hf_figures(contexts)
        table(contexts)
    finally:
        if a.out:
            Path(a.out).write_text(json.dumps(RESULTS, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
