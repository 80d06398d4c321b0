"""Write a random-weight ChatGLM2 checkpoint with the real chatglm2-6b shapes (or any shape),
as safetensors, tensor by tensor (memory stays near one tensor). Speed and memory do not
depend on the values, so no download is needed.

    python benches/make_random_checkpoint.py OUT_DIR --dtype bfloat16 [--layers 28] [--shards 7]

The tokenizer.model is copied from the fixtures (GLM2RS_FIXTURES) into OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

CHATGLM2_6B = {
    "_name_or_path": "random-chatglm2-6b",
    "model_type": "chatglm",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.27.1",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    nh, hd, g = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    qkv = nh * hd + 2 * g * hd
    out = [("transformer.embedding.word_embeddings.weight", (v, h))]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attention.query_key_value.weight", (qkv, h)),
            (f"{p}.self_attention.query_key_value.bias", (qkv,)),
            (f"{p}.self_attention.dense.weight", (h, nh * hd)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.dense_h_to_4h.weight", (2 * f, h)),
            (f"{p}.mlp.dense_4h_to_h.weight", (h, f)),
        ]
    out += [("transformer.encoder.final_layernorm.weight", (h,)), ("transformer.output_layer.weight", (v, h))]
    return out


class Pool:
    """Random 16-bit values drawn once and sliced at random offsets (fast for billions of values)."""

    def __init__(self, dtype: str, seed: int = 0, size: int = 1 << 24):
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(size) * 0.02).astype(np.float32)
        if dtype == "float16":
            self.pool = x.astype(np.float16).view(np.uint16)
        elif dtype == "bfloat16":
            self.pool = (x.view(np.uint32) >> 16).astype(np.uint16)
        else:
            raise SystemExit(f"unsupported dtype {dtype}")
        self.rng = rng

    def fill(self, n: int, ones: bool, dtype: str) -> bytes:
        if ones:  # norm weights near 1
            one = np.float32(1.0)
            val = np.float16(one).view(np.uint16) if dtype == "float16" else (np.array([one]).view(np.uint32) >> 16).astype(np.uint16)[0]
            return np.full(n, val, dtype=np.uint16).tobytes()
        out = np.empty(n, dtype=np.uint16)
        done = 0
        while done < n:
            off = int(self.rng.integers(0, len(self.pool) // 2))
            take = min(n - done, len(self.pool) - off)
            out[done : done + take] = self.pool[off : off + take]
            done += take
        return out.tobytes()


def write(out: Path, cfg: dict, dtype: str, shards: int, fixtures: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(fixtures / "model" / "tokenizer.model", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm2-6b"}))
    tensors = shapes(cfg)
    st = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    # contiguous shards of about equal size, in model order (as the official shards)
    total_bytes = sum(int(np.prod(s)) for _, s in tensors) * 2
    groups, cur, acc = [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        acc += int(np.prod(shape)) * 2
        if acc >= total_bytes * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    shards = len(groups)
    pool = Pool(dtype)
    weight_map = {}
    total = sum(int(np.prod(s)) for _, s in tensors) * 2
    written, t0 = 0, time.time()
    tty = sys.stderr.isatty()
    line = ""
    for si, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{si + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {}, 0
        for name, shape in group:
            nbytes = int(np.prod(shape)) * 2
            header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
        hb = json.dumps(header).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, shape in group:
                n = int(np.prod(shape))
                f.write(pool.fill(n, ones=name.endswith("layernorm.weight"), dtype=dtype))
                written += n * 2
                rate = written / max(time.time() - t0, 1e-9) / 1e6
                line = f"writing {written / 1e9:6.2f} / {total / 1e9:.2f} GB ({rate:.0f} MB/s)"
                if tty:  # a bar on a terminal, plain lines (one per shard) in a log
                    print(f"\r{line}", end="", file=sys.stderr)
        if not tty:
            print(line, file=sys.stderr)
    if tty:
        print(file=sys.stderr)
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--shards", type=int, default=7)
    ap.add_argument("--seq-length", type=int, default=32768)
    ap.add_argument(
        "--fixtures",
        type=Path,
        default=Path(os.environ.get("GLM2RS_FIXTURES", Path(__file__).resolve().parents[2] / "shared/fixtures/tiny-glm2")),
    )
    a = ap.parse_args()
    cfg = dict(CHATGLM2_6B, num_layers=a.layers, seq_length=a.seq_length, torch_dtype=a.dtype)
    write(a.out, cfg, a.dtype, a.shards, a.fixtures)


if __name__ == "__main__":
    main()
