//! P-Tuning v2 prefixes (`ptuning/main.py` checkpoints): a learned key/value prefix for every
//! layer, placed in each new cache before the prompt (no rotary embedding on it; the prompt's
//! positions still start at 0), as the official `get_prompt`.

use crate::checkpoint::Checkpoint;
use crate::config::Glm2Config;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Per-layer prefix keys and values, `[1, groups, pre_seq_len, kv_channels]` each.
#[derive(Debug, Clone)]
pub struct Prefix {
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
    pub len: usize,
}

#[derive(serde::Deserialize)]
struct PrefixConfig {
    pre_seq_len: Option<usize>,
    #[serde(default)]
    prefix_projection: bool,
}

/// The one tensor every prefix checkpoint has.
const EMB: &str = "transformer.prefix_encoder.embedding.weight";

impl Prefix {
    /// Load a P-Tuning v2 checkpoint directory for a base model with config `cfg`.
    pub fn load_dir(dir: &Path, cfg: &Glm2Config, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let pc: PrefixConfig = serde_json::from_str(&text)
            .map_err(|e| Error::config(format!("{}: {e}", cfg_path.display())))?;
        let pre = pc.pre_seq_len.ok_or_else(|| {
            Error::config(format!(
                "{}: pre_seq_len is missing: not a P-Tuning v2 checkpoint",
                cfg_path.display()
            ))
        })?;
        let ckpt = Checkpoint::open_dir(dir)?;
        Self::from_checkpoint(&ckpt, cfg, pre, pc.prefix_projection, dtype, device)
    }

    /// Whether a checkpoint carries a prefix encoder.
    pub fn present(ckpt: &Checkpoint) -> bool {
        ckpt.contains(EMB)
    }

    /// Compute the prefix from `transformer.prefix_encoder.*` of a checkpoint.
    ///
    /// The layout is ChatGLM2's `PrefixEncoder` (chatglm2-6b `modeling_chatglm.py`), with
    /// `kv_size = num_layers * kv_channels * multi_query_group_num * 2`:
    /// - `embedding`: `Embedding(pre_seq_len, kv_size)`, with or without `prefix_projection`;
    /// - with `prefix_projection`, `trans`: `Linear(kv_size, hidden)` (`trans.0`), `Tanh`,
    ///   `Linear(hidden, kv_size)` (`trans.2`), applied to the embedding.
    ///
    /// (The first-generation ChatGLM-6B encoder embedded `[pre, hidden]` and projected to
    /// `num_layers * hidden * 2`; no ChatGLM2 checkpoint has that layout.) Computed in float32,
    /// as `ptuning/main.py` keeps the prefix encoder in float32, then cast to `dtype`
    /// (`get_prompt`'s `.type(dtype)`).
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        cfg: &Glm2Config,
        pre: usize,
        projection: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (l, g, hd, h) = (
            cfg.num_layers,
            cfg.kv_groups(),
            cfg.kv_channels,
            cfg.hidden_size,
        );
        let kv_size = l * hd * g * 2;
        let cpu = Device::Cpu;
        // Every tensor's shape is checked before it is read, so a prefix trained for another
        // model is a `ConfigError` naming the tensor, its shape and the shape this model needs.
        let fetch = |name: &str, want: &[usize]| -> Result<Tensor> {
            let full = format!("transformer.prefix_encoder.{name}");
            match ckpt.shape(&full) {
                Some(s) if s == want => ckpt.get(&full, want, DType::F32, &cpu),
                found => Err(Error::config(format!(
                    "the P-Tuning prefix does not fit the base model: {full} is {}, expected {want:?} \
                     (pre_seq_len {pre}, prefix_projection {projection}; kv_size = {l} layers x {hd} \
                     kv_channels x {g} groups x 2 = {kv_size}, hidden_size {h})",
                    found.map_or("missing".to_string(), |s| format!("{s:?}")),
                ))),
            }
        };
        // [pre, kv_size]
        let emb = fetch("embedding.weight", &[pre, kv_size])?;
        let kv = if projection {
            let w0 = fetch("trans.0.weight", &[h, kv_size])?;
            let b0 = fetch("trans.0.bias", &[h])?;
            let w2 = fetch("trans.2.weight", &[kv_size, h])?;
            let b2 = fetch("trans.2.bias", &[kv_size])?;
            // [pre, hidden] -> [pre, kv_size]
            let hid = emb.matmul(&w0.t()?)?.broadcast_add(&b0)?.tanh()?;
            hid.matmul(&w2.t()?)?.broadcast_add(&b2)?
        } else {
            emb
        };
        // [pre, L*2, g, hd]; layer i: keys at 2i, values at 2i+1 (official view/permute/split)
        let kv = kv.to_dtype(dtype)?.reshape((pre, l * 2, g, hd))?;
        let mut keys = Vec::with_capacity(l);
        let mut values = Vec::with_capacity(l);
        for i in 0..l {
            let take = |j: usize| -> Result<Tensor> {
                Ok(kv
                    .narrow(1, j, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?
                    .to_device(device)?)
            };
            keys.push(take(2 * i)?);
            values.push(take(2 * i + 1)?);
        }
        Ok(Self {
            keys,
            values,
            len: pre,
        })
    }
}
