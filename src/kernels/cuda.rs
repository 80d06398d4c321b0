//! CUDA custom ops (feature `cuda`): the fused decode attention and SwiGLU of
//! `src/kernels/cuda/glm2.cu`, compiled to PTX by build.rs.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/glm2.ptx"));
const MODULE: &str = "glm2rs";
/// Threads per block of `decode_attention` (WARPS * 32 in the kernel).
const ATTENTION_THREADS: u32 = 16 * 32;
/// Largest head dimension the kernel handles (32 * MAX_E).
pub const MAX_HEAD_DIM: usize = 256;

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("glm2rs cuda kernels: unsupported dtype {d:?}"),
    })
}

/// Device address of the first element of `t` (its layout's start offset included).
fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("expected a CUDA tensor")
    };
    let stream = cs.device.cuda_stream();
    let base = match &cs.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        _ => bail!("expected a float CUDA tensor"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// One sequence of a batched decode step (mirrors `SeqInfo` in glm2.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SeqInfo {
    k: u64,
    v: u64,
    cap: i32,
    len: i32,
    rot: i32,
    row: i32,
}

/// A sequence's part of a decode step: its layer cache (`[1, groups, cap, head_dim]`,
/// contiguous, capacity for one more entry), entries held and rotary position.
pub struct DecodeSeq {
    pub k: Tensor,
    pub v: Tensor,
    pub len: usize,
    pub rot: usize,
}

/// Attention of one new token per sequence (rows of `qkv` `[n, (heads + 2 groups) head_dim]`,
/// bias not yet added), writing each new key and value into its cache. Output `[n, heads * head_dim]`.
pub struct DecodeAttention<'a> {
    pub seqs: &'a [DecodeSeq],
    pub bias: Option<&'a Tensor>,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub heads: usize,
    pub groups: usize,
    pub head_dim: usize,
}

impl CustomOp1 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "glm2rs-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("glm2rs-decode-attention runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        let (nh, ng, hd) = (self.heads, self.groups, self.head_dim);
        if width != (nh + 2 * ng) * hd || nh % ng != 0 || hd > MAX_HEAD_DIM {
            bail!("decode attention: qkv width {width} does not fit {nh} heads, {ng} groups, head_dim {hd}");
        }
        if self.seqs.len() != rows {
            bail!("decode attention: {} sequences for {rows} rows", self.seqs.len());
        }
        let Some((o1, o2)) = l.contiguous_offsets() else {
            bail!("decode attention: qkv must be contiguous")
        };
        let dtype = s.dtype();
        let mut infos = Vec::with_capacity(rows);
        for (row, q) in self.seqs.iter().enumerate() {
            let cap = q.k.dim(2)?;
            if q.k.dtype() != dtype || q.v.dtype() != dtype || q.len >= cap || !q.k.is_contiguous() {
                bail!("decode attention: cache of sequence {row} is not ready (dtype, room, layout)");
            }
            infos.push(SeqInfo {
                k: device_ptr(&q.k)?,
                v: device_ptr(&q.v)?,
                cap: cap as i32,
                len: q.len as i32,
                rot: q.rot as i32,
                row: row as i32,
            });
        }
        let bytes: Vec<u8> = infos
            .iter()
            .flat_map(|i| {
                let mut b = Vec::with_capacity(32);
                b.extend_from_slice(&i.k.to_le_bytes());
                b.extend_from_slice(&i.v.to_le_bytes());
                b.extend_from_slice(&i.cap.to_le_bytes());
                b.extend_from_slice(&i.len.to_le_bytes());
                b.extend_from_slice(&i.rot.to_le_bytes());
                b.extend_from_slice(&i.row.to_le_bytes());
                b
            })
            .collect();
        let dev = &s.device;
        let seqs_dev = dev.cuda_stream().clone_htod(&bytes).w()?;
        let bias = match self.bias {
            Some(b) => device_ptr(b)?,
            None => 0u64,
        };
        let (cos, sin) = (device_ptr(self.cos)?, device_ptr(self.sin)?);
        let rot_half = self.cos.dim(1)? as i32;
        let scale = 1f32 / (hd as f32).sqrt();
        let func = dev.get_or_load_custom_func(
            &format!("decode_attention_{}", suffix(dtype)?),
            MODULE,
            PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, nh as u32, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nh_i, ng_i, hd_i) = (nh as i32, ng as i32, hd as i32);
        macro_rules! launch {
            ($src:expr, $variant:ident, $t:ty) => {{
                let src = $src.slice(o1..o2);
                let out = unsafe { dev.alloc::<$t>(rows * nh * hd)? };
                let mut b = func.builder();
                b.arg(&src);
                b.arg(&bias);
                b.arg(&seqs_dev);
                b.arg(&cos);
                b.arg(&sin);
                b.arg(&out);
                b.arg(&nh_i);
                b.arg(&ng_i);
                b.arg(&hd_i);
                b.arg(&rot_half);
                b.arg(&scale);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::$variant(out)
            }};
        }
        let slice = match &s.slice {
            CudaStorageSlice::F32(x) => launch!(x, F32, f32),
            CudaStorageSlice::F16(x) => launch!(x, F16, half::f16),
            CudaStorageSlice::BF16(x) => launch!(x, BF16, half::bf16),
            _ => bail!("decode attention: unsupported dtype {dtype:?}"),
        };
        // the per-sequence table must outlive the launch: free it in stream order
        drop(seqs_dev);
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((rows, nh * hd)),
        ))
    }
}

/// `silu(x[.., :f]) * x[.., f:]` for contiguous `[.., 2f]` inputs.
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "glm2rs-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("glm2rs-swiglu runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = l.shape().dims().to_vec();
        let two_f = *dims.last().unwrap_or(&0);
        if two_f % 2 != 0 {
            bail!("swiglu: odd last dimension {two_f}");
        }
        let f = two_f / 2;
        let rows = l.shape().elem_count() / two_f.max(1);
        let Some((o1, o2)) = l.contiguous_offsets() else {
            bail!("swiglu: input must be contiguous")
        };
        let dev = &s.device;
        let func =
            dev.get_or_load_custom_func(&format!("swiglu_{}", suffix(s.dtype())?), MODULE, PTX)?;
        let n = rows * f;
        let threads = 256u32;
        let blocks = (n as u32).div_ceil(threads).clamp(1, 65535);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, f_i) = (rows as i32, f as i32);
        macro_rules! launch {
            ($src:expr, $variant:ident, $t:ty) => {{
                let src = $src.slice(o1..o2);
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut b = func.builder();
                b.arg(&src);
                b.arg(&out);
                b.arg(&rows_i);
                b.arg(&f_i);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::$variant(out)
            }};
        }
        let slice = match &s.slice {
            CudaStorageSlice::F32(x) => launch!(x, F32, f32),
            CudaStorageSlice::F16(x) => launch!(x, F16, half::f16),
            CudaStorageSlice::BF16(x) => launch!(x, BF16, half::bf16),
            _ => bail!("swiglu: unsupported dtype"),
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = f;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from(out_dims),
        ))
    }
}
