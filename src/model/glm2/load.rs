//! Loading [`Glm2Model`] from an opened checkpoint: each layer reads its tensors under the
//! checkpoint's own names (`transformer.encoder.layers.N.self_attention.query_key_value...`),
//! quantized or not, onto the device of its layer; and the way back (`export`) for GGUF files.

use super::{Block, Glm2Model, Mlp, ProgressFn, RmsNorm, RotaryEmbedding, SelfAttention};
use crate::checkpoint::Checkpoint;
use crate::config::Glm2Config;
use crate::error::{Error, Result};
use crate::model::linear::{Exported, Linear};
use crate::quantize::{Bits, QuantType};
use crate::tuning::Tuning;
use candle_core::{DType, Device, Tensor};

/// The official weight-only quantization of the four big linear layers of each block.
fn quant_bits(cfg: &Glm2Config) -> Option<Bits> {
    match cfg.quantization_bit {
        8 => Some(Bits::Eight),
        4 => Some(Bits::Four),
        _ => None,
    }
}

impl RmsNorm {
    pub(super) fn load(
        ckpt: &Checkpoint,
        name: &str,
        cfg: &Glm2Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weight = ckpt.get(&format!("{name}.weight"), &[cfg.hidden_size], dtype, device)?;
        Ok(Self {
            weight,
            eps: cfg.layernorm_epsilon as f32,
        })
    }
}

impl SelfAttention {
    pub(super) fn load(
        ckpt: &Checkpoint,
        p: &str,
        cfg: &Glm2Config,
        q: Option<QuantType>,
        tuning: &Tuning,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            query_key_value: Linear::load(
                ckpt,
                &format!("{p}.query_key_value"),
                cfg.hidden_size,
                cfg.qkv_size(),
                cfg.add_bias_linear || cfg.add_qkv_bias,
                quant_bits(cfg),
                q,
                tuning,
                dtype,
                device,
            )?,
            dense: Linear::load(
                ckpt,
                &format!("{p}.dense"),
                cfg.projection_size(),
                cfg.hidden_size,
                cfg.add_bias_linear,
                quant_bits(cfg),
                q,
                tuning,
                dtype,
                device,
            )?,
            num_heads: cfg.num_attention_heads,
            num_groups: cfg.kv_groups(),
            head_dim: cfg.kv_channels,
        })
    }
}

impl Mlp {
    pub(super) fn load(
        ckpt: &Checkpoint,
        p: &str,
        cfg: &Glm2Config,
        q: Option<QuantType>,
        tuning: &Tuning,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            dense_h_to_4h: Linear::load(
                ckpt,
                &format!("{p}.dense_h_to_4h"),
                cfg.hidden_size,
                2 * cfg.ffn_hidden_size,
                cfg.add_bias_linear,
                quant_bits(cfg),
                q,
                tuning,
                dtype,
                device,
            )?,
            dense_4h_to_h: Linear::load(
                ckpt,
                &format!("{p}.dense_4h_to_h"),
                cfg.ffn_hidden_size,
                cfg.hidden_size,
                cfg.add_bias_linear,
                quant_bits(cfg),
                q,
                tuning,
                dtype,
                device,
            )?,
        })
    }
}

impl Block {
    pub(super) fn load(
        ckpt: &Checkpoint,
        i: usize,
        cfg: &Glm2Config,
        q: Option<QuantType>,
        tuning: &Tuning,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("transformer.encoder.layers.{i}");
        Ok(Self {
            input_layernorm: RmsNorm::load(
                ckpt,
                &format!("{p}.input_layernorm"),
                cfg,
                dtype,
                device,
            )?,
            self_attention: SelfAttention::load(
                ckpt,
                &format!("{p}.self_attention"),
                cfg,
                q,
                tuning,
                dtype,
                device,
            )?,
            post_attention_layernorm: RmsNorm::load(
                ckpt,
                &format!("{p}.post_attention_layernorm"),
                cfg,
                dtype,
                device,
            )?,
            mlp: Mlp::load(ckpt, &format!("{p}.mlp"), cfg, q, tuning, dtype, device)?,
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
        let word_embeddings = ckpt.get(
            "transformer.embedding.word_embeddings.weight",
            &[cfg.padded_vocab_size, cfg.hidden_size],
            dtype,
            device,
        )?;
        report(1);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(Block::load(
                ckpt,
                i,
                cfg,
                quantize,
                &tuning,
                dtype,
                &layer_devices[i],
            )?);
            report(2 + i);
        }
        let final_layernorm = if cfg.post_layer_norm {
            Some(RmsNorm::load(
                ckpt,
                "transformer.encoder.final_layernorm",
                cfg,
                dtype,
                last_device,
            )?)
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
        Ok(Self {
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
            tuning,
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
