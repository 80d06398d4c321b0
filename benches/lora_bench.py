"""Decoding speed with LoRA adapters kept beside the weights (unmerged), against the same model
without them and with an adapter merged at load, on a random checkpoint of the real shapes
(benches/make_random_checkpoint.py). Writes random peft-format adapters (rank --rank, every
target module) next to it.

    python benches/lora_bench.py --ckpt /tmp/glm6b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import glm2rs


def write_adapter(ckpt: Path, out: Path, rank: int, seed: int) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    h, f, hd = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"]
    nh, ng = cfg["num_attention_heads"], cfg["multi_query_group_num"]
    shapes = {"self_attention.query_key_value": ((nh + 2 * ng) * hd, h), "self_attention.dense": (h, nh * hd),
              "mlp.dense_h_to_4h": (2 * f, h), "mlp.dense_4h_to_h": (h, f)}
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(cfg["num_layers"]):
        for m, (o, n) in shapes.items():
            p = f"base_model.model.transformer.encoder.layers.{i}.{m}"
            t[p + ".lora_A.weight"] = (rng.standard_normal((rank, n)) * 0.01).astype(np.float32)
            t[p + ".lora_B.weight"] = (rng.standard_normal((o, rank)) * 0.01).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}))


def rate(fn, tokens: int) -> float:
    fn()  # warm up (graphs, kernels)
    t0 = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/glm6b"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    ads = {f"lora{i}": a.ckpt.parent / f"lora{i}" for i in range(2)}
    for i, (n, d) in enumerate(ads.items()):
        write_adapter(a.ckpt, d, a.rank, i)
    m = glm2rs.Model.from_pretrained(a.ckpt, device=a.device, dtype=a.dtype, adapters={n: str(d) for n, d in ads.items()})
    ids = [64790, 64792] + list(range(1000, 1126))
    kw = dict(max_new_tokens=a.tokens, stop_token_ids=[], do_sample=False)
    n = a.tokens
    base = rate(lambda: m.generate_ids(ids, **kw), n)
    one = rate(lambda: m.generate_ids(ids, adapter="lora0", **kw), n)
    prompts = [ids[:-1] + [2000 + j] for j in range(a.batch)]
    bbase = rate(lambda: m.generate_batch_ids(prompts, **kw), n * a.batch)
    view = m.with_adapter("lora0")  # a batch of one adapter (batches mixing adapters: a server's engine)
    bone = rate(lambda: view.generate_batch_ids(prompts, **kw), n * a.batch)
    del m
    merged = glm2rs.Model.from_pretrained(a.ckpt, device=a.device, dtype=a.dtype, adapter=str(ads["lora0"]))
    mrate = rate(lambda: merged.generate_ids(ids, **kw), n)
    print(json.dumps({"device": a.device, "dtype": a.dtype, "rank": a.rank, "decode_tok_s": {
        "base": round(base, 1), "adapter_unmerged": round(one, 1), "adapter_merged": round(mrate, 1),
        f"batch{a.batch}_base": round(bbase, 1), f"batch{a.batch}_adapter_unmerged": round(bone, 1)}}))


if __name__ == "__main__":
    main()
