//! Loading [`Glm2Model`] from an opened checkpoint: each layer reads its tensors under the
//! checkpoint's own names (`transformer.encoder.layers.N.self_attention.query_key_value...`),
//! quantized or not, onto the device of its layer; and the way back (`export`) for GGUF files.

use super::{Block, Glm2Model, Mlp, ProgressFn, RmsNorm, RotaryEmbedding, SelfAttention};
use crate::checkpoint::Checkpoint;
use crate::config::Glm2Config;
use crate::error::{Error, Result};
use crate::model::kv_pool::{KvPool, PoolOptions};
use crate::model::linear::{Exported, Linear};
use crate::quantize::{Bits, QuantType};
use crate::tuning::Tuning;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// What the loading of every layer shares: the checkpoint, the config and how weights are kept.
struct Loader<'a> {
    ckpt: &'a Checkpoint,
    cfg: &'a Glm2Config,
    quantize: Option<QuantType>,
    tuning: &'a Tuning,
    dtype: DType,
}

impl Loader<'_> {
    /// One of the four big linear layers of a block (`query_key_value`, `self_attention.dense`,
    /// `dense_h_to_4h`, `dense_4h_to_h`): the official int8/int4 layout when the checkpoint has it
    /// (`quantization_bit`), quantized while loading when asked.
    fn block_linear(
        &self,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Linear> {
        let layout = match self.cfg.quantization_bit {
            8 => Some(Bits::Eight),
            4 => Some(Bits::Four),
            _ => None,
        };
        Linear::load(
            self.ckpt,
            name,
            in_dim,
            out_dim,
            bias,
            layout,
            self.quantize,
            self.tuning,
            self.dtype,
            device,
        )
    }

    /// `{name}.weight` of an RMSNorm over the hidden size.
    fn norm(&self, name: &str, device: &Device) -> Result<RmsNorm> {
        let weight = self.ckpt.get(
            &format!("{name}.weight"),
            &[self.cfg.hidden_size],
            self.dtype,
            device,
        )?;
        Ok(RmsNorm {
            weight,
            eps: self.cfg.layernorm_epsilon as f32,
        })
    }

    /// `transformer.encoder.layers.{i}`.
    fn block(&self, i: usize, device: &Device) -> Result<Block> {
        let cfg = self.cfg;
        let p = format!("transformer.encoder.layers.{i}");
        let a = format!("{p}.self_attention");
        let m = format!("{p}.mlp");
        Ok(Block {
            input_layernorm: self.norm(&format!("{p}.input_layernorm"), device)?,
            self_attention: SelfAttention {
                query_key_value: self.block_linear(
                    &format!("{a}.query_key_value"),
                    cfg.hidden_size,
                    cfg.qkv_size(),
                    cfg.add_bias_linear || cfg.add_qkv_bias,
                    device,
                )?,
                dense: self.block_linear(
                    &format!("{a}.dense"),
                    cfg.projection_size(),
                    cfg.hidden_size,
                    cfg.add_bias_linear,
                    device,
                )?,
                num_heads: cfg.num_attention_heads,
                num_groups: cfg.kv_groups(),
                head_dim: cfg.kv_channels,
            },
            post_attention_layernorm: self
                .norm(&format!("{p}.post_attention_layernorm"), device)?,
            mlp: Mlp {
                dense_h_to_4h: self.block_linear(
                    &format!("{m}.dense_h_to_4h"),
                    cfg.hidden_size,
                    2 * cfg.ffn_hidden_size,
                    cfg.add_bias_linear,
                    device,
                )?,
                dense_4h_to_h: self.block_linear(
                    &format!("{m}.dense_4h_to_h"),
                    cfg.ffn_hidden_size,
                    cfg.hidden_size,
                    cfg.add_bias_linear,
                    device,
                )?,
            },
            residual_post_layernorm: cfg.apply_residual_connection_post_layernorm,
        })
    }
}

impl Glm2Model {
    /// Build the model from an opened checkpoint on `devices`: the embedding on the first, the
    /// layers split into equal consecutive runs over all of them, the output layer on the last.
    pub fn load(
        cfg: &Glm2Config,
        ckpt: &Checkpoint,
        dtype: DType,
        devices: &[Device],
        quantize: Option<QuantType>,
        tuning: Tuning,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<Self> {
        let Some(device) = devices.first() else {
            return Err(Error::invalid("no device to load the model on"));
        };
        // 16-bit models: the float32 attention products may use TF32 tensor cores (their
        // inputs are 16-bit values already); float32 models keep full float32 products.
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            candle_core::cuda::set_gemm_reduced_precision_f32(dtype != DType::F32);
        }
        let last_device = devices.last().expect("non-empty");
        let layer_devices: Vec<Device> = (0..cfg.num_layers)
            .map(|i| devices[i * devices.len() / cfg.num_layers.max(1)].clone())
            .collect();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::invalid(format!(
                "dtype {dtype:?} is not a float dtype the model runs in"
            )));
        }
        let total = cfg.num_layers + 3;
        let report = |done: usize| {
            if let Some(p) = progress {
                p(done, total)
            }
        };
        let loader = Loader {
            ckpt,
            cfg,
            quantize,
            tuning: &tuning,
            dtype,
        };
        let word_embeddings = ckpt.get(
            "transformer.embedding.word_embeddings.weight",
            &[cfg.padded_vocab_size, cfg.hidden_size],
            dtype,
            device,
        )?;
        report(1);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(loader.block(i, &layer_devices[i])?);
            report(2 + i);
        }
        let final_layernorm = if cfg.post_layer_norm {
            Some(loader.norm("transformer.encoder.final_layernorm", last_device)?)
        } else {
            None
        };
        let output_layer = Linear::load(
            ckpt,
            "transformer.output_layer",
            cfg.hidden_size,
            cfg.padded_vocab_size,
            false,
            None,
            None,
            &tuning,
            dtype,
            last_device,
        )?;
        report(total - 1);
        let mut tables: Vec<(Device, RotaryEmbedding)> = vec![];
        let mut rotary = Vec::with_capacity(cfg.num_layers);
        for d in &layer_devices {
            match tables.iter().find(|(td, _)| td.same_device(d)) {
                Some((_, r)) => rotary.push(r.clone()),
                None => {
                    let r = RotaryEmbedding::new(cfg, dtype, d)?;
                    tables.push((d.clone(), r.clone()));
                    rotary.push(r);
                }
            }
        }
        report(total);
        let kv = Arc::new(KvPool::new(
            PoolOptions::default(),
            layer_devices.clone(),
            cfg.kv_groups(),
            cfg.kv_channels,
            dtype,
        )?);
        Ok(Self {
            kv,
            config: cfg.clone(),
            dtype,
            device: device.clone(),
            word_embeddings,
            rotary,
            layers,
            layer_devices,
            final_layernorm,
            output_layer,
            prefix: None,
            prefix_blocks: None,
            kv_salt: 0,
            tuning,
            adapters: Default::default(),
            adapter: None,
        })
    }

    /// Every weight under its checkpoint name, for writing a GGUF file.
    pub fn export(&self) -> Vec<(String, Exported)> {
        let mut out = vec![(
            "transformer.embedding.word_embeddings.weight".to_string(),
            Exported::Dense(self.word_embeddings.clone()),
        )];
        let linear = |out: &mut Vec<(String, Exported)>, name: String, l: &Linear| {
            let (w, b) = l.export();
            out.push((format!("{name}.weight"), w));
            if let Some(b) = b {
                out.push((format!("{name}.bias"), Exported::Dense(b)));
            }
        };
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("transformer.encoder.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                Exported::Dense(b.input_layernorm.weight.clone()),
            ));
            linear(
                &mut out,
                format!("{p}.self_attention.query_key_value"),
                &b.self_attention.query_key_value,
            );
            linear(
                &mut out,
                format!("{p}.self_attention.dense"),
                &b.self_attention.dense,
            );
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                Exported::Dense(b.post_attention_layernorm.weight.clone()),
            ));
            linear(
                &mut out,
                format!("{p}.mlp.dense_h_to_4h"),
                &b.mlp.dense_h_to_4h,
            );
            linear(
                &mut out,
                format!("{p}.mlp.dense_4h_to_h"),
                &b.mlp.dense_4h_to_h,
            );
        }
        if let Some(n) = &self.final_layernorm {
            out.push((
                "transformer.encoder.final_layernorm.weight".to_string(),
                Exported::Dense(n.weight.clone()),
            ));
        }
        linear(
            &mut out,
            "transformer.output_layer".to_string(),
            &self.output_layer,
        );
        out
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = t(&self.word_embeddings) + self.output_layer.weight_bytes();
        for b in &self.layers {
            n += b.self_attention.query_key_value.weight_bytes()
                + b.self_attention.dense.weight_bytes()
                + b.mlp.dense_h_to_4h.weight_bytes()
                + b.mlp.dense_4h_to_h.weight_bytes()
                + t(&b.input_layernorm.weight)
                + t(&b.post_attention_layernorm.weight);
        }
        n
    }
}
