//! `config.json` of a ChatGLM2/ChatGLM3 checkpoint, parsed and validated.
//!
//! Every key of the official `ChatGLMConfig` is read, with its official default.
//! A value the engine does not implement is an error naming the key.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `eos_token_id` is an integer in ChatGLM2 checkpoints and may be a list elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn d_num_layers() -> usize {
    28
}
fn d_vocab() -> usize {
    65024
}
fn d_hidden() -> usize {
    4096
}
fn d_ffn() -> usize {
    13696
}
fn d_kv_channels() -> usize {
    128
}
fn d_heads() -> usize {
    32
}
fn d_seq_length() -> usize {
    2048
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_one() -> usize {
    1
}
fn d_rope_ratio() -> f64 {
    1.0
}
fn d_eos() -> TokenIds {
    TokenIds::One(2)
}

/// The longest context a config may declare (8x chatglm3-6b-128k's): the rotary tables are
/// sized by it.
pub const MAX_SEQ_LENGTH: usize = 1 << 20;

/// The model configuration. Field names are the `config.json` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Glm2Config {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_vocab")]
    pub padded_vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_ffn")]
    pub ffn_hidden_size: usize,
    #[serde(default = "d_kv_channels")]
    pub kv_channels: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_seq_length")]
    pub seq_length: usize,
    #[serde(default)]
    pub hidden_dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "d_eps")]
    pub layernorm_epsilon: f64,
    #[serde(default = "d_true")]
    pub rmsnorm: bool,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default = "d_true")]
    pub post_layer_norm: bool,
    #[serde(default)]
    pub add_bias_linear: bool,
    #[serde(default)]
    pub add_qkv_bias: bool,
    #[serde(default = "d_true")]
    pub bias_dropout_fusion: bool,
    #[serde(default)]
    pub multi_query_attention: bool,
    #[serde(default = "d_one")]
    pub multi_query_group_num: usize,
    #[serde(default = "d_true")]
    pub apply_query_key_layer_scaling: bool,
    #[serde(default = "d_true")]
    pub attention_softmax_in_fp32: bool,
    #[serde(default)]
    pub fp32_residual_connection: bool,
    #[serde(default)]
    pub quantization_bit: usize,
    #[serde(default)]
    pub pre_seq_len: Option<usize>,
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default = "d_true")]
    pub original_rope: bool,
    /// Long-context variants: chatglm2-6b-32k divides the rotary positions by this ratio,
    /// chatglm3-6b-32k / -128k multiply the rotary base (10000) by it: see `rope_scales_base`.
    #[serde(default = "d_rope_ratio")]
    pub rope_ratio: f64,
    /// How `rope_ratio` applies, which the two families' `modeling_chatglm.py` do differently
    /// under the same key: ChatGLM3's `RotaryEmbedding.forward_impl` sets
    /// `base = base * self.rope_ratio` (positions as they are), ChatGLM2's divides
    /// `seq_idx = torch.arange(seq_len) / self.rope_ratio`. Not in `config.json`: set from the
    /// tokenizer (a ChatGLM3 tokenizer, role tokens, means ChatGLM3's code) when a model loads.
    #[serde(skip)]
    pub rope_scales_base: bool,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default = "d_eos")]
    pub eos_token_id: TokenIds,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, rename = "_name_or_path")]
    pub name_or_path: Option<String>,
}

impl Glm2Config {
    /// Parse and validate a `config.json` text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Glm2Config =
            serde_json::from_str(text).map_err(|e| Error::config(format!("config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and validate `<dir>/config.json` (or a direct path to a JSON file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(m) => Error::config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Number of key/value heads (groups) of the attention.
    pub fn kv_groups(&self) -> usize {
        if self.multi_query_attention {
            self.multi_query_group_num
        } else {
            self.num_attention_heads
        }
    }

    /// `num_attention_heads * kv_channels`: the query projection width (may differ from hidden_size).
    pub fn projection_size(&self) -> usize {
        self.num_attention_heads * self.kv_channels
    }

    /// Width of the fused query/key/value projection.
    pub fn qkv_size(&self) -> usize {
        self.projection_size() + 2 * self.kv_groups() * self.kv_channels
    }

    /// Channels of each head that get the rotary embedding (the first half).
    pub fn rotary_dim(&self) -> usize {
        self.kv_channels / 2
    }

    /// Approximate parameter count (without a P-Tuning prefix).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = 2 * h
            + h * self.qkv_size()
            + if self.add_qkv_bias {
                self.qkv_size()
            } else {
                0
            }
            + self.projection_size() * h
            + h * 2 * self.ffn_hidden_size
            + self.ffn_hidden_size * h;
        2 * self.padded_vocab_size * h + self.num_layers * per_layer + h
    }

    fn validate(&self) -> Result<()> {
        fn unsupported(key: &str, value: impl std::fmt::Display, why: &str) -> Error {
            Error::config(format!("{key} = {value} is not supported: {why}"))
        }
        if let Some(t) = &self.model_type {
            if t != "chatglm" {
                return Err(unsupported(
                    "model_type",
                    t,
                    "glm2rs runs ChatGLM2/ChatGLM3 (\"chatglm\") checkpoints",
                ));
            }
        }
        for (key, v) in [
            ("num_layers", self.num_layers),
            ("padded_vocab_size", self.padded_vocab_size),
            ("hidden_size", self.hidden_size),
            ("ffn_hidden_size", self.ffn_hidden_size),
            ("kv_channels", self.kv_channels),
            ("num_attention_heads", self.num_attention_heads),
            ("seq_length", self.seq_length),
        ] {
            if v == 0 {
                return Err(unsupported(key, v, "must be positive"));
            }
        }
        // Sane upper bounds, far above every model of the family (6B: 28 layers, hidden 4096,
        // FFN 13696, 32 heads of 128, vocabulary 65024, context up to 131072): a value beyond
        // them is a broken or hostile file, refused before anything is sized by it.
        for (key, v, max) in [
            ("num_layers", self.num_layers, 1 << 10),
            ("padded_vocab_size", self.padded_vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("ffn_hidden_size", self.ffn_hidden_size, 1 << 18),
            ("kv_channels", self.kv_channels, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("seq_length", self.seq_length, MAX_SEQ_LENGTH),
            ("pre_seq_len", self.pre_seq_len.unwrap_or(0), 1 << 16),
        ] {
            if v > max {
                return Err(unsupported(key, v, &format!("must be at most {max}")));
            }
        }
        if !self.rmsnorm {
            return Err(unsupported(
                "rmsnorm",
                false,
                "only RMSNorm checkpoints (ChatGLM2/3) are implemented",
            ));
        }
        if !self.original_rope {
            return Err(unsupported(
                "original_rope",
                false,
                "only the original (interleaved) rotary embedding is implemented",
            ));
        }
        if self.fp32_residual_connection {
            return Err(unsupported(
                "fp32_residual_connection",
                true,
                "the residual stream is kept in the model dtype",
            ));
        }
        if self.multi_query_attention {
            let g = self.multi_query_group_num;
            if g == 0 || self.num_attention_heads % g != 0 {
                return Err(unsupported(
                    "multi_query_group_num",
                    g,
                    &format!(
                        "must divide num_attention_heads ({})",
                        self.num_attention_heads
                    ),
                ));
            }
        }
        if self.kv_channels % 4 != 0 {
            return Err(unsupported(
                "kv_channels",
                self.kv_channels,
                "the rotary half of each head must hold whole (cos, sin) pairs: kv_channels must be a multiple of 4",
            ));
        }
        if !(self.rope_ratio.is_finite() && self.rope_ratio > 0.0) {
            return Err(unsupported(
                "rope_ratio",
                self.rope_ratio,
                "must be a positive number",
            ));
        }
        if !(self.layernorm_epsilon.is_finite() && self.layernorm_epsilon >= 0.0) {
            return Err(unsupported(
                "layernorm_epsilon",
                self.layernorm_epsilon,
                "must be a non-negative number",
            ));
        }
        if self.tie_word_embeddings {
            return Err(unsupported(
                "tie_word_embeddings",
                true,
                "ChatGLM has a separate output layer",
            ));
        }
        match self.quantization_bit {
            0 | 4 | 8 => {}
            b => return Err(unsupported("quantization_bit", b, "only 0, 4 and 8 exist")),
        }
        if let Some(0) = self.pre_seq_len {
            return Err(unsupported("pre_seq_len", 0, "must be positive or null"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type":"chatglm","num_layers":2,"hidden_size":32,"kv_channels":8,
        "num_attention_heads":4,"multi_query_attention":true,"multi_query_group_num":2,
        "ffn_hidden_size":96,"padded_vocab_size":65024,"seq_length":4096,"add_qkv_bias":true,
        "auto_map":{"AutoModel":"x"}}"#;

    #[test]
    fn parses_and_derives_sizes() {
        let c = Glm2Config::from_json_str(TINY).unwrap();
        assert_eq!(c.kv_groups(), 2);
        assert_eq!(c.projection_size(), 32);
        assert_eq!(c.qkv_size(), 32 + 2 * 2 * 8);
        assert_eq!(c.rotary_dim(), 4);
        assert_eq!(c.eos_token_id.to_vec(), vec![2]);
        assert_eq!(c.rope_ratio, 1.0);
    }

    #[test]
    fn defaults_are_the_official_6b() {
        let c = Glm2Config::from_json_str("{}").unwrap();
        assert_eq!(
            (c.num_layers, c.hidden_size, c.ffn_hidden_size),
            (28, 4096, 13696)
        );
        assert_eq!(c.kv_groups(), 32, "no multi-query attention by default");
    }

    #[test]
    fn unsupported_values_name_the_key() {
        for (key, value) in [
            ("rmsnorm", serde_json::json!(false)),
            ("original_rope", serde_json::json!(false)),
            ("multi_query_group_num", serde_json::json!(3)),
            ("quantization_bit", serde_json::json!(3)),
            ("model_type", serde_json::json!("llama")),
            ("kv_channels", serde_json::json!(6)),
            ("rope_ratio", serde_json::json!(-1.0)),
            ("seq_length", serde_json::json!(1_000_000_000_000u64)),
            ("seq_length", serde_json::json!(100_000_000u64)),
            ("num_layers", serde_json::json!(1u64 << 40)),
            ("fp32_residual_connection", serde_json::json!(true)),
        ] {
            let mut map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(TINY).unwrap();
            map.insert(key.to_string(), value);
            let text = serde_json::to_string(&map).unwrap();
            let err = Glm2Config::from_json_str(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn malformed_json_is_a_config_error() {
        let err = Glm2Config::from_json_str("{\"num_layers\": \"two\"}").unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains("num_layers") || err.to_string().contains("invalid type"));
    }
}
