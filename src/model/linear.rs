//! Linear layers: `y = x Wᵀ (+ b)`, weights named as in the checkpoint. A weight is dense (the
//! model dtype) or in the official weight-only int8/int4 layout (`weight` + `weight_scale`).

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::kernels::cpu_gemv::{Gemv, MAX_ROWS};
use crate::kernels::cpu_quant::QuantMatmul;
use crate::quantize::Bits;
use crate::quantize::{ggml_to_official, ggml_type_for, quantize_official, QuantType};
use crate::tuning::Tuning;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

/// On CUDA, official int8/int4 products of up to this many rows (batched decoding) run the GEMV
/// kernel in chunks of 8 rows; more rows (prefill) dequantize the weight for a matmul.
#[cfg(feature = "cuda")]
const QUANT_GEMV_MAX_ROWS: usize = 32;

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
    /// A candle/GGML block-quantized weight, run by `QMatMul` (CPU and CUDA kernels).
    Ggml {
        qt: Arc<QTensor>,
        mm: QMatMul,
    },
}

/// A weight as written to a GGUF file.
pub enum Exported {
    Dense(Tensor),
    Official {
        q: Tensor,
        scale: Tensor,
        bits: Bits,
    },
    Ggml(Arc<QTensor>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_dim: usize,
    /// Kernel choices made at load (`vnni`, `gemvq`, `gemvq_rows`).
    tuning: Tuning,
}

/// Dequantize an official int8/int4 weight (raw bytes on the CPU) to f32 `[out, in]`.
pub fn dequantize(q: &Tensor, scale: &Tensor, bits: Bits) -> Result<Tensor> {
    let (n, rb) = q.dims2()?;
    let bytes: Vec<u8> = q.flatten_all()?.to_vec1()?;
    let scale: Vec<f32> = scale
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let k = bits.columns(rb);
    let out = crate::kernels::cpu_quant::dequantize_official(bits, &bytes, &scale, n, k);
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
        layout: Option<Bits>,
        quantize: Option<QuantType>,
        tuning: &Tuning,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let ggml = |qt: QTensor| -> Result<Weight> {
            let qt = if device.is_cpu() {
                qt
            } else {
                // move the blocks to the device
                let dt = qt.dtype();
                let data = qt.data()?.into_owned();
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(data),
                    device,
                    dt,
                )?;
                QTensor::new(storage, qt.shape().clone())?
            };
            let qt = Arc::new(qt);
            Ok(Weight::Ggml {
                mm: QMatMul::QTensor(qt.clone()),
                qt,
            })
        };
        let official = |q: Tensor, scale: Tensor, bits: Bits| -> Result<Weight> {
            // On CUDA the official bytes live on the GPU as they are and run through glm2rs's
            // own kernels (rows of 16-byte multiples; else a dequantized copy).
            if device.is_cuda() && q.dim(1)? % 16 == 0 {
                return Ok(Weight::Quantized {
                    q: q.to_device(device)?,
                    scale: scale.to_device(device)?,
                    bits,
                    dense: None,
                });
            }
            let dense = if device.is_cpu() && !tuning.dequantize {
                None
            } else {
                Some(
                    dequantize(&q, &scale, bits)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                )
            };
            Ok(Weight::Quantized {
                q,
                scale,
                bits,
                dense,
            })
        };
        let weight = if let Some(qt) = ckpt.gguf_quantized(&name, &[out_dim, in_dim])? {
            // a GGUF written by save_quantized: official layouts come back exactly
            match ckpt.gguf_official_bits() {
                Some(bits) => {
                    let (q, scale) = ggml_to_official(&qt, bits)?;
                    official(q, scale, bits)?
                }
                None => ggml(qt)?,
            }
        } else {
            match (layout, quantize) {
                (Some(_), Some(_)) => {
                    return Err(Error::invalid(
                        "this checkpoint is already quantized (quantization_bit); load it without quantize=",
                    ))
                }
                (Some(bits), None) => {
                    let cols = bits.row_bytes(in_dim);
                    let q = ckpt.get_int8(&name, &[out_dim, cols])?;
                    let scale = ckpt.get(&format!("{prefix}.weight_scale"), &[out_dim], DType::F32, &Device::Cpu)?;
                    official(q, scale, bits)?
                }
                (None, Some(QuantType::Official(bits))) => {
                    let w = ckpt.get(&name, &[out_dim, in_dim], DType::F32, &Device::Cpu)?;
                    let (q, scale) = quantize_official(&w, bits)?;
                    official(q, scale, bits)?
                }
                (None, Some(QuantType::Ggml(t))) => {
                    let w = ckpt.get(&name, &[out_dim, in_dim], DType::F32, &Device::Cpu)?;
                    match ggml_type_for(t, in_dim) {
                        Some(t) => ggml(QTensor::quantize(&w, t)?)?,
                        None => Weight::Dense(w.to_dtype(dtype)?.to_device(device)?),
                    }
                }
                (None, None) => Weight::Dense(ckpt.get(&name, &[out_dim, in_dim], dtype, device)?),
            }
        };
        let bias = if bias {
            Some(ckpt.get(&format!("{prefix}.bias"), &[out_dim], dtype, device)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            out_dim,
            tuning: *tuning,
        })
    }

    /// The weight (and bias) for writing a GGUF file.
    pub fn export(&self) -> (Exported, Option<Tensor>) {
        let w = match &self.weight {
            Weight::Dense(w) => Exported::Dense(w.clone()),
            Weight::Quantized { q, scale, bits, .. } => Exported::Official {
                q: q.clone(),
                scale: scale.clone(),
                bits: *bits,
            },
            Weight::Ggml { qt, .. } => Exported::Ggml(qt.clone()),
        };
        (w, self.bias.clone())
    }

    /// Bytes held by the weight.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quantized {
                q, scale, dense, ..
            } => {
                q.elem_count()
                    + 4 * scale.elem_count()
                    + dense
                        .as_ref()
                        .map_or(0, |d| d.elem_count() * d.dtype().size_in_bytes())
            }
            Weight::Ggml { qt, .. } => qt.storage_size_in_bytes(),
        }
    }

    /// A dense layer from a weight tensor.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_dim = weight.dim(0)?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            out_dim,
            tuning: Tuning::default(),
        })
    }
}

impl Linear {
    /// The bias `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x Wᵀ` without the bias, and the bias (for kernels that add it themselves).
    pub fn forward_no_bias(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let y = self.matmul(x)?;
        Ok((y, self.bias.clone()))
    }
}

impl Linear {
    /// `swiglu(x Wᵀ)` in one CUDA launch for a single row (decoding one sequence) of a bias-free
    /// dense_h_to_4h (gate rows first), with the numbers of the product then SwiGLU; `None` when
    /// the fused kernels do not apply.
    #[cfg(feature = "cuda")]
    pub fn forward_swiglu_cuda(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        if rows != 1 || self.bias.is_some() || self.out_dim % 2 != 0 || !x.device().is_cuda() {
            return Ok(None);
        }
        let x2 = x.reshape((1, in_dim))?;
        let y = match &self.weight {
            Weight::Dense(w) if w.device().is_cuda() => crate::kernels::cuda::gemv_swiglu(&x2, w)?,
            Weight::Quantized {
                q,
                scale,
                bits,
                dense: None,
            } if q.device().is_cuda() => {
                crate::kernels::cuda::gemv_official_swiglu(&x2, q, scale, *bits, &self.tuning)?
            }
            _ => None,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.out_dim / 2;
        y.map(|y| y.reshape(out)).transpose()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.matmul(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Linear {
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
            #[cfg(feature = "cuda")]
            Weight::Dense(w) if !cpu && rows <= 8 && w.device().is_cuda() => {
                match crate::kernels::cuda::gemv(&x2, w)? {
                    Some(y) => y,
                    None => x2.matmul(&w.t()?)?,
                }
            }
            Weight::Dense(w) => x2.matmul(&w.t()?)?,
            Weight::Quantized {
                q,
                scale,
                bits,
                dense: None,
            } if cpu => {
                let exact = x2.dtype() == DType::F32;
                x2.contiguous()?.apply_op3_no_bwd(
                    q,
                    scale,
                    &QuantMatmul {
                        bits: *bits,
                        exact,
                        vnni: self.tuning.vnni,
                    },
                )?
            }
            #[cfg(feature = "cuda")]
            Weight::Quantized {
                q,
                scale,
                bits,
                dense: None,
            } if q.device().is_cuda() => {
                let b = *bits;
                if rows <= 8 {
                    crate::kernels::cuda::gemv_official(&x2, q, scale, b, &self.tuning)?
                } else if rows <= QUANT_GEMV_MAX_ROWS {
                    // batched decoding: the GEMV over chunks of 8 rows reads the packed weight
                    // once per chunk, cheaper than writing and reading a dense copy
                    let parts = (0..rows)
                        .step_by(8)
                        .map(|r0| {
                            let x = x2.narrow(0, r0, (rows - r0).min(8))?;
                            crate::kernels::cuda::gemv_official(&x, q, scale, b, &self.tuning)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)?
                } else {
                    // prefill: a dense copy of this one weight for the product, then freed
                    let w = crate::kernels::cuda::dequantize_official(q, scale, b, x2.dtype())?;
                    x2.matmul(&w.t()?)?
                }
            }
            Weight::Quantized { dense: Some(w), .. } => x2.matmul(&w.t()?)?,
            Weight::Quantized { dense: None, .. } => {
                candle_core::bail!("quantized weight without a device copy")
            }
            // candle's CUDA kernels take 16-bit inputs directly for a few rows (decoding)
            Weight::Ggml { mm, .. } if !cpu && rows <= 8 => {
                let dt = x2.dtype();
                mm.forward(&x2.contiguous()?)?.to_dtype(dt)?
            }
            Weight::Ggml { mm, .. } => {
                let dt = x2.dtype();
                mm.forward(&x2.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dt)?
            }
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.out_dim;
        y.reshape(out)
    }
}
