//! Linear layers: `y = x Wᵀ (+ b)`, weights named as in the checkpoint. A weight is dense (the
//! model dtype) or in the official weight-only int8/int4 layout (`weight` + `weight_scale`).

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::kernels::cpu_gemv::{Gemv, MAX_ROWS};
use crate::kernels::cpu_quant::{Bits, QuantMatmul};
use candle_core::{DType, Device, Module, Tensor};

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// Official layout: `q` raw int8 bytes `[out, in]` (int8) or `[out, in/2]` (int4), `scale`
    /// f32 `[out]`. On the CPU the kernels read it as is; elsewhere `dense` holds it dequantized.
    Quantized {
        q: Tensor,
        scale: Tensor,
        bits: Bits,
        dense: Option<Tensor>,
    },
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_dim: usize,
}

/// The official dequantized weight: `scale * q` rounded to float16.
fn deq(s: f32, q: i8) -> f32 {
    half::f16::from_f32(s * q as f32).to_f32()
}

/// Dequantize an official int8/int4 weight (raw bytes on the CPU) to f32 `[out, in]`.
pub fn dequantize(q: &Tensor, scale: &Tensor, bits: Bits) -> Result<Tensor> {
    let (n, rb) = q.dims2()?;
    let bytes: Vec<u8> = q.flatten_all()?.to_vec1()?;
    let scale: Vec<f32> = scale.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec1()?;
    let k = if bits == Bits::Eight { rb } else { 2 * rb };
    let mut out = vec![0f32; n * k];
    for r in 0..n {
        let s = scale[r];
        let row = &bytes[r * rb..(r + 1) * rb];
        let o = &mut out[r * k..(r + 1) * k];
        match bits {
            Bits::Eight => row.iter().zip(o.iter_mut()).for_each(|(&b, o)| *o = deq(s, b as i8)),
            Bits::Four => {
                for (j, &b) in row.iter().enumerate() {
                    let b = b as i8;
                    o[2 * j] = deq(s, b >> 4);
                    o[2 * j + 1] = deq(s, (b << 4) >> 4);
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (n, k), &Device::Cpu)?)
}

impl Linear {
    /// Load `{prefix}.weight` `[out, in]` (and `{prefix}.weight_scale` when quantized) and, with
    /// `bias`, `{prefix}.bias` `[out]`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        quant: Option<Bits>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let weight = match quant {
            None => Weight::Dense(ckpt.get(&name, &[out_dim, in_dim], dtype, device)?),
            Some(bits) => {
                let cols = if bits == Bits::Eight { in_dim } else { in_dim.div_ceil(2) };
                let q = ckpt.get_int8(&name, &[out_dim, cols])?;
                let scale = ckpt.get(&format!("{prefix}.weight_scale"), &[out_dim], DType::F32, &Device::Cpu)?;
                let dense = if device.is_cpu() {
                    None
                } else {
                    Some(dequantize(&q, &scale, bits)?.to_dtype(dtype)?.to_device(device)?)
                };
                Weight::Quantized { q, scale, bits, dense }
            }
        };
        let bias = if bias {
            Some(ckpt.get(&format!("{prefix}.bias"), &[out_dim], dtype, device)?)
        } else {
            None
        };
        Ok(Self { weight, bias, out_dim })
    }

    /// A dense layer from a weight tensor.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_dim = weight.dim(0)?;
        Ok(Self { weight: Weight::Dense(weight), bias, out_dim })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // [.., in] -> [rows, in] x [in, out] -> [.., out]
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let cpu = x.device().is_cpu();
        let y = match &self.weight {
            // decoding streams each weight row once; 16-bit prefill widens blocks to f32
            Weight::Dense(w) if cpu && (rows <= MAX_ROWS || w.dtype() != DType::F32) => {
                x2.contiguous()?.apply_op2_no_bwd(w, &Gemv)?
            }
            Weight::Dense(w) => x2.matmul(&w.t()?)?,
            Weight::Quantized { q, scale, bits, .. } if cpu => {
                x2.contiguous()?.apply_op3_no_bwd(q, scale, &QuantMatmul { bits: *bits })?
            }
            Weight::Quantized { dense: Some(w), .. } => x2.matmul(&w.t()?)?,
            Weight::Quantized { dense: None, .. } => candle_core::bail!("quantized weight without a device copy"),
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.out_dim;
        y.reshape(out)
    }
}
