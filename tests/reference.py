"""An independent float64 NumPy implementation of the official ChatGLM2 forward pass
(`modeling_chatglm.py`), and a writer of random checkpoints of any shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def random_config(**over) -> dict:
    cfg = {
        "model_type": "chatglm",
        "num_layers": 2,
        "hidden_size": 48,
        "num_attention_heads": 6,
        "kv_channels": 12,  # projection 72 != hidden 48
        "multi_query_attention": True,
        "multi_query_group_num": 3,
        "ffn_hidden_size": 80,
        "padded_vocab_size": 65024,
        "seq_length": 256,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "layernorm_epsilon": 1e-5,
        "rmsnorm": True,
        "original_rope": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "torch_dtype": "float16",
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg.update(over)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp16 weights with the checkpoint's names and shapes."""
    rng = np.random.default_rng(seed)
    h, v, f = cfg["hidden_size"], cfg["padded_vocab_size"], cfg["ffn_hidden_size"]
    nh, hd = cfg["num_attention_heads"], cfg["kv_channels"]
    g = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else nh
    qkv = nh * hd + 2 * g * hd

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    t = {"transformer.embedding.word_embeddings.weight": w(v, h, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = (1 + w(h, scale=0.1)).astype(np.float16)
        t[f"{p}.self_attention.query_key_value.weight"] = w(qkv, h)
        if cfg.get("add_qkv_bias") or cfg.get("add_bias_linear"):
            t[f"{p}.self_attention.query_key_value.bias"] = w(qkv)
        t[f"{p}.self_attention.dense.weight"] = w(h, nh * hd)
        t[f"{p}.post_attention_layernorm.weight"] = (1 + w(h, scale=0.1)).astype(np.float16)
        t[f"{p}.mlp.dense_h_to_4h.weight"] = w(2 * f, h)
        t[f"{p}.mlp.dense_4h_to_h.weight"] = w(h, f)
    t["transformer.encoder.final_layernorm.weight"] = (1 + w(h, scale=0.1)).astype(np.float16)
    t["transformer.output_layer.weight"] = w(v, h)
    return t


def write_checkpoint(dir: Path, cfg: dict, weights: dict, tokenizer_model: Path, shards: int = 1) -> Path:
    """A model directory: config.json, tokenizer.model (copied from the fixtures into a temp
    directory, never into the repository) and safetensors weights, sharded with an index if
    `shards > 1`."""
    from safetensors.numpy import save_file

    dir.mkdir(parents=True, exist_ok=True)
    (dir / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(tokenizer_model, dir / "tokenizer.model")
    names = list(weights)
    if shards == 1:
        save_file(weights, str(dir / "model.safetensors"))
        return dir
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(dir / fname))
        weight_map.update({n: fname for n in part})
    (dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dir


def load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch zip checkpoint (`torch.save`) as NumPy arrays, without torch and without running
    pickled code: only the storage classes and `_rebuild_tensor_v2` are resolved, everything else
    is refused. Lets the float64 reference read the fixture's official `.bin` files."""
    import pickle
    import zipfile

    dtypes = {"HalfStorage": np.float16, "FloatStorage": np.float32, "BFloat16Storage": None,
              "CharStorage": np.int8, "ByteStorage": np.uint8, "LongStorage": np.int64,
              "IntStorage": np.int32, "DoubleStorage": np.float64}
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]

        def rebuild(storage, offset, size, stride, *_):
            dtype, key = storage
            raw = np.frombuffer(z.read(f"{root}/data/{key}"), dtype=dtype)
            item = raw.itemsize
            return np.lib.stride_tricks.as_strided(raw[offset:], shape=tuple(size),
                                                   strides=tuple(s * item for s in stride)).copy()

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return rebuild
                if module == "collections" and name == "OrderedDict":
                    import collections

                    return collections.OrderedDict
                if module == "torch" and name in dtypes and dtypes[name] is not None:
                    return name
                raise pickle.UnpicklingError(f"refused global {module}.{name}")

            def persistent_load(self, pid):
                _, cls, key, _location, _numel = pid
                return dtypes[cls], key

        return dict(Unpickler(z.open(f"{root}/data.pkl")).load())


def dequantize_official(weights: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """The fp16 weights the official int8/int4 layers compute with (chatglm2-6b `quantization.py`:
    `extract_weight_to_half` gives `weight_scale[row] * q`, in fp16). int4: two signed 4-bit
    values per int8 byte, column 2j in the high nibble and 2j + 1 in the low one."""
    out = {}
    for name, w in weights.items():
        if name.endswith(".weight_scale"):
            continue
        scale = weights.get(name + "_scale")
        if scale is None:
            out[name] = w
            continue
        q = w.astype(np.int8)
        if bits == 4:
            hi = q >> 4  # arithmetic shift keeps the sign
            lo = (q << 4).astype(np.int8) >> 4
            q = np.stack([hi, lo], axis=-1).reshape(q.shape[0], -1)
        out[name] = (q.astype(np.float16) * scale.astype(np.float16)[:, None]).astype(np.float16)
    return out


def prefix_kv(cfg: dict, prefix_weights: dict, projection: bool) -> np.ndarray:
    """The official PrefixEncoder + get_prompt: [num_layers * 2, pre_seq_len, groups, kv_channels].

    Follows chatglm2-6b `modeling_chatglm.py` (THUDM/chatglm2-6b; copy read at
    bq-xiao/chatglm2-6b-model@1fd8e8d): `PrefixEncoder.__init__` makes
    `embedding = Embedding(pre_seq_len, kv_size)` with
    `kv_size = num_layers * kv_channels * multi_query_group_num * 2` in both branches, and with
    `prefix_projection` `trans = Sequential(Linear(kv_size, hidden_size), Tanh(),
    Linear(hidden_size, kv_size))`; `forward` applies `trans` to the embedding. `get_prompt` views
    the result as `[b, pre_seq_len, num_layers * 2, multi_query_group_num, kv_channels]`, permutes
    `[2, 1, 0, 3, 4]` and splits by 2: layer i's keys are index 2i, its values 2i + 1.
    Checked against the fixture's golden logits (tests/test_ptuning.py), not only against glm2rs."""
    W = {k: v.astype(np.float64) for k, v in prefix_weights.items()}
    emb = W["transformer.prefix_encoder.embedding.weight"]
    if projection:
        h = np.tanh(emb @ W["transformer.prefix_encoder.trans.0.weight"].T + W["transformer.prefix_encoder.trans.0.bias"])
        emb = h @ W["transformer.prefix_encoder.trans.2.weight"].T + W["transformer.prefix_encoder.trans.2.bias"]
    g = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else cfg["num_attention_heads"]
    pre = emb.shape[0]
    kv = emb.reshape(pre, cfg["num_layers"] * 2, g, cfg["kv_channels"])
    return kv.transpose(1, 0, 2, 3)


def random_prefix(cfg: dict, pre: int, projection: bool, seed: int = 5) -> dict[str, np.ndarray]:
    """Random prefix-encoder weights in the official ChatGLM2 layout (see `prefix_kv`)."""
    rng = np.random.default_rng(seed)
    g = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else cfg["num_attention_heads"]
    kv_size = cfg["num_layers"] * cfg["kv_channels"] * g * 2
    h = cfg["hidden_size"]
    f = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    if not projection:
        return {"transformer.prefix_encoder.embedding.weight": f(pre, kv_size)}
    return {
        "transformer.prefix_encoder.embedding.weight": f(pre, kv_size),
        "transformer.prefix_encoder.trans.0.weight": f(h, kv_size),
        "transformer.prefix_encoder.trans.0.bias": f(h),
        "transformer.prefix_encoder.trans.2.weight": f(kv_size, h),
        "transformer.prefix_encoder.trans.2.bias": f(kv_size),
    }


def forward(cfg: dict, weights: dict, ids: list[int], prefix: np.ndarray | None = None) -> np.ndarray:
    """Logits [len(ids), vocab] in float64, following modeling_chatglm.py step by step.
    `prefix`: P-Tuning keys/values from `prefix_kv`, placed before the prompt without rotary."""
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    h, nh, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    g = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else nh
    eps = cfg["layernorm_epsilon"]
    n = len(ids)

    def rmsnorm(x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    # RotaryEmbedding(kv_channels // 2): cache [n, rot/2, 2]
    rot_dim = hd // 2
    # rope_ratio: ChatGLM2's modeling_chatglm.py (chatglm2-6b-32k) divides the positions,
    #   seq_idx = torch.arange(seq_len, dtype=torch.float, device=device) / self.rope_ratio
    # ChatGLM3's (chatglm3-6b-32k, -128k) multiplies the base in RotaryEmbedding.forward_impl,
    #   base = base * self.rope_ratio ... seq_idx = torch.arange(seq_len, ...)
    # ("_chatglm3": the model runs ChatGLM3's code, i.e. has a ChatGLM3 tokenizer)
    ratio = cfg.get("rope_ratio", 1.0)
    base, pos_scale = (10000 * ratio, 1.0) if cfg.get("_chatglm3") else (10000, ratio)
    theta = 1.0 / (base ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))
    pos = np.arange(n, dtype=np.float64) / pos_scale
    ang = np.outer(pos, theta)  # [n, rot/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x [n, heads, hd]
        xr, xp = x[..., :rot_dim], x[..., rot_dim:]
        xs = xr.reshape(n, x.shape[1], rot_dim // 2, 2)
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.stack([xs[..., 0] * c - xs[..., 1] * s, xs[..., 1] * c + xs[..., 0] * s], -1)
        return np.concatenate([out.reshape(n, x.shape[1], rot_dim), xp], -1)

    x = W["transformer.embedding.word_embeddings.weight"][ids]
    pre = 0 if prefix is None else prefix.shape[1]
    causal = np.concatenate([np.zeros((n, pre), dtype=bool), np.triu(np.ones((n, n), dtype=bool), 1)], axis=1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        ln = rmsnorm(x, W[f"{p}.input_layernorm.weight"])
        qkv = ln @ W[f"{p}.self_attention.query_key_value.weight"].T
        if f"{p}.self_attention.query_key_value.bias" in W:
            qkv = qkv + W[f"{p}.self_attention.query_key_value.bias"]
        q = qkv[:, : nh * hd].reshape(n, nh, hd)
        k = qkv[:, nh * hd : nh * hd + g * hd].reshape(n, g, hd)
        v = qkv[:, nh * hd + g * hd :].reshape(n, g, hd)
        q, k = rope(q), rope(k)
        if prefix is not None:
            k = np.concatenate([prefix[2 * i], k], axis=0)
            v = np.concatenate([prefix[2 * i + 1], v], axis=0)
        # expand each KV group to its nh/g query heads (official unsqueeze/expand)
        k = np.repeat(k, nh // g, axis=1)
        v = np.repeat(v, nh // g, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores = np.where(causal[None], -np.inf, scores)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("hqk,khd->qhd", probs, v).reshape(n, nh * hd)
        attn = ctx @ W[f"{p}.self_attention.dense.weight"].T
        residual = ln if cfg.get("apply_residual_connection_post_layernorm") else x
        li = residual + attn
        ln2 = rmsnorm(li, W[f"{p}.post_attention_layernorm.weight"])
        h4 = ln2 @ W[f"{p}.mlp.dense_h_to_4h.weight"].T
        a, b = np.split(h4, 2, axis=-1)
        mlp = (a / (1 + np.exp(-a)) * b) @ W[f"{p}.mlp.dense_4h_to_h.weight"].T
        residual = ln2 if cfg.get("apply_residual_connection_post_layernorm") else li
        x = residual + mlp
    if cfg.get("post_layer_norm", True):
        x = rmsnorm(x, W["transformer.encoder.final_layernorm.weight"])
    return x @ W["transformer.output_layer.weight"].T
