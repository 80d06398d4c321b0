"""A ChatGLM checkpoint whose weights are written, not trained: given a table of (previous token,
current token) -> next token, its greedy answer follows the table, so a test can make a real model
run (every layer of the engine, the server, the client) produce a chosen text, such as a ChatGLM3
tool call. One layer of the real architecture:

- attention, group 0 ("previous token"): keys the same for every position (the qkv bias), the
  query of head 0 a fixed rotation, so that with rotary embeddings (8 frequencies on the first 16 of
  32 channels) the score peaks at the position just before; its value carries the token's identity;
- attention, group 1 ("fence count"): keys only for the code-fence token and `<|assistant|>` on a
  channel rotary embeddings leave alone; its value 1 for a fence, 0 for `<|assistant|>`, so the
  average tells after one fence (1/2) from after two (2/3);
- the MLP: one SwiGLU unit per table entry, its gate open when both the current and the previous
  token match, its value the fence condition where one is needed, writing its next token's slot;
- the output layer reads the slots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

H = 128  # hidden: 0-30 current token, 31 constant, 32-62 previous token, 64-126 next-token slots, 127 fences
ONE, FENCE = 31, 127
KV = 32
HEADS, GROUPS = 4, 2


def write(out: Path, fixtures: Path, chains: list[tuple[int, list[int], int]], fence: int, assistant: int) -> Path:
    """A model directory (the fixture's config and tokenizer, these weights) at `out` whose greedy
    answer after token `start` continues with `ids` and then `stop`, for each (start, ids, stop)
    of `chains` (`start`: the prompt's last token before the answer, e.g. `<|assistant|>` after a
    given user turn: chains are told apart by the two tokens before each position, and where those
    repeat with another continuation, by the count of `fence` tokens since `assistant`)."""
    from safetensors.numpy import save_file

    rows: dict[tuple[int, int, int | None], int] = {}
    seen: dict[tuple[int, int], set[int]] = {}
    raw = []
    for prev0, ids, stop in chains:
        seq, fences = [prev0] + ids + [stop], 0
        # the answer's first token follows the prompt's last two: (token before start, start)
        for k in range(1, len(seq) - 1):
            fences += seq[k] == fence
            raw.append((seq[k - 1], seq[k], seq[k + 1], fences))
            seen.setdefault((seq[k - 1], seq[k]), set()).add(seq[k + 1])
    for prev, cur, nxt, fences in raw:
        tag = fences if len(seen[(prev, cur)]) > 1 else None
        assert tag in (None, 1, 2), f"({prev}, {cur}) is ambiguous beyond the fence count"
        rows[(prev, cur, tag)] = nxt
    table = [(p, c, n, t) for (p, c, t), n in rows.items()]

    out.mkdir(parents=True, exist_ok=True)
    src = fixtures / "model-safetensors"
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    cfg = json.loads((src / "config.json").read_text())
    units = len(table)
    cfg.update({"hidden_size": H, "kv_channels": KV, "num_attention_heads": HEADS, "multi_query_group_num": GROUPS,
                "num_layers": 1, "ffn_hidden_size": units, "torch_dtype": "float32", "_name_or_path": "scripted"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    tokens = sorted({t for row in table for t in row[:3]} | {fence, assistant})
    assert len(tokens) <= 31, f"{len(tokens)} tokens: at most 31 fit the identity channels"
    ident = {t: i for i, t in enumerate(tokens)}
    nexts = sorted({row[2] for row in table})
    assert len(nexts) <= 63
    slot = {t: 64 + i for i, t in enumerate(nexts)}
    V = cfg["padded_vocab_size"]

    emb = np.zeros((V, H), np.float32)
    for t, i in ident.items():
        emb[t, i] = 1.0
        emb[t, ONE] = 1.0  # a constant channel: the MLP's bias
    # attention: q [HEADS*KV], k [GROUPS*KV], v [GROUPS*KV]
    nq, nk = HEADS * KV, GROUPS * KV
    qkv_w = np.zeros((nq + 2 * nk, H), np.float32)
    qkv_b = np.zeros(nq + 2 * nk, np.float32)
    theta = 10000.0 ** (-np.arange(0, KV // 2, 2) / (KV // 2))  # the rotary frequencies (8)
    A = 400.0
    for j, th in enumerate(theta):
        # head 0: q = A e^{-i theta} against keys 1 + 0i: the score peaks at the position before
        qkv_b[2 * j] = A * np.cos(th)
        qkv_b[2 * j + 1] = -A * np.sin(th)
        qkv_b[nq + 2 * j] = 1.0
    # the normalised input of a relevant token: its one-hot and the constant channel at sqrt(H / 2)
    x1 = np.sqrt(H / 2)
    for t, i in ident.items():
        qkv_w[nq + nk + i, i] = 1.0  # group 0 value: the identity
    # group 1 (heads 2, 3): channel 16, which rotary embeddings leave alone, keyed by the markers
    qkv_b[2 * KV + 16] = 60.0
    for t in (fence, assistant):
        qkv_w[nq + KV + 16, ident[t]] = 1.0 / x1
    qkv_w[nq + nk + KV, ident[fence]] = 1.0 / x1  # value 1 for a fence, 0 for <|assistant|>
    # dense: head 0's value -> channels 32..62 (the previous token, at about one-hot size), head 2's
    # -> channel FENCE
    dense = np.zeros((H, HEADS * KV), np.float32)
    for i in range(31):
        dense[32 + i, i] = 1.0 / x1
    dense[FENCE, 2 * KV] = 1.0
    # MLP, one SwiGLU unit silu(g) * u per row: g = a (cur match + prev match - 1.5) is positive
    # only when both match; u is 1, or for a row told apart by the fence count, the fence feature
    # f = fences / (fences + 1) against the midpoint of 1/2 (one fence) and 2/3 (two): positive for
    # the right count, negative (a negative vote) for the other
    a, K = 8.0, 60.0
    xs = np.sqrt(H / 3)  # a one-hot after post_attention_layernorm (cur, constant, prev at 1 each)
    h_to_4h = np.zeros((2 * units, H), np.float32)
    to_h = np.zeros((H, units), np.float32)
    for u, (prev, cur, nxt, tag) in enumerate(table):
        g = np.zeros(H, np.float32)
        g[ident[cur]] = a / xs
        g[32 + ident[prev]] = a / xs
        g[ONE] = -1.5 * a / xs
        up = np.zeros(H, np.float32)
        if tag is None:
            up[ONE] = 1.0 / xs
        else:
            sign = -1.0 if tag == 1 else 1.0
            up[FENCE] = sign * K / xs
            up[ONE] = -sign * K * (7 / 12) / xs
        h_to_4h[u] = g
        h_to_4h[units + u] = up
        to_h[slot[nxt], u] = 1.0
    out_w = np.zeros((V, H), np.float32)
    for t, s in slot.items():
        out_w[t, s] = 10.0
    ones = np.ones(H, np.float32)
    tensors = {
        "transformer.embedding.word_embeddings.weight": emb,
        "transformer.encoder.final_layernorm.weight": ones,
        "transformer.encoder.layers.0.input_layernorm.weight": ones,
        "transformer.encoder.layers.0.post_attention_layernorm.weight": ones,
        "transformer.encoder.layers.0.self_attention.query_key_value.weight": qkv_w,
        "transformer.encoder.layers.0.self_attention.query_key_value.bias": qkv_b,
        "transformer.encoder.layers.0.self_attention.dense.weight": dense,
        "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight": h_to_4h,
        "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight": to_h,
        "transformer.output_layer.weight": out_w,
    }
    save_file(tensors, str(out / "model.safetensors"))
    return out
