//! LoRA adapters kept apart from the weights and applied per sequence (several adapters over
//! one base model, the sequences of a step batched together whatever adapter each uses).
//!
//! A sequence's cache names its adapter ([`Cache::adapter`]); a step gathers the rows of each
//! adapter ([`StepLora`]) and every targeted projection adds `(x Aᵀ) Bᵀ · scale` to those rows
//! (peft's unmerged `Linear.forward`: `result + lora_B(lora_A(dropout(x))) * scaling`), plus, for
//! an adapter with trained biases, the difference between its bias and the base one. The
//! update's numbers are those that [`crate::checkpoint::LoraAdapter`] merges at load.

use super::kv_cache::Cache;
use crate::checkpoint::LoraAdapter;
use crate::config::Glm2Config;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// The four projections of a layer an adapter may target, in checkpoint-name order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    QueryKeyValue = 0,
    Dense = 1,
    DenseHTo4h = 2,
    Dense4hToH = 3,
}

const TARGETS: [(Target, &str); 4] = [
    (Target::QueryKeyValue, "self_attention.query_key_value"),
    (Target::Dense, "self_attention.dense"),
    (Target::DenseHTo4h, "mlp.dense_h_to_4h"),
    (Target::Dense4hToH, "mlp.dense_4h_to_h"),
];

/// One projection's update: `x a_t` (`[in, r]`), then `b_t` (`[r, out]`, the scale folded in),
/// then `bias` (trained bias minus base bias, `[out]`).
#[derive(Debug)]
struct Update {
    a_t: Option<Tensor>,
    b_t: Option<Tensor>,
    bias: Option<Tensor>,
}

impl Update {
    /// `x` `[1, rows, in]` -> the update `[1, rows, out]`.
    fn of(&self, x: &Tensor, out_dim: usize) -> Result<Tensor> {
        let (_, rows, _) = x.dims3()?;
        let mut y = match (&self.a_t, &self.b_t) {
            (Some(a), Some(b)) => x.broadcast_matmul(a)?.broadcast_matmul(b)?,
            _ => Tensor::zeros((1, rows, out_dim), x.dtype(), x.device())?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }
}

/// An adapter ready to apply: per layer, per [`Target`], its update on that layer's device in
/// the model dtype.
#[derive(Debug)]
pub struct UnmergedLora {
    name: String,
    /// Distinguishes the prefix cache's keys of this adapter's sequences from every other's.
    salt: u64,
    layers: Vec<[Option<Update>; 4]>,
    out_dims: [usize; 4],
}

impl UnmergedLora {
    /// Prepare `adapter` for a model of `cfg` whose layer `i` lives on `devices[i]`;
    /// `base_bias(layer, target)` is the base model's bias of that projection (if it has one).
    pub(crate) fn new(
        name: &str,
        adapter: &LoraAdapter,
        cfg: &Glm2Config,
        dtype: DType,
        devices: &[Device],
        base_bias: &dyn Fn(usize, Target) -> Option<Tensor>,
    ) -> Result<Self> {
        static SALTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let (hd, nh, ng) = (cfg.kv_channels, cfg.num_attention_heads, cfg.kv_groups());
        let dims = [
            (cfg.hidden_size, (nh + 2 * ng) * hd),
            (nh * hd, cfg.hidden_size),
            (cfg.hidden_size, 2 * cfg.ffn_hidden_size),
            (cfg.ffn_hidden_size, cfg.hidden_size),
        ];
        let bad = |msg: String| Error::checkpoint(adapter.dir(), msg);
        let mut known = std::collections::BTreeSet::new();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for (i, dev) in devices.iter().enumerate().take(cfg.num_layers) {
            let mut per: [Option<Update>; 4] = Default::default();
            for (target, module) in TARGETS {
                let (in_dim, out_dim) = dims[target as usize];
                let prefix = format!("transformer.encoder.layers.{i}.{module}");
                let (w, b) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
                let (mut a_t, mut b_t, mut bias) = (None, None, None);
                if let Some((a, bm, scale)) = adapter.low_rank(&w) {
                    let r = a.dim(0)?;
                    if a.dims() != [r, in_dim] || bm.dims() != [out_dim, r] {
                        return Err(bad(format!(
                            "{w}: lora_A is {:?} and lora_B {:?}; this model's weight is [{out_dim}, {in_dim}]",
                            a.dims(),
                            bm.dims()
                        )));
                    }
                    a_t = Some(a.t()?.contiguous()?.to_dtype(dtype)?.to_device(dev)?);
                    let scaled = (bm.t()? * scale)?.contiguous()?;
                    b_t = Some(scaled.to_dtype(dtype)?.to_device(dev)?);
                    known.insert(w);
                }
                if let Some(trained) = adapter.trained_bias(&b) {
                    let Some(base) = base_bias(i, target) else {
                        return Err(bad(format!("{b}: this model's {module} has no bias")));
                    };
                    if trained.dims() != [out_dim] {
                        return Err(bad(format!(
                            "{b}: {:?}, expected [{out_dim}]",
                            trained.dims()
                        )));
                    }
                    let base = base.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    bias = Some((trained - base)?.to_dtype(dtype)?.to_device(dev)?);
                    known.insert(b);
                }
                if a_t.is_some() || bias.is_some() {
                    per[target as usize] = Some(Update { a_t, b_t, bias });
                }
            }
            layers.push(per);
        }
        let unknown: Vec<String> = adapter
            .target_names()
            .into_iter()
            .filter(|n| !known.contains(n))
            .collect();
        if !unknown.is_empty() {
            return Err(bad(format!(
                "the adapter targets tensors this model does not have: {}",
                unknown.join(", ")
            )));
        }
        Ok(Self {
            name: name.to_string(),
            salt: SALTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 40,
            layers,
            out_dims: dims.map(|(_, o)| o),
        })
    }

    /// The name requests use to pick this adapter.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn salt(&self) -> u64 {
        self.salt
    }
}

/// The adapters of one step: each with the rows of the step's input that use it (`None`: all),
/// as an index tensor made once for the step (on the device of its input; moved only for layers
/// on another GPU).
pub(crate) struct StepLora {
    groups: Vec<(Arc<UnmergedLora>, Option<Tensor>)>,
}

impl StepLora {
    /// The adapters of `caches` (whose rows are `segments`, as in the model's forward), or
    /// `None` when no sequence of the step uses one.
    pub(crate) fn of(
        caches: &[&mut Cache],
        segments: &[(usize, usize)],
        device: &Device,
    ) -> Result<Option<Self>> {
        let n: usize = segments.iter().map(|&(_, t)| t).sum();
        let mut groups: Vec<(Arc<UnmergedLora>, Vec<u32>)> = vec![];
        for (cache, &(off, t)) in caches.iter().zip(segments) {
            let Some(a) = cache.adapter() else { continue };
            let rows = (off as u32)..((off + t) as u32);
            match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, a)) {
                Some((_, r)) => r.extend(rows),
                None => groups.push((a.clone(), rows.collect())),
            }
        }
        if groups.is_empty() {
            return Ok(None);
        }
        let groups = groups
            .into_iter()
            .map(|(a, rows)| {
                let idx = match rows.len() == n {
                    true => None,
                    false => Some(Tensor::from_slice(&rows, rows.len(), device)?),
                };
                Ok((a, idx))
            })
            .collect::<Result<_>>()?;
        Ok(Some(Self { groups }))
    }

    /// `y` (the base projection `target` of layer `layer` of `x`, `[1, n, out]`) with each
    /// adapter's update added to its rows.
    pub(crate) fn apply(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        let mut y = y;
        for (lora, rows) in &self.groups {
            let Some(update) = lora
                .layers
                .get(layer)
                .and_then(|l| l[target as usize].as_ref())
            else {
                continue;
            };
            let out_dim = lora.out_dims[target as usize];
            y = match rows {
                None => (y + update.of(x, out_dim)?)?,
                Some(idx) => {
                    let idx = idx.to_device(x.device())?; // the same tensor on one device
                    let delta = update.of(&x.index_select(&idx, 1)?, out_dim)?;
                    y.index_add(&idx, &delta, 1)?
                }
            };
        }
        Ok(y)
    }
}

/// `y` plus the step's adapter updates of `target` (unchanged without adapters).
pub(crate) fn add(
    lora: Option<&StepLora>,
    layer: usize,
    target: Target,
    x: &Tensor,
    y: Tensor,
) -> Result<Tensor> {
    match lora {
        Some(l) => l.apply(layer, target, x, y),
        None => Ok(y),
    }
}
