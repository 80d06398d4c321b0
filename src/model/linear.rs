//! Linear layers: `y = x W^T (+ b)`, weights named as in the checkpoint.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use candle_core::{DType, Device, Module, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Load `{prefix}.weight` `[out, in]` and, with `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weight = ckpt.get(&format!("{prefix}.weight"), &[out_dim, in_dim], dtype, device)?;
        let bias = if bias {
            Some(ckpt.get(&format!("{prefix}.bias"), &[out_dim], dtype, device)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // [.., in] -> [rows, in] x [in, out] -> [.., out]
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = if x.device().is_cpu() && (rows <= crate::kernels::cpu_gemv::MAX_ROWS || self.weight.dtype() != DType::F32) {
            // decoding: each weight row streamed once; 16-bit prefill: blocks widened to f32
            // for an f32 GEMM (see kernels::cpu_gemv)
            x2.contiguous()?.apply_op2_no_bwd(&self.weight, &crate::kernels::cpu_gemv::Gemv)?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        y.reshape(out)
    }
}
