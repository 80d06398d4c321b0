"""A GGUF file as llama.cpp's converter writes one for a ChatGLM3 checkpoint, made with llama.cpp's
own GGUF library (`gguf`, llama.cpp's gguf-py) where the converter itself needs torch and the
official tokenizer code (neither can be installed here).

Each step follows the converter (llama.cpp `convert_hf_to_gguf.py` / `conversion/chatglm.py`,
class `ChatGLMModel`, as vendored in llama-cpp-python 0.3.36):
- `set_gguf_parameters`: context_length = seq_length, embedding_length = hidden_size,
  feed_forward_length = ffn_hidden_size, block_count, head_count, head_count_kv =
  multi_query_group_num, layer_norm_rms_epsilon = layernorm_epsilon, rope_dimension_count =
  int(hidden_size // num_attention_heads * 0.5), add_bos_token False, rope_freq_base = 10000
  (times rope_ratio when present);
- `set_vocab_chatglm3`: for every id below padded_vocab_size the piece of the official
  `SPTokenizer.convert_id_to_token` (THUDM chatglm3-6b tokenization_chatglm.py: special tokens
  numbered after the SentencePiece pieces, "" for the eos/bos/pad ids and ids past the pieces),
  ids 0/1/2 renamed <unk>/<bos>/<eos>; the SentencePiece score for ids below the piece count
  when the piece is not empty; type: past the pieces CONTROL for the special tokens, UNUSED
  "[PAD{id}]" for empty ones, else USER_DEFINED; within them UNKNOWN/CONTROL/UNUSED/BYTE as
  SentencePiece says, else NORMAL; tokenizer model "llama", pre "chatglm-spm";
  `gguf.SpecialVocab(dir, n_vocab=len(tokens))` adds config.json's eos/pad ids;
- tensors: `filter_tensors` drops `.rotary_pos_emb.inv_freq` and the `transformer.` prefix;
  names through gguf-py's own tensor map for MODEL_ARCH.CHATGLM; `--outtype f32` writes all in
  float32.

`tests/data/llamacpp_converter.json` holds the digest of the file the real converter wrote for
the fixture (benches/llamacpp_convert_digest.py); the test compares this file's digest with it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def convert(model_dir: Path, out: Path, name_or_path: str = "THUDM/chatglm3-6b") -> None:
    import gguf
    from safetensors.numpy import load_file
    from sentencepiece import SentencePieceProcessor

    hp = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "chatglm")
    n_embed, n_head = hp["hidden_size"], hp["num_attention_heads"]
    w.add_context_length(hp.get("seq_length", n_embed))
    w.add_embedding_length(n_embed)
    w.add_feed_forward_length(hp.get("ffn_hidden_size", 4 * n_embed))
    w.add_block_count(hp["num_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp.get("multi_query_group_num", n_head))
    w.add_layer_norm_rms_eps(hp.get("layernorm_epsilon", 1e-5))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_rope_dimension_count(int(n_embed // n_head * 0.5))
    w.add_add_bos_token(False)
    w.add_rope_freq_base(10000 * hp.get("rope_ratio", 1))

    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    n_words = sp.vocab_size()
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>"]
    index_special = {n_words + i: t for i, t in enumerate(specials)}

    def convert_id_to_token(index: int) -> str:
        if index in index_special:
            return index_special[index]
        if index in [sp.eos_id(), sp.bos_id(), sp.unk_id()] or index < 0 or index > sp.vocab_size():
            return ""
        return sp.IdToPiece(index)

    T = gguf.TokenType
    tokens, scores, toktypes = [], [], []
    for token_id in range(hp["padded_vocab_size"]):
        piece = convert_id_to_token(token_id)
        piece = {0: "<unk>", 1: "<bos>", 2: "<eos>"}.get(token_id, piece)
        text = piece.encode("utf-8")
        score = sp.GetScore(token_id) if piece and token_id < sp.vocab_size() else 0.0
        if token_id >= sp.vocab_size():
            if piece in specials:
                toktype = T.CONTROL
            elif not piece:
                text, toktype = f"[PAD{token_id}]".encode("utf-8"), T.UNUSED
            else:
                toktype = T.USER_DEFINED
        elif sp.IsUnknown(token_id):
            toktype = T.UNKNOWN
        elif sp.IsControl(token_id):
            toktype = T.CONTROL
        elif sp.IsUnused(token_id):
            toktype = T.UNUSED
        elif sp.IsByte(token_id):
            toktype = T.BYTE
        else:
            toktype = T.NORMAL
        tokens.append(text)
        scores.append(score)
        toktypes.append(toktype)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("chatglm-spm")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w)

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, hp["num_layers"])
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        if name.endswith(".rotary_pos_emb.inv_freq"):
            continue
        new = tmap.get_name(name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def digest(path: Path) -> dict:
    """What the file says, without the general.* keys the converter derives from paths and dates:
    every other key's value (long arrays hashed) and every tensor's type, shape and data hash."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {}
    for f in r.fields.values():
        if f.name.startswith("general.") or f.name.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list) and len(v) > 16:
            v = hashlib.sha256(json.dumps(v, default=str).encode()).hexdigest()
        kv[f.name] = v
    tensors = {t.name: [t.tensor_type.name, [int(x) for x in t.shape],
                        hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()] for t in r.tensors}
    return {"kv": kv, "tensors": tensors}
