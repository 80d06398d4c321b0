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
        let width = l * 2 * g * hd;
        let cpu = Device::Cpu;
        let misfit = |what: String| {
            Error::config(format!(
                "the P-Tuning prefix does not fit the base model ({what}; the base model needs {l} layers x 2 x {g} groups x {hd} channels = {width})"
            ))
        };
        let stored = ckpt
            .shape(EMB)
            .ok_or_else(|| misfit(format!("{EMB} is missing")))?;
        let kv = if projection {
            if stored != [pre, h] {
                return Err(misfit(format!(
                    "{EMB} is {stored:?}, expected [{pre}, {h}] with prefix_projection"
                )));
            }
            let emb = ckpt.get(EMB, &[pre, h], DType::F32, &cpu)?;
            let get = |n: &str, s: &[usize]| {
                ckpt.get(
                    &format!("transformer.prefix_encoder.trans.{n}"),
                    s,
                    DType::F32,
                    &cpu,
                )
            };
            let w0 = get("0.weight", &[h, h])?;
            let b0 = get("0.bias", &[h])?;
            let w2 = ckpt
                .shape("transformer.prefix_encoder.trans.2.weight")
                .filter(|s| s == &[width, h])
                .ok_or_else(|| misfit("trans.2.weight has another shape".to_string()))
                .and_then(|_| get("2.weight", &[width, h]))?;
            let b2 = get("2.bias", &[width])?;
            let hid = emb.matmul(&w0.t()?)?.broadcast_add(&b0)?.tanh()?;
            hid.matmul(&w2.t()?)?.broadcast_add(&b2)?
        } else {
            if stored != [pre, width] {
                return Err(misfit(format!(
                    "{EMB} is {stored:?}, expected [{pre}, {width}]"
                )));
            }
            ckpt.get(EMB, &[pre, width], DType::F32, &cpu)?
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
