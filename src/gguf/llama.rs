//! llama.cpp's `chatglm` architecture in GGUF: its tensor names, metadata keys and tokenizer
//! fields, both as glm2rs writes them (so llama.cpp runs glm2rs's files) and as llama.cpp's
//! converter writes them (so glm2rs runs those).
//!
//! What the converter does, followed here (llama.cpp `convert_hf_to_gguf.py`, class
//! `ChatGLMModel`): `set_gguf_parameters` writes `context_length` = seq_length,
//! `embedding_length`, `feed_forward_length` = ffn_hidden_size, `block_count`, `head_count`,
//! `head_count_kv` = multi_query_group_num, `layer_norm_rms_epsilon`, `rope.dimension_count` =
//! head_dim * 0.5, `add_bos_token` false and `rope.freq_base` = 10000 * rope_ratio;
//! `set_vocab_chatglm3` writes tokenizer model `llama`, pre `chatglm-spm`, one token per id up to
//! padded_vocab_size: the SentencePiece piece (ids 0, 1, 2 renamed `<unk>`, `<bos>`, `<eos>`),
//! its score and its SentencePiece type (user-defined pieces as normal), then the special tokens
//! as control tokens and `[PAD{id}]` (unused) for the padding ids; `SpecialVocab` adds the eos
//! and pad ids of config.json. gguf-py's tensor map names `transformer.`-less checkpoint keys:
//! `embedding.word_embeddings` token_embd, `encoder.layers.N.input_layernorm` blk.N.attn_norm,
//! `self_attention.query_key_value` attn_qkv, `self_attention.dense` attn_output,
//! `post_attention_layernorm` ffn_norm, `mlp.dense_h_to_4h` ffn_up (gate and up fused, as
//! llama.cpp's SwiGLU of a single up tensor expects), `mlp.dense_4h_to_h` ffn_down,
//! `encoder.final_layernorm` output_norm, `output_layer` output.
//!
//! The converter handles only ChatGLM3's vocabulary this way (a checkpoint named
//! THUDM/chatglm3-6b); ChatGLM2 shares the SentencePiece model minus the role tokens, so glm2rs
//! writes ChatGLM2 the same way. ChatGLM2-32k's `rope_ratio` scales positions, not the base:
//! written as linear rope scaling (`rope.scaling.type` linear, `rope.scaling.factor`).

use crate::config::Glm2Config;
use crate::error::Result;
use crate::tokenizer::{Tokenizer, CHATGLM2_SPECIAL, CHATGLM3_ROLES};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;

const ARCH: &str = "chatglm";

/// Per layer: (checkpoint key after `transformer.encoder.layers.N.`, llama.cpp name after `blk.N.`).
const LAYER_NAMES: [(&str, &str); 8] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attention.query_key_value.weight", "attn_qkv.weight"),
    ("self_attention.query_key_value.bias", "attn_qkv.bias"),
    ("self_attention.dense.weight", "attn_output.weight"),
    ("self_attention.dense.bias", "attn_output.bias"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.dense_h_to_4h.weight", "ffn_up.weight"),
    ("mlp.dense_4h_to_h.weight", "ffn_down.weight"),
];

const GLOBAL_NAMES: [(&str, &str); 3] = [
    (
        "transformer.embedding.word_embeddings.weight",
        "token_embd.weight",
    ),
    (
        "transformer.encoder.final_layernorm.weight",
        "output_norm.weight",
    ),
    ("transformer.output_layer.weight", "output.weight"),
];

/// llama.cpp's name of checkpoint tensor `name` (`None`: llama.cpp has none for it).
pub fn to_llama(name: &str) -> Option<String> {
    if let Some((_, l)) = GLOBAL_NAMES.iter().find(|(c, _)| *c == name) {
        return Some(l.to_string());
    }
    let rest = name.strip_prefix("transformer.encoder.layers.")?;
    let (n, key) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (_, l) = LAYER_NAMES.iter().find(|(c, _)| *c == key)?;
    Some(format!("blk.{n}.{l}"))
}

/// The checkpoint name of llama.cpp tensor `name`.
pub fn from_llama(name: &str) -> Option<String> {
    if let Some((c, _)) = GLOBAL_NAMES.iter().find(|(_, l)| *l == name) {
        return Some(c.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (n, key) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (c, _) = LAYER_NAMES.iter().find(|(_, l)| *l == key)?;
    Some(format!("transformer.encoder.layers.{n}.{c}"))
}

fn u32v(x: usize) -> Value {
    Value::U32(x as u32)
}

/// The first id of a config.json token id field (`eos_token_id` may be a list).
fn first_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

/// The metadata llama.cpp reads for a `chatglm` model of `cfg` with `tokenizer`.
pub fn metadata(
    cfg: &Glm2Config,
    config_json: &serde_json::Value,
    tokenizer: &Tokenizer,
) -> Result<Vec<(String, Value)>> {
    let key = |k: &str| format!("{ARCH}.{k}");
    let name = config_json
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(if tokenizer.has_roles() {
            "chatglm3"
        } else {
            "chatglm2"
        });
    let mut m = vec![
        (
            "general.architecture".to_string(),
            Value::String(ARCH.into()),
        ),
        ("general.name".to_string(), Value::String(name.into())),
        (key("context_length"), u32v(cfg.seq_length)),
        (key("embedding_length"), u32v(cfg.hidden_size)),
        (key("feed_forward_length"), u32v(cfg.ffn_hidden_size)),
        (key("block_count"), u32v(cfg.num_layers)),
        (key("attention.head_count"), u32v(cfg.num_attention_heads)),
        (key("attention.head_count_kv"), u32v(cfg.kv_groups())),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.layernorm_epsilon as f32),
        ),
        (key("rope.dimension_count"), u32v(cfg.rotary_dim())),
    ];
    if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size {
        m.push((key("attention.key_length"), u32v(cfg.kv_channels)));
        m.push((key("attention.value_length"), u32v(cfg.kv_channels)));
    }
    let ratio = cfg.rope_ratio;
    if cfg.rope_scales_base || ratio == 1.0 {
        m.push((key("rope.freq_base"), Value::F32((10000.0 * ratio) as f32)));
    } else {
        m.push((key("rope.freq_base"), Value::F32(10000.0)));
        m.push((key("rope.scaling.type"), Value::String("linear".into())));
        m.push((key("rope.scaling.factor"), Value::F32(ratio as f32)));
    }
    let (pieces, _, add_prefix) = tokenizer.spm_pieces()?;
    let n = pieces.len();
    let mut specials: Vec<&str> = CHATGLM2_SPECIAL.to_vec();
    if tokenizer.has_roles() {
        specials.extend(CHATGLM3_ROLES);
    }
    let vocab = cfg.padded_vocab_size.max(n + specials.len());
    let (mut tokens, mut scores, mut types) = (vec![], vec![], vec![]);
    for id in 0..vocab {
        let (text, score, ty) = if id < n {
            let (p, s, t) = &pieces[id];
            let text = match id {
                0 => "<unk>".to_string(),
                1 => "<bos>".to_string(),
                2 => "<eos>".to_string(),
                _ => p.clone(),
            };
            (text, *s, if matches!(t, 2 | 3 | 5 | 6) { *t } else { 1 })
        } else if let Some(s) = specials.get(id - n) {
            (s.to_string(), 0.0, 3)
        } else {
            (format!("[PAD{id}]"), 0.0, 5)
        };
        tokens.push(Value::String(text));
        scores.push(Value::F32(score));
        types.push(Value::I32(ty));
    }
    let eos = first_id(config_json.get("eos_token_id")).unwrap_or(2);
    m.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("chatglm-spm".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.scores".to_string(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(eos)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(add_prefix),
        ),
    ]);
    if let Some(pad) = first_id(config_json.get("pad_token_id")) {
        m.push((
            "tokenizer.ggml.padding_token_id".to_string(),
            Value::U32(pad),
        ));
    }
    Ok(m)
}

/// What a GGUF file written by llama.cpp's converter (no glm2rs metadata) holds for glm2rs: the
/// config.json it stands for, the SentencePiece model and whether it is ChatGLM3's.
pub fn read_foreign(
    meta: &HashMap<String, Value>,
    tensors: &dyn Fn(&str) -> Option<Vec<usize>>,
) -> std::result::Result<(serde_json::Value, Vec<u8>, bool), String> {
    let arch = meta
        .get("general.architecture")
        .and_then(|v| v.to_string().ok());
    if arch.map(String::as_str) != Some(ARCH) {
        return Err(format!(
            "general.architecture is {:?}: glm2rs reads llama.cpp's \"chatglm\" files",
            arch.map(String::as_str).unwrap_or("missing")
        ));
    }
    let int = |k: &str| -> std::result::Result<usize, String> {
        match meta.get(&format!("{ARCH}.{k}")) {
            Some(Value::U32(x)) => Ok(*x as usize),
            Some(Value::I32(x)) if *x >= 0 => Ok(*x as usize),
            Some(Value::U64(x)) => Ok(*x as usize),
            Some(other) => Err(format!("{ARCH}.{k} is {other:?}, not a count")),
            None => Err(format!("{ARCH}.{k} is missing")),
        }
    };
    let float = |k: &str| match meta.get(&format!("{ARCH}.{k}")) {
        Some(Value::F32(x)) => Some(*x as f64),
        Some(Value::F64(x)) => Some(*x),
        _ => None,
    };
    let strings = |k: &str| -> std::result::Result<Vec<String>, String> {
        match meta.get(k) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| format!("{k}: not strings"))
                })
                .collect(),
            _ => Err(format!("{k} is missing")),
        }
    };
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok());
    if model.map(String::as_str) != Some("llama") {
        return Err(format!(
            "tokenizer.ggml.model is {:?}: glm2rs reads ChatGLM2/3's SentencePiece vocabulary (\"llama\"; GLM-4's is not this family)",
            model.map(String::as_str).unwrap_or("missing")
        ));
    }
    let tokens = strings("tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = match meta.get("tokenizer.ggml.scores") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        _ => vec![0.0; tokens.len()],
    };
    let types: Vec<i32> = match meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err("tokenizer.ggml.scores / token_type do not match the token list".into());
    }
    let n = tokens
        .iter()
        .position(|t| t == CHATGLM2_SPECIAL[0])
        .filter(|&n| {
            CHATGLM2_SPECIAL
                .iter()
                .enumerate()
                .all(|(i, s)| tokens.get(n + i).map(String::as_str) == Some(*s))
        })
        .ok_or("the vocabulary has no ChatGLM special tokens ([MASK] [gMASK] [sMASK] sop eop)")?;
    let chatglm3 = CHATGLM3_ROLES.iter().enumerate().all(|(i, s)| {
        tokens
            .get(n + CHATGLM2_SPECIAL.len() + i)
            .map(String::as_str)
            == Some(*s)
    });
    // the converter renamed the SentencePiece pieces 1 and 2 (<s>, </s>): back to the model's
    let pieces: Vec<(String, f32, i32)> = (0..n)
        .map(|i| {
            let text = match (i, tokens[i].as_str()) {
                (1, "<bos>") => "<s>".to_string(),
                (2, "<eos>") => "</s>".to_string(),
                (_, t) => t.to_string(),
            };
            (text, scores[i], types[i])
        })
        .collect();
    let byte_fallback = types.iter().any(|&t| t == 6);
    let add_prefix = !matches!(
        meta.get("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(false))
    );
    let spm = Tokenizer::spm_from_pieces(&pieces, byte_fallback, add_prefix);

    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let groups = int("attention.head_count_kv").unwrap_or(heads);
    let kv_channels = int("attention.key_length").unwrap_or(hidden / heads.max(1));
    let layers = int("block_count")?;
    let vocab = tensors("token_embd.weight")
        .and_then(|s| s.first().copied())
        .unwrap_or(tokens.len());
    let rope_ratio = match meta
        .get(&format!("{ARCH}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
    {
        Some(t) if t == "linear" => float("rope.scaling.factor").unwrap_or(1.0),
        Some(t) if t != "none" => return Err(format!("rope scaling {t:?} is not ChatGLM's")),
        _ => float("rope.freq_base").unwrap_or(10000.0) / 10000.0,
    };
    let eos = match meta.get("tokenizer.ggml.eos_token_id") {
        Some(v) => v
            .to_u32()
            .map_err(|e| format!("tokenizer.ggml.eos_token_id: {e}"))?,
        None => 2,
    };
    let pad = meta
        .get("tokenizer.ggml.padding_token_id")
        .and_then(|v| v.to_u32().ok())
        .unwrap_or(0);
    let name = meta
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let config = serde_json::json!({
        "_name_or_path": name,
        "model_type": "chatglm",
        "num_layers": layers,
        "padded_vocab_size": vocab,
        "hidden_size": hidden,
        "ffn_hidden_size": int("feed_forward_length")?,
        "kv_channels": kv_channels,
        "num_attention_heads": heads,
        "multi_query_attention": groups != heads,
        "multi_query_group_num": groups,
        "seq_length": int("context_length")?,
        "layernorm_epsilon": float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rmsnorm": true,
        "post_layer_norm": tensors("output_norm.weight").is_some(),
        "add_qkv_bias": tensors("blk.0.attn_qkv.bias").is_some(),
        "add_bias_linear": tensors("blk.0.attn_output.bias").is_some(),
        "apply_residual_connection_post_layernorm": false,
        "original_rope": true,
        "rope_ratio": rope_ratio,
        "eos_token_id": eos,
        "pad_token_id": pad,
    });
    Ok((config, spm, chatglm3))
}

#[cfg(test)]
mod tests {
    use super::{from_llama, to_llama};

    #[test]
    fn names_map_both_ways() {
        for (c, l) in [
            (
                "transformer.embedding.word_embeddings.weight",
                "token_embd.weight",
            ),
            (
                "transformer.encoder.layers.27.self_attention.query_key_value.bias",
                "blk.27.attn_qkv.bias",
            ),
            (
                "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
                "blk.0.ffn_up.weight",
            ),
            (
                "transformer.encoder.final_layernorm.weight",
                "output_norm.weight",
            ),
            ("transformer.output_layer.weight", "output.weight"),
        ] {
            assert_eq!(to_llama(c).as_deref(), Some(l));
            assert_eq!(from_llama(l).as_deref(), Some(c));
        }
        assert_eq!(
            to_llama("transformer.prefix_encoder.embedding.weight"),
            None
        );
        assert_eq!(from_llama("blk.x.attn_qkv.weight"), None);
        assert_eq!(from_llama("blk.0.ffn_gate.weight"), None);
    }
}
