//! Quantization: the official weight-only schemes (per-row int8/int4) done while loading, and
//! candle's block types (`q8_0`, `q4_0`, `q4k`, ...) run through `QMatMul`; GGUF files that hold a
//! quantized model with its config and tokenizer.
//!
//! Only the four big linear layers of each block are quantized (`query_key_value`,
//! `self_attention.dense`, `dense_h_to_4h`, `dense_4h_to_h`), as the official code does: the
//! embedding, the output layer and the norms stay in the model dtype.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;
use std::borrow::Cow;

/// Bits per weight of the official layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    Eight,
    Four,
}

impl Bits {
    /// 8 or 4.
    pub fn count(self) -> u8 {
        match self {
            Bits::Eight => 8,
            Bits::Four => 4,
        }
    }

    /// Bytes of a packed row of `k` columns (int4: two columns a byte, the last one alone when
    /// `k` is odd).
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            Bits::Eight => k,
            Bits::Four => k.div_ceil(2),
        }
    }

    /// Columns of a packed row of `rb` bytes.
    pub fn columns(self, rb: usize) -> usize {
        match self {
            Bits::Eight => rb,
            Bits::Four => 2 * rb,
        }
    }
}

/// What to quantize the linear layers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// The official per-row schemes (`quantization_bit` 8 / 4).
    Official(Bits),
    /// A candle/GGML block type.
    Ggml(GgmlDType),
}

impl QuantType {
    /// `"8"`, `"4"`, `"int8"`, `"int4"`, or a block type: `"q8_0"`, `"q4_0"`, `"q4_1"`, `"q5_0"`,
    /// `"q5_1"`, `"q2k"`, `"q3k"`, `"q4k"`, `"q5k"`, `"q6k"`.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match t.as_str() {
            "8" | "int8" => QuantType::Official(Bits::Eight),
            "4" | "int4" => QuantType::Official(Bits::Four),
            "q8_0" => QuantType::Ggml(GgmlDType::Q8_0),
            "q4_0" => QuantType::Ggml(GgmlDType::Q4_0),
            "q4_1" => QuantType::Ggml(GgmlDType::Q4_1),
            "q5_0" => QuantType::Ggml(GgmlDType::Q5_0),
            "q5_1" => QuantType::Ggml(GgmlDType::Q5_1),
            "q2k" | "q2_k" => QuantType::Ggml(GgmlDType::Q2K),
            "q3k" | "q3_k" => QuantType::Ggml(GgmlDType::Q3K),
            "q4k" | "q4_k" => QuantType::Ggml(GgmlDType::Q4K),
            "q5k" | "q5_k" => QuantType::Ggml(GgmlDType::Q5K),
            "q6k" | "q6_k" => QuantType::Ggml(GgmlDType::Q6K),
            _ => {
                return Err(Error::invalid(format!(
                    "quantize={s:?}: use 8, 4 (the official schemes) or q8_0, q4_0, q4_1, q5_0, q5_1, q2k, q3k, q4k, q5k, q6k"
                )))
            }
        })
    }

    pub fn name(&self) -> String {
        match self {
            QuantType::Official(Bits::Eight) => "int8".into(),
            QuantType::Official(Bits::Four) => "int4".into(),
            QuantType::Ggml(t) => format!("{t:?}").to_ascii_lowercase(),
        }
    }
}

/// The official `quantize` (on float16 weights): `scale = max|w| / (2^(bits-1) - 1)` per row,
/// `q = round(w / scale)`;
/// int4 values packed two per byte, column 2j in the high nibble. Returns (`q` U8 bytes, `scale` f32).
pub fn quantize_official(w: &Tensor, bits: Bits) -> Result<(Tensor, Tensor)> {
    let (n, k) = w.dims2()?;
    if bits == Bits::Four && k % 2 != 0 {
        return Err(Error::invalid(format!(
            "int4 needs an even number of columns, got {k}"
        )));
    }
    let w = w
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)) = &*storage else {
        return Err(Error::invalid("quantize: expected an f32 CPU tensor"));
    };
    let data = &all[layout.start_offset()..layout.start_offset() + n * k];
    let qmax = match bits {
        Bits::Eight => 127.0,
        Bits::Four => 7.0,
    };
    let rb = bits.row_bytes(k);
    let mut q = vec![0u8; n * rb];
    let mut scales = vec![0f32; n];
    use rayon::prelude::*;
    q.par_chunks_mut(rb)
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each(|(r, (out, scale))| {
            let row = &data[r * k..(r + 1) * k];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = f16::from_f32(amax / qmax).to_f32();
            *scale = s;
            // the quotient in float32, rounded to the nearest integer with ties to even (torch.round)
            let qv = |v: f32| -> i8 {
                if s == 0.0 {
                    0
                } else {
                    (v / s).round_ties_even().clamp(-qmax, qmax) as i8
                }
            };
            match bits {
                Bits::Eight => out.iter_mut().zip(row).for_each(|(o, &v)| *o = qv(v) as u8),
                Bits::Four => {
                    for (j, o) in out.iter_mut().enumerate() {
                        let hi = qv(row[2 * j]) as u8 & 0x0F;
                        let lo = qv(row[2 * j + 1]) as u8 & 0x0F;
                        *o = (hi << 4) | lo;
                    }
                }
            }
        });
    Ok((
        Tensor::from_vec(q, (n, rb), &Device::Cpu)?,
        Tensor::from_vec(scales, n, &Device::Cpu)?,
    ))
}

/// The block type actually used for a weight with `k` columns: k-quants need multiples of 256,
/// the others of 32; a weight that does not fit falls back to `q8_0` (or stays dense).
pub fn ggml_type_for(t: GgmlDType, k: usize) -> Option<GgmlDType> {
    if k % t.block_size() == 0 {
        Some(t)
    } else if k % GgmlDType::Q8_0.block_size() == 0 {
        Some(GgmlDType::Q8_0)
    } else {
        None
    }
}

/// An official per-row weight as exactly equal GGML blocks: int8 as `q8_0` (d = scale), int4 as
/// `q4_0` (d = scale, nibble = q + 8). Needs 32 | k.
pub fn official_to_ggml(q: &Tensor, scale: &Tensor, bits: Bits) -> Result<QTensor> {
    let (n, rb) = q.dims2()?;
    let k = bits.columns(rb);
    if k % 32 != 0 {
        return Err(Error::invalid(format!(
            "a GGUF block needs 32 | columns, got {k}"
        )));
    }
    let bytes: Vec<u8> = q.flatten_all()?.to_vec1()?;
    let scales: Vec<f32> = scale.to_vec1()?;
    let mut out = vec![];
    for r in 0..n {
        let d = f16::from_f32(scales[r]).to_bits().to_le_bytes();
        let vals: Vec<i8> = match bits {
            Bits::Eight => bytes[r * rb..(r + 1) * rb]
                .iter()
                .map(|&b| b as i8)
                .collect(),
            Bits::Four => bytes[r * rb..(r + 1) * rb]
                .iter()
                .flat_map(|&b| [(b as i8) >> 4, ((b as i8) << 4) >> 4])
                .collect(),
        };
        for block in vals.chunks(32) {
            out.extend_from_slice(&d);
            match bits {
                Bits::Eight => out.extend(block.iter().map(|&v| v as u8)),
                Bits::Four => {
                    for t in 0..16 {
                        let lo = (block[t] + 8) as u8;
                        let hi = (block[t + 16] + 8) as u8;
                        out.push(lo | (hi << 4));
                    }
                }
            }
        }
    }
    let dtype = if bits == Bits::Eight {
        GgmlDType::Q8_0
    } else {
        GgmlDType::Q4_0
    };
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (n, k))?)
}

/// The inverse of [`official_to_ggml`]: (`q` U8, `scale` f32) from `q8_0` / `q4_0` blocks whose
/// rows each share one scale.
pub fn ggml_to_official(t: &QTensor, bits: Bits) -> Result<(Tensor, Tensor)> {
    let (n, k) = t.shape().dims2()?;
    let data = t.data()?;
    let block_bytes = if bits == Bits::Eight { 34 } else { 18 };
    let per_row = k / 32;
    let rb = bits.row_bytes(k);
    let mut q = vec![0u8; n * rb];
    let mut scales = vec![0f32; n];
    for r in 0..n {
        let mut vals = Vec::with_capacity(k);
        for b in 0..per_row {
            let blk = &data[(r * per_row + b) * block_bytes..(r * per_row + b + 1) * block_bytes];
            let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
            if b == 0 {
                scales[r] = d;
            } else if d.to_bits() != scales[r].to_bits() {
                return Err(Error::invalid(
                    "GGUF blocks of one row have different scales: not an official layout",
                ));
            }
            match bits {
                Bits::Eight => vals.extend(blk[2..].iter().map(|&v| v as i8)),
                Bits::Four => {
                    let qs = &blk[2..];
                    let mut block = [0i8; 32];
                    for t in 0..16 {
                        block[t] = (qs[t] & 0x0F) as i8 - 8;
                        block[t + 16] = (qs[t] >> 4) as i8 - 8;
                    }
                    vals.extend(block);
                }
            }
        }
        let out = &mut q[r * rb..(r + 1) * rb];
        match bits {
            Bits::Eight => out.iter_mut().zip(&vals).for_each(|(o, &v)| *o = v as u8),
            Bits::Four => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = ((vals[2 * j] as u8 & 0x0F) << 4) | (vals[2 * j + 1] as u8 & 0x0F);
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(q, (n, rb), &Device::Cpu)?,
        Tensor::from_vec(scales, n, &Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_quantization_round_trips_through_ggml_blocks() {
        let w = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
        for bits in [Bits::Eight, Bits::Four] {
            let (q, s) = quantize_official(&w, bits).unwrap();
            let g = official_to_ggml(&q, &s, bits).unwrap();
            let (q2, s2) = ggml_to_official(&g, bits).unwrap();
            assert_eq!(q.to_vec2::<u8>().unwrap(), q2.to_vec2::<u8>().unwrap());
            assert_eq!(s.to_vec1::<f32>().unwrap(), s2.to_vec1::<f32>().unwrap());
            // the GGML dequantization gives the same weights (before the float16 rounding)
            let deq = g.dequantize(&Device::Cpu).unwrap();
            let mine = crate::model::linear::dequantize(&q, &s, bits).unwrap();
            let err = crate::testing::max_abs_diff(&deq, &mine);
            let scale = s.max(0).unwrap().to_scalar::<f32>().unwrap();
            let qmax = if bits == Bits::Eight { 127.0 } else { 7.0 };
            // ours rounds each weight to float16 (half an ulp of the largest weight at most)
            assert!(err <= scale * qmax / 1024.0, "{bits:?}: {err}");
            // and quantization error is bounded by half a step
            let werr = crate::testing::max_abs_diff(&w, &mine);
            assert!(
                werr <= scale * 0.51 + 1e-3,
                "{bits:?}: {werr} vs step {scale}"
            );
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!(
            QuantType::parse("4").unwrap(),
            QuantType::Official(Bits::Four)
        );
        assert_eq!(
            QuantType::parse("Q4_K").unwrap(),
            QuantType::Ggml(GgmlDType::Q4K)
        );
        assert!(QuantType::parse("q3").is_err());
        assert_eq!(ggml_type_for(GgmlDType::Q4K, 13696), Some(GgmlDType::Q8_0));
        assert_eq!(ggml_type_for(GgmlDType::Q4_0, 4096), Some(GgmlDType::Q4_0));
    }
}
