//! CUDA custom ops (feature `cuda`): the fused decode attention and SwiGLU of
//! `src/kernels/cuda/glm2.cu`, compiled to a fatbin by build.rs.

use super::split_plan::{split_lanes, split_pays, split_plan, SPLIT_MIN_CHUNK};
use crate::quantize::Bits;
use crate::tuning::{GemvQ, Tuning};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
};

/// glm2rs's kernels: machine code for each target build.rs compiled (and PTX of the newest
/// where the build asked for several), loaded without JIT compilation on those GPUs.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/glm2.fatbin"));
/// The oldest compute capability the fatbin has code for (major * 10 + minor).
pub const MIN_COMPUTE_CAPABILITY: u32 = parse_cc(env!("GLM2RS_MIN_CC"));

const fn parse_cc(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut v = 0;
    let mut i = 0;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// A kernel of the fatbin on one device's stream (what candle's `CudaFunc` is for its own).
struct Func {
    func: cudarc::driver::CudaFunction,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

impl std::ops::Deref for Func {
    type Target = cudarc::driver::CudaFunction;

    fn deref(&self) -> &Self::Target {
        &self.func
    }
}

impl Func {
    fn builder(&self) -> cudarc::driver::LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Kernel `name` on `dev`; the fatbin is loaded once per device context.
fn load(dev: &CudaDevice, name: &str) -> Result<Func> {
    type Modules = Vec<(
        std::sync::Arc<cudarc::driver::CudaContext>,
        std::sync::Arc<cudarc::driver::CudaModule>,
    )>;
    static MODULES: std::sync::Mutex<Modules> = std::sync::Mutex::new(Vec::new());
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let module = {
        let mut ms = MODULES.lock().unwrap_or_else(|e| e.into_inner());
        match ms.iter().find(|(c, _)| std::sync::Arc::ptr_eq(c, ctx)) {
            Some((_, m)) => m.clone(),
            None => {
                let m = ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
                    .w()?;
                ms.push((ctx.clone(), m.clone()));
                m
            }
        }
    };
    let func = module.load_function(name).w()?;
    Ok(Func { func, stream })
}
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

/// `name()` and a `cpu_fwd` that refuses, for the custom ops below (they run on CUDA only): the
/// op's name and how many inputs it takes.
macro_rules! cuda_only {
    ($name:literal, 1) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!(concat!($name, " runs on CUDA only"))
        }
    };
    ($name:literal, 2) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!(concat!($name, " runs on CUDA only"))
        }
    };
    ($name:literal, 3) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!(concat!($name, " runs on CUDA only"))
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The launch, written once: every op below passes its inputs as device addresses (`addr`),
// allocates its output with `alloc`, pushes its arguments in the kernel's order and launches.
// These two functions hold the only dispatch on the storage dtype.

/// Device address of element `offset` of a storage (float, u32 or u8).
fn addr(s: &CudaStorage, offset: usize) -> Result<u64> {
    let stream = s.device.cuda_stream();
    let base = match &s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::F16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::U32(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::U8(x) => x.device_ptr(&stream).0,
        _ => bail!("glm2rs cuda kernels: unsupported dtype {:?}", s.dtype()),
    };
    Ok(base + (offset * s.dtype().size_in_bytes()) as u64)
}

/// A new buffer of `n` elements of `dtype` (float or u32) and its device address.
fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<(CudaStorageSlice, u64)> {
    let stream = dev.cuda_stream();
    macro_rules! new {
        ($variant:ident, $t:ty) => {{
            let x = unsafe { dev.alloc::<$t>(n)? };
            let p = x.device_ptr(&stream).0;
            (CudaStorageSlice::$variant(x), p)
        }};
    }
    Ok(match dtype {
        DType::F32 => new!(F32, f32),
        DType::F16 => new!(F16, half::f16),
        DType::BF16 => new!(BF16, half::bf16),
        DType::U32 => new!(U32, u32),
        d => bail!("glm2rs cuda kernels: unsupported output dtype {d:?}"),
    })
}

/// The inputs of `op` share one dtype.
fn same_dtype(inputs: &[&CudaStorage], op: &str) -> Result<()> {
    if inputs.windows(2).any(|w| w[0].dtype() != w[1].dtype()) {
        bail!("{op}: inputs must share one dtype");
    }
    Ok(())
}

/// Device address of the first element of `t` (its layout's start offset included).
fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("expected a CUDA tensor")
    };
    addr(cs, layout.start_offset())
}

/// Device address of the first element of a CUDA tensor (what a kernel argument or a device
/// table entry pointing at it holds).
pub fn tensor_addr(t: &Tensor) -> Result<u64> {
    device_ptr(t)
}

/// One sequence of a batched decode step (mirrors `SeqInfo` in glm2.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SeqInfo {
    k: u64,
    v: u64,
    blocks: u64,
    len: i32,
    rot: i32,
    row: i32,
    shift: i32,
    slab_shift: i32,
    pad: i32,
}

// SAFETY: plain old data with the C layout of the kernels' `SeqInfo` parameter.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for SeqInfo {}

/// `u32` words of one [`SeqInfo`] in a device table.
pub const SEQ_INFO_WORDS: usize = std::mem::size_of::<SeqInfo>() / 4;

impl SeqInfo {
    fn of(q: &DecodeSeq, row: usize) -> Result<Self> {
        let log2 = |x: usize, what: &str| -> Result<i32> {
            if x.is_power_of_two() {
                Ok(x.trailing_zeros() as i32)
            } else {
                bail!("decode attention: {what} {x} is not a power of two")
            }
        };
        if q.block_size < 16 {
            bail!(
                "decode attention: blocks of {} positions (16 or more)",
                q.block_size
            );
        }
        Ok(Self {
            k: q.k_slabs,
            v: q.v_slabs,
            blocks: q.blocks,
            len: q.len as i32,
            rot: q.rot as i32,
            row: row as i32,
            shift: log2(q.block_size, "block size")?,
            slab_shift: log2(q.slab_blocks, "blocks per slab")?,
            pad: 0,
        })
    }

    fn words(&self) -> [u32; SEQ_INFO_WORDS] {
        let mut w = [0u32; SEQ_INFO_WORDS];
        for (i, x) in [self.k, self.v, self.blocks].into_iter().enumerate() {
            w[2 * i] = x as u32;
            w[2 * i + 1] = (x >> 32) as u32;
        }
        w[6] = self.len as u32;
        w[7] = self.rot as u32;
        w[8] = self.row as u32;
        w[9] = self.shift as u32;
        w[10] = self.slab_shift as u32;
        w
    }
}

/// Sequences passed in the launch parameters (mirrors `MAX_TABLE_SEQS` in glm2.cu): 2 KiB.
const TABLE_SEQS: usize = 64;

/// The per-sequence table as a kernel parameter (`SeqTable` in glm2.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct SeqTable([SeqInfo; TABLE_SEQS]);

// SAFETY: plain old data with the C layout of the kernel's parameter.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for SeqTable {}

/// A sequence's part of a decode step, in the paged KV cache (`crate::model::kv_pool`): the
/// device addresses of this layer's key and value slab tables and of the sequence's block table
/// (with a block for position `len`), entries held, rotary position.
#[derive(Clone, Debug)]
pub struct DecodeSeq {
    pub k_slabs: u64,
    pub v_slabs: u64,
    /// This layer's slab tensor maps for `flash_wgmma` ([`kv_tensor_map`]: per slab the key and
    /// the value map in boxes of a block, then in boxes of 128 positions, 128 bytes each) on the
    /// device; 0: none (the prompt then takes the mma.sync kernel).
    pub maps: u64,
    pub blocks: u64,
    pub block_size: usize,
    pub slab_blocks: usize,
    pub dtype: DType,
    pub len: usize,
    pub rot: usize,
    /// The longest this sequence is planned for (the split kernels' shape is chosen from it;
    /// a captured graph keeps its shape until the sequence outgrows it): at least `len + 1`.
    pub reach: usize,
}

/// Attention of one new token per sequence (rows of `qkv` `[n, (heads + 2 groups) head_dim]`,
/// bias not yet added), writing each new key and value into its cache. Output `[n, heads * head_dim]`.
pub struct DecodeAttention<'a> {
    pub seqs: &'a [DecodeSeq],
    /// The sequences' table already on the device (`u32`, [`SEQ_INFO_WORDS`] per sequence: rows
    /// of [`seq_info_words`] written by [`write_u32`]), read at run time, so a captured graph's
    /// launches see the lengths of each replay. `None`: built from `seqs`.
    pub table: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub heads: usize,
    pub groups: usize,
    pub head_dim: usize,
    /// [`Tuning::split_decode`]: the flash-decoding kernels where the shapes allow them.
    pub split: bool,
}

/// Rows of threads of `decode_reduce`, each taking every 4th split (FD_RLANES in flash_decode.cuh).
const REDUCE_LANES: u32 = 4;
/// Threads per block of `decode_split` (FD_WARPS * 32 in flash_decode.cuh).
const SPLIT_THREADS: u32 = 4 * 32;
/// The sequence table argument of the decode kernels: in the launch parameters, a table copied
/// for this launch, or one the caller keeps on the device.
fn push_table<'a>(
    b: &mut cudarc::driver::LaunchArgs<'a>,
    table: &'a Option<SeqTable>,
    seqs_dev: &'a Option<cudarc::driver::CudaSlice<u32>>,
    given: &'a Option<u64>,
) {
    match (table, seqs_dev, given) {
        (Some(t), _, _) => b.arg(t),
        (None, Some(d), _) => b.arg(d),
        (None, None, Some(p)) => b.arg(p),
        (None, None, None) => unreachable!("one of the tables is set"),
    };
}

impl CustomOp1 for DecodeAttention<'_> {
    cuda_only!("glm2rs-decode-attention", 1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        let (nh, ng, hd) = (self.heads, self.groups, self.head_dim);
        if width != (nh + 2 * ng) * hd || nh % ng != 0 || hd > MAX_HEAD_DIM {
            bail!("decode attention: qkv width {width} does not fit {nh} heads, {ng} groups, head_dim {hd}");
        }
        if self.seqs.len() != rows {
            bail!(
                "decode attention: {} sequences for {rows} rows",
                self.seqs.len()
            );
        }
        let Some((o1, _)) = l.contiguous_offsets() else {
            bail!("decode attention: qkv must be contiguous")
        };
        let dtype = s.dtype();
        let mut infos = Vec::with_capacity(rows);
        for (row, q) in self.seqs.iter().enumerate() {
            if q.dtype != dtype {
                bail!("decode attention: the KV cache of sequence {row} is not {dtype:?}");
            }
            infos.push(SeqInfo::of(q, row)?);
        }
        let dev = &s.device;
        let given = match self.table {
            Some(t) if t.dtype() == DType::U32 && t.elem_count() >= rows * SEQ_INFO_WORDS => {
                Some(device_ptr(t)?)
            }
            Some(_) => bail!("decode attention: the device table must hold {rows} u32 rows"),
            None => None,
        };
        // A few sequences go in the launch parameters; more in a table copied to the device.
        let (table, seqs_dev) = if given.is_some() {
            (None, None)
        } else if rows <= TABLE_SEQS {
            let mut t = SeqTable([SeqInfo::default(); TABLE_SEQS]);
            t.0[..rows].copy_from_slice(&infos);
            (Some(t), None)
        } else {
            let words: Vec<u32> = infos.iter().flat_map(SeqInfo::words).collect();
            (None, Some(dev.cuda_stream().clone_htod(&words).w()?))
        };
        let bias = match self.bias {
            Some(b) => device_ptr(b)?,
            None => 0u64,
        };
        let (cos, sin) = (device_ptr(self.cos)?, device_ptr(self.sin)?);
        let rot_half = self.cos.dim(1)? as i32;
        let scale = 1f32 / (hd as f32).sqrt();
        let name = suffix(dtype)?;
        let t = if table.is_some() { "_t" } else { "" };
        // the split (flash-decoding) kernels where they apply and pay, else one block per head
        let plan = self.split_shape(dev, rows)?;
        let splits = plan.map(|(_, n)| n);
        let (kernel, grid, threads) = match plan {
            Some((lanes, n)) => {
                // 16-bit caches on tensor cores (mma.m16n8k16: the group's heads are its 16
                // rows), float32 on CUDA cores
                let kernel = if dtype != DType::F32 && hd % 16 == 0 {
                    format!("decode_split_mma{t}_{name}")
                } else {
                    format!("decode_split{lanes}{t}_{name}")
                };
                (kernel, (rows as u32, ng as u32, n as u32), SPLIT_THREADS)
            }
            None => (
                format!("decode_attention{t}_{name}"),
                (rows as u32, nh as u32, 1),
                ATTENTION_THREADS,
            ),
        };
        let func = load(dev, &kernel)?;
        let (nh_i, ng_i, hd_i) = (nh as i32, ng as i32, hd as i32);
        let src = addr(s, o1)?;
        let (slice, out) = alloc(dev, dtype, rows * nh * hd)?;
        // the splits' partial results: (max, sum, accumulator) per head
        let part = match splits {
            Some(n) if n > 1 => Some(alloc(dev, DType::F32, rows * nh * n * (hd + 2))?),
            _ => None,
        };
        let part_ptr = part.as_ref().map_or(0u64, |p| p.1);
        let (chunk_i, splits_i) = (SPLIT_MIN_CHUNK as i32, splits.unwrap_or(1) as i32);
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&bias);
        push_table(&mut b, &table, &seqs_dev, &given);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&out);
        if splits.is_some() {
            b.arg(&part_ptr);
        }
        b.arg(&nh_i);
        b.arg(&ng_i);
        b.arg(&hd_i);
        b.arg(&rot_half);
        b.arg(&scale);
        if splits.is_some() {
            b.arg(&chunk_i);
            b.arg(&splits_i);
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        if part.is_some() {
            let reduce = load(dev, &format!("decode_reduce{t}_{name}"))?;
            let mut b = reduce.builder();
            push_table(&mut b, &table, &seqs_dev, &given);
            b.arg(&part_ptr);
            b.arg(&out);
            b.arg(&nh_i);
            b.arg(&hd_i);
            b.arg(&chunk_i);
            b.arg(&splits_i);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, nh as u32, 1),
                block_dim: (hd.clamp(32, 128) as u32, REDUCE_LANES, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
        }
        // the partial results and the per-sequence table must outlive the launches: freed in
        // stream order
        drop(part);
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

impl DecodeAttention<'_> {
    /// Dimensions per lane and blocks per (sequence, KV group) of the split kernels for this
    /// step, or `None` for the one-block kernel: switched off, shapes it does not take ([`split_lanes`]), a step where
    /// it does not pay ([`split_pays`]), or caches not aligned for its vector loads.
    fn split_shape(&self, dev: &CudaDevice, rows: usize) -> Result<Option<(usize, usize)>> {
        if !self.split {
            return Ok(None);
        }
        let Some(lanes) = split_lanes(self.heads, self.groups, self.head_dim) else {
            return Ok(None);
        };
        let reach = self
            .seqs
            .iter()
            .map(|q| q.reach.max(q.len + 1))
            .max()
            .unwrap_or(1);
        if !split_pays(rows, reach) {
            return Ok(None);
        }
        let sms = dev
            .cuda_stream()
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .w()? as usize;
        Ok(Some((lanes, split_plan(rows, self.groups, reach, sms))))
    }
}

/// Elements of `dtype` per 16-byte access for rows of `n` elements at the device addresses
/// `ptrs` (0: absent): 16 / size when `n` is a multiple of it and every pointer 16-byte aligned,
/// else 1 (the kernels' element-wise path).
fn vector_width(dtype: DType, n: usize, ptrs: &[u64]) -> usize {
    let per = 16 / dtype.size_in_bytes();
    if n % per == 0 && ptrs.iter().all(|p| p % 16 == 0) {
        per
    } else {
        1
    }
}

/// `silu(x[.., :f]) * x[.., f:]` for contiguous `[.., 2f]` inputs.
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    cuda_only!("glm2rs-swiglu", 1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = l.shape().dims().to_vec();
        let two_f = *dims.last().unwrap_or(&0);
        if two_f % 2 != 0 {
            bail!("swiglu: odd last dimension {two_f}");
        }
        let f = two_f / 2;
        let rows = l.shape().elem_count() / two_f.max(1);
        let Some((o1, _)) = l.contiguous_offsets() else {
            bail!("swiglu: input must be contiguous")
        };
        let dev = &s.device;
        let func = load(dev, &format!("swiglu_{}", suffix(s.dtype())?))?;
        let n = rows * f;
        let src = addr(s, o1)?;
        let (slice, out) = alloc(dev, s.dtype(), n)?;
        // 16-byte accesses where the rows allow them
        let vec = vector_width(s.dtype(), f, &[src, out]);
        let threads = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (
                ((f / vec) as u32).div_ceil(threads).max(1),
                (rows as u32).clamp(1, 65535),
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, f_i, vec_i) = (rows as i32, f as i32, vec as i32);
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&out);
        b.arg(&rows_i);
        b.arg(&f_i);
        b.arg(&vec_i);
        unsafe { b.launch(cfg) }.w()?;
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

/// Contiguous offsets of a layout, or an error naming the op.
fn contiguous(l: &Layout, op: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// `h = a + b` and `y = rmsnorm(h) * w` in one pass (`b = None`: plain RMSNorm of `a`).
/// Returns `(h, y)`, both shaped like `a`.
pub fn add_rmsnorm(
    a: &Tensor,
    b: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let a = a.contiguous()?;
    let both = match b {
        Some(b) => a.apply_op3_no_bwd(&b.contiguous()?, w, &AddRmsNorm { eps, has_b: true })?,
        None => a.apply_op3_no_bwd(&a, w, &AddRmsNorm { eps, has_b: false })?,
    };
    Ok((both.get(0)?, both.get(1)?))
}

/// Output `[2, ..a's shape]`: the sum, then the normalized sum.
struct AddRmsNorm {
    eps: f32,
    has_b: bool,
}

impl candle_core::CustomOp3 for AddRmsNorm {
    cuda_only!("glm2rs-add-rmsnorm", 3);

    fn cuda_fwd(
        &self,
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = la.shape().dims().to_vec();
        let n = *dims.last().unwrap_or(&0);
        let rows = la.shape().elem_count() / n.max(1);
        if lb.shape() != la.shape() || lw.shape().elem_count() != n {
            bail!(
                "add_rmsnorm: shapes {:?} {:?} {:?}",
                la.shape(),
                lb.shape(),
                lw.shape()
            );
        }
        let (a0, _) = contiguous(la, "add_rmsnorm")?;
        let (b0, _) = contiguous(lb, "add_rmsnorm")?;
        let (w0, _) = contiguous(lw, "add_rmsnorm")?;
        let dev = &sa.device;
        let func = load(dev, &format!("add_rmsnorm_{}", suffix(sa.dtype())?))?;
        let has_b = self.has_b;
        same_dtype(&[sa, sb, sw], "add_rmsnorm")?;
        let a = addr(sa, a0)?;
        let b = if has_b { addr(sb, b0)? } else { 0u64 };
        let w = addr(sw, w0)?;
        let (slice, out) = alloc(dev, sa.dtype(), 2 * rows * n)?;
        // 16-byte accesses where the rows allow them (h and y rows start at multiples of n)
        let vec = vector_width(sa.dtype(), n, &[a, b, w, out]);
        // one access a thread (kept in registers), at most 1024 threads
        let threads = ((n / vec).div_ceil(32) * 32).clamp(32, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, n_i, eps, vec_i) = (rows as i32, n as i32, self.eps, vec as i32);
        let mut bld = func.builder();
        bld.arg(&a);
        bld.arg(&b);
        bld.arg(&w);
        bld.arg(&out);
        bld.arg(&rows_i);
        bld.arg(&n_i);
        bld.arg(&eps);
        bld.arg(&vec_i);
        unsafe { bld.launch(cfg) }.w()?;
        let mut out = vec![2];
        out.extend(dims);
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from(out),
        ))
    }
}

/// Index of the largest value of each row of float32 `[rows, n]` logits: u32 `[rows]`.
pub struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    cuda_only!("glm2rs-argmax", 1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, n) = l.shape().dims2()?;
        let (o1, _) = contiguous(l, "argmax")?;
        if s.dtype() != DType::F32 {
            bail!("argmax: float32 logits expected")
        }
        let dev = &s.device;
        let func = load(dev, "argmax_f32")?;
        let x = addr(s, o1)?;
        let (slice, out) = alloc(dev, DType::U32, rows)?;
        let n_i = n as i32;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&out);
        b.arg(&n_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from(rows),
        ))
    }
}

/// Causal softmax of float32 attention scores `[rows, cols]` of a query block: row `r` is the
/// query at position `first_q + r % tc`; later keys are masked. Scores are multiplied by
/// `scale` first; probabilities come out as `dtype`.
pub struct CausalSoftmax {
    pub tc: usize,
    pub first_q: usize,
    pub scale: f32,
    pub dtype: DType,
}

impl CustomOp1 for CausalSoftmax {
    cuda_only!("glm2rs-causal-softmax", 1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = l.shape().dims().to_vec();
        let cols = *dims.last().unwrap_or(&0);
        let rows = l.shape().elem_count() / cols.max(1);
        let (o1, _) = contiguous(l, "causal softmax")?;
        if s.dtype() != DType::F32 {
            bail!("causal softmax: float32 scores expected")
        }
        if self.first_q + self.tc > cols {
            bail!("causal softmax: queries beyond the keys");
        }
        let dev = &s.device;
        let func = load(dev, &format!("causal_softmax_{}", suffix(self.dtype)?))?;
        let x = addr(s, o1)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (cols_i, tc_i, fq_i, scale) =
            (cols as i32, self.tc as i32, self.first_q as i32, self.scale);
        let (slice, out) = alloc(dev, self.dtype, rows * cols)?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&out);
        b.arg(&cols_i);
        b.arg(&tc_i);
        b.arg(&fq_i);
        b.arg(&scale);
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from(dims),
        ))
    }
}

/// Causal attention of a prompt block in one kernel (`flash_prefill` in glm2.cu, tensor cores):
/// `q` `[b, heads, t, d]` (positions `past..past + t`) over `k`, `v` `[b, groups, past + t, d]`
/// (rows of `d` contiguous: KV-cache views), 16-bit, `d` 64 or 128. Returns `[b, heads, t, d]`,
/// or `None` when the kernel does not apply (dtype, head size, layout).
pub fn flash_prefill(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, ng, l, kd) = k.dims4()?;
    let dtype = q.dtype();
    let rows_ok = |x: &Tensor| {
        let st = x.stride();
        st[3] == 1
            && st[2] == d
            && x.layout().start_offset() % 8 == 0
            && st[1] % 8 == 0
            && st[0] % 8 == 0
    };
    if !matches!(dtype, DType::BF16 | DType::F16)
        || !matches!(d, 64 | 128)
        || kd != d
        || kb != b
        || v.dims4()? != (b, ng, l, d)
        || k.dtype() != dtype
        || v.dtype() != dtype
        || ng == 0
        || nh % ng != 0
        || l < t
        || t == 0
        || !rows_ok(k)
        || !rows_ok(v)
    {
        return Ok(None);
    }
    let q = q.contiguous()?;
    Ok(Some(q.apply_op3_no_bwd(
        k,
        v,
        &FlashPrefill { groups: ng, scale },
    )?))
}

struct FlashPrefill {
    groups: usize,
    scale: f32,
}

/// Dynamic shared memory of a flash prefill block for head_dim `d` (`flash_smem_bytes` in
/// glm2.cu: two stages of a 64-row key and value tile, rows padded by 8), allowed past the
/// default 48 KiB for `func`.
fn flash_smem(func: &cudarc::driver::CudaFunction, d: usize) -> Result<u32> {
    let bytes = (2 * 2 * 64 * (d + 8) * 2) as u32;
    func.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()?;
    Ok(bytes)
}

/// The projections `qkv` (`[t, (heads + 2 groups) head_dim]`, rows contiguous, bias not yet
/// added) of one sequence's `t` new tokens made ready for [`flash_prefill_paged`] in one launch
/// (`prefill_qkv` in glm2.cu): bias and rotary (`cos` / `sin` `[positions, rot_half]`, from
/// position `seq.rot`) applied, keys and values written into the sequence's blocks at `seq.len..`
/// (reserved), the queries returned `[1, heads, t, head_dim]`. 16-bit only.
#[allow(clippy::too_many_arguments)]
pub fn prefill_qkv(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    seq: &DecodeSeq,
    heads: usize,
    groups: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (t, width) = qkv.dims2()?;
    let dtype = qkv.dtype();
    let rot_half = cos.dim(1)?;
    if width != (heads + 2 * groups) * head_dim
        || !matches!(dtype, DType::BF16 | DType::F16)
        || dtype != seq.dtype
        || cos.dtype() != dtype
        || sin.dtype() != dtype
        || bias.is_some_and(|b| b.dtype() != dtype || b.elem_count() != width)
        || head_dim % 2 != 0
        || 2 * rot_half > head_dim
    {
        bail!("prefill qkv: {t}x{width} {dtype:?} does not fit {heads} heads, {groups} groups, head_dim {head_dim}");
    }
    if seq.rot + t > cos.dim(0)? {
        bail!(
            "prefill qkv: positions up to {} past the rotary table ({})",
            seq.rot + t,
            cos.dim(0)?
        );
    }
    let candle_core::Device::Cuda(dev) = qkv.device() else {
        bail!("prefill qkv: not a CUDA tensor")
    };
    let qkv = qkv.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let q = Tensor::zeros((1, heads, t, head_dim), dtype, qkv.device())?;
    if t == 0 {
        return Ok(q);
    }
    let info = SeqInfo::of(seq, 0)?;
    let func = load(dev, &format!("prefill_qkv_{}", suffix(dtype)?))?;
    let (qkv_p, cos_p, sin_p, q_p) = (
        device_ptr(&qkv)?,
        device_ptr(&cos)?,
        device_ptr(&sin)?,
        device_ptr(&q)?,
    );
    let bias_p = match &bias {
        Some(b) => device_ptr(b)?,
        None => 0u64,
    };
    let (t_i, nh_i, ng_i, hd_i, rh_i) = (
        t as i32,
        heads as i32,
        groups as i32,
        head_dim as i32,
        rot_half as i32,
    );
    let mut bl = func.builder();
    bl.arg(&qkv_p);
    bl.arg(&bias_p);
    bl.arg(&cos_p);
    bl.arg(&sin_p);
    bl.arg(&q_p);
    bl.arg(&info);
    bl.arg(&t_i);
    bl.arg(&nh_i);
    bl.arg(&ng_i);
    bl.arg(&hd_i);
    bl.arg(&rh_i);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { bl.launch(cfg) }.w()?;
    Ok(q)
}

/// Causal attention of one sequence's `t` new queries (`q` `[1, heads, t, head_dim]`, bf16 /
/// f16, head_dim 64 or 128) over its paged cache of `seq.len + t` positions (the new keys and
/// values already written, [`prefill_qkv`]): the flash kernel reading keys
/// and values through the block table. Returns `[1, t, heads * head_dim]` (token-major: the
/// rows the dense projection takes). `None` when the shapes do not suit it. `wgmma`: on a
/// compute capability 9.0 GPU with head_dim 128, the kernel on Hopper's warpgroup matrix
/// instructions (`flash_wgmma`, where this build has it) instead of the mma.sync one.
pub fn flash_prefill_paged(
    q: &Tensor,
    seq: &DecodeSeq,
    groups: usize,
    scale: f32,
    wgmma: bool,
) -> Result<Option<Tensor>> {
    let (b, nh, t, d) = q.dims4()?;
    let dtype = q.dtype();
    if b != 1
        || t == 0
        || !matches!(dtype, DType::BF16 | DType::F16)
        || dtype != seq.dtype
        || !matches!(d, 64 | 128)
        || groups == 0
        || nh % groups != 0
    {
        return Ok(None);
    }
    let q = q.contiguous()?;
    Ok(Some(q.apply_op1_no_bwd(&FlashPrefillPaged {
        info: SeqInfo::of(seq, 0)?,
        maps: seq.maps,
        groups,
        scale,
        wgmma: wgmma && d == 128 && seq.maps != 0 && cfg!(glm2rs_wgmma),
    })?))
}

struct FlashPrefillPaged {
    info: SeqInfo,
    /// The slabs' tensor maps (`DecodeSeq::maps`), for `flash_wgmma`.
    maps: u64,
    groups: usize,
    scale: f32,
    wgmma: bool,
}

/// The compute capability of `dev` (major, minor).
pub fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = dev.cuda_stream().context().clone();
    let major = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    Ok((major, minor))
}

/// Whether `dev` is a compute capability 9.0 GPU (Hopper: H100, H200), for the sm_90a kernels.
fn is_sm90(dev: &CudaDevice) -> Result<bool> {
    Ok(compute_capability(dev)? == (9, 0))
}

/// Whether `flash_wgmma` can run on `d` (a Hopper GPU and this build has the kernel): the KV
/// pool then keeps tensor maps of its slabs ([`kv_tensor_map`]).
pub fn wgmma_device(d: &candle_core::Device) -> bool {
    match d {
        candle_core::Device::Cuda(cd) => cfg!(glm2rs_wgmma) && is_sm90(cd).unwrap_or(false),
        _ => false,
    }
}

/// Words of one tensor map ([`kv_tensor_map`]).
pub const TENSOR_MAP_WORDS: usize = 32;

/// The 2D tensor map (a TMA descriptor) through which `flash_wgmma` copies key or value tiles
/// of one slab `t` (`[rows, groups, head_dim]`, 16-bit, head_dim 128): rows of `groups * head_dim`
/// elements, boxes of 64 elements (one 64-dimension half of a position's key, 128 bytes) by
/// `box_rows` positions (a block of the pool, at most 128), swizzled in 128 bytes as the kernel's
/// tiles. As the words the kernel reads from a device table.
pub fn kv_tensor_map(t: &Tensor, box_rows: usize) -> Result<[u32; TENSOR_MAP_WORDS]> {
    use cudarc::driver::sys;
    let (rows, groups, hd) = t.dims3()?;
    if t.dtype().size_in_bytes() != 2 || hd != 128 || !(8..=128).contains(&box_rows) {
        bail!(
            "kv tensor map: a 16-bit slab of head_dim 128 in boxes of 8 to 128 rows, not {:?} head_dim {hd} boxes {box_rows}",
            t.dtype()
        );
    }
    {
        let (storage, _) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            bail!("kv tensor map: expected a CUDA tensor")
        };
        cs.device.cuda_stream().context().bind_to_thread().w()?;
    }
    let dims = [(groups * hd) as u64, rows as u64];
    let strides = [(groups * hd * 2) as u64];
    let boxes = [64u32, box_rows as u32];
    let steps = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays outlive the call, which only writes `map`; the address is the slab's
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            2,
            tensor_addr(t)? as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("kv tensor map: cuTensorMapEncodeTiled failed ({r:?})");
    }
    // SAFETY: written by the successful call above (zeroed before)
    let map = unsafe { map.assume_init() };
    let mut w = [0u32; TENSOR_MAP_WORDS];
    for (i, x) in map.opaque.iter().enumerate() {
        w[2 * i] = *x as u32;
        w[2 * i + 1] = (*x >> 32) as u32;
    }
    Ok(w)
}

/// Key and value tiles in flight in `flash_wgmma` (FW_STAGES in flash_wgmma.cuh).
const WGMMA_STAGES: u32 = 3;

/// Dynamic shared memory of a `flash_wgmma` block (FW_SMEM in flash_wgmma.cuh: the query tile,
/// WGMMA_STAGES key and value tiles of 128 x 128, 1024 bytes for alignment), allowed for `func`.
fn wgmma_smem(func: &cudarc::driver::CudaFunction) -> Result<u32> {
    let bytes = (1 + 2 * WGMMA_STAGES) * 128 * 128 * 2 + 1024;
    func.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()?;
    Ok(bytes)
}

impl CustomOp1 for FlashPrefillPaged {
    cuda_only!("glm2rs-flash-prefill-paged", 1);

    fn cuda_fwd(&self, sq: &CudaStorage, lq: &Layout) -> Result<(CudaStorage, Shape)> {
        let (_, nh, t, d) = lq.shape().dims4()?;
        let (q0, _) = contiguous(lq, "flash prefill")?;
        let dev = &sq.device;
        let wgmma = self.wgmma && d == 128 && is_sm90(dev)?;
        let name = if wgmma {
            format!("flash_wgmma_{}_d128", suffix(sq.dtype())?)
        } else {
            format!("flash_prefill_paged_{}_d{d}", suffix(sq.dtype())?)
        };
        let func = load(dev, &name)?;
        let qp = addr(sq, q0)?;
        let (slice, out) = alloc(dev, sq.dtype(), nh * t * d)?;
        let (t_i, nh_i, ng_i) = (t as i32, nh as i32, self.groups as i32);
        let mut bl = func.builder();
        bl.arg(&qp);
        bl.arg(&out);
        bl.arg(&self.info);
        if wgmma {
            bl.arg(&self.maps);
        }
        bl.arg(&t_i);
        bl.arg(&nh_i);
        bl.arg(&ng_i);
        bl.arg(&self.scale);
        let cfg = if wgmma {
            // 128 query rows per block: a producer warpgroup and two consumers
            LaunchConfig {
                grid_dim: ((t as u32).div_ceil(128), nh as u32, 1),
                block_dim: (384, 1, 1),
                shared_mem_bytes: wgmma_smem(&func)?,
            }
        } else {
            LaunchConfig {
                grid_dim: ((t as u32).div_ceil(64), nh as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: flash_smem(&func, d)?,
            }
        };
        unsafe { bl.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((1, t, nh * d)),
        ))
    }
}

impl candle_core::CustomOp3 for FlashPrefill {
    cuda_only!("glm2rs-flash-prefill", 3);

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, nh, t, d) = lq.shape().dims4()?;
        let (_, _, l, _) = lk.shape().dims4()?;
        let (q0, _) = contiguous(lq, "flash prefill")?;
        let (k0, v0) = (lk.start_offset(), lv.start_offset());
        let (ks, vs) = (lk.stride(), lv.stride());
        let dev = &sq.device;
        let func = load(dev, &format!("flash_prefill_{}_d{d}", suffix(sq.dtype())?))?;
        let cfg = LaunchConfig {
            grid_dim: ((t as u32).div_ceil(64), nh as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_smem(&func, d)?,
        };
        let (t_i, l_i, past_i, nh_i, ng_i) = (
            t as i32,
            l as i32,
            (l - t) as i32,
            nh as i32,
            self.groups as i32,
        );
        let (k_bs, k_gs, v_bs, v_gs) = (ks[0] as i64, ks[1] as i64, vs[0] as i64, vs[1] as i64);
        same_dtype(&[sq, sk, sv], "flash prefill")?;
        if !matches!(sq.dtype(), DType::F16 | DType::BF16) {
            bail!("flash prefill: q, k and v must share one 16-bit dtype");
        }
        let (q, k, v) = (addr(sq, q0)?, addr(sk, k0)?, addr(sv, v0)?);
        let (slice, out) = alloc(dev, sq.dtype(), b * nh * t * d)?;
        let mut bl = func.builder();
        bl.arg(&q);
        bl.arg(&k);
        bl.arg(&v);
        bl.arg(&out);
        bl.arg(&t_i);
        bl.arg(&l_i);
        bl.arg(&past_i);
        bl.arg(&nh_i);
        bl.arg(&ng_i);
        bl.arg(&k_bs);
        bl.arg(&k_gs);
        bl.arg(&v_bs);
        bl.arg(&v_gs);
        bl.arg(&self.scale);
        unsafe { bl.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((b, nh, t, d)),
        ))
    }
}

/// `x Wᵀ` for at most 8 rows of `x` (`[m, k]`) and a weight `[n, k]` of the same dtype, by the
/// streaming kernel. `None` when the shapes or alignment do not suit it (use a matmul).
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    gemv_op(x, w, 8, Gemv { swiglu: false })
}

/// `swiglu(x Wᵀ)` for one row of `x` (`[1, k]`) and a dense `W` `[2f, k]` whose first `f` rows
/// are the gate (dense_h_to_4h): `[1, f]` in one launch, exactly what `gemv` then `SwiGlu` give.
/// `None` when the shapes or alignment do not suit it.
pub fn gemv_swiglu(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if w.dim(0)? % 2 != 0 {
        return Ok(None);
    }
    gemv_op(x, w, 1, Gemv { swiglu: true })
}

/// `op` on x (at most `max_rows` rows) and w when they suit the streaming kernel: one float dtype,
/// the same width in whole 16-byte vectors, 16-byte aligned.
fn gemv_op(x: &Tensor, w: &Tensor, max_rows: usize, op: Gemv) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (_n, k2) = w.dims2()?;
    let vec = 16 / x.dtype().size_in_bytes();
    if m == 0
        || m > max_rows
        || k != k2
        || k % vec != 0
        || x.dtype() != w.dtype()
        || !w.is_contiguous()
        || !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if device_ptr(&x)? % 16 != 0 || device_ptr(w)? % 16 != 0 {
        return Ok(None);
    }
    Ok(Some(x.apply_op2_no_bwd(w, &op)?))
}

struct Gemv {
    swiglu: bool,
}

impl candle_core::CustomOp2 for Gemv {
    cuda_only!("glm2rs-cuda-gemv", 2);

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, _) = lw.shape().dims2()?;
        let (x0, _) = contiguous(lx, "gemv")?;
        let (w0, _) = contiguous(lw, "gemv")?;
        let dev = &sx.device;
        // with swiglu: one warp per gate/up row pair, n/2 outputs
        let (name, n_out) = if self.swiglu {
            (format!("gemv_swiglu_{}", suffix(sx.dtype())?), n / 2)
        } else {
            (format!("gemv{m}_{}", suffix(sx.dtype())?), n)
        };
        let func = load(dev, &name)?;
        let warps = 8u32;
        let cfg = LaunchConfig {
            grid_dim: ((n_out as u32).div_ceil(warps), 1, 1),
            block_dim: (warps * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_i, k_i) = (n_out as i32, k as i32);
        same_dtype(&[sx, sw], "gemv")?;
        let (x, w) = (addr(sx, x0)?, addr(sw, w0)?);
        let (slice, y) = alloc(dev, sx.dtype(), m * n_out)?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&w);
        b.arg(&y);
        b.arg(&n_i);
        b.arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((m, n_out)),
        ))
    }
}

/// Official int8/int4 weights (`q` u8 `[n, k]` or `[n, k/2]`, `scale` f32 `[n]`, on the GPU)
/// times `x` `[m, k]` for at most 8 rows: `[m, n]` in x's dtype (`bits` 8 or 4).
/// `tuning` picks the kernel (`gemvq`, `gemvq_rows`).
pub fn gemv_official(
    x: &Tensor,
    q: &Tensor,
    scale: &Tensor,
    bits: Bits,
    tuning: &Tuning,
) -> Result<Tensor> {
    aligned(x)?.apply_op3_no_bwd(
        q,
        scale,
        &GemvOfficial {
            bits,
            swiglu: false,
            forced: tuning.gemvq,
            rows: tuning.gemvq_rows,
        },
    )
}

/// `x` contiguous and 16-byte aligned (the kernels read it in 16-byte vectors).
fn aligned(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(if device_ptr(&x)? % 16 != 0 {
        x.copy()?
    } else {
        x
    })
}

/// `swiglu(x Wᵀ)` for one row of 16-bit `x` and official int8/int4 dense_h_to_4h weights (gate
/// rows first): `[1, n/2]` in one launch of the float kernel, exactly what `gemv_official` then
/// `SwiGlu` give. `None` when it does not apply (float32, several rows, the integer kernel: see
/// `gemvq_kernel`).
pub fn gemv_official_swiglu(
    x: &Tensor,
    q: &Tensor,
    scale: &Tensor,
    bits: Bits,
    tuning: &Tuning,
) -> Result<Option<Tensor>> {
    let (m, _) = x.dims2()?;
    if m != 1
        || x.dtype() == DType::F32
        || q.dim(0)? % 2 != 0
        || gemvq_kernel(1, x.dtype(), tuning.gemvq) != GemvqKernel::Float
    {
        return Ok(None);
    }
    Ok(Some(aligned(x)?.apply_op3_no_bwd(
        q,
        scale,
        &GemvOfficial {
            bits,
            swiglu: true,
            forced: tuning.gemvq,
            rows: tuning.gemvq_rows,
        },
    )?))
}

/// Official int8/int4 weights dequantized to `dtype` `[n, k]` (each value rounded to float16
/// first, as the official code).
pub fn dequantize_official(q: &Tensor, scale: &Tensor, bits: Bits, dtype: DType) -> Result<Tensor> {
    q.apply_op2_no_bwd(scale, &DequantOfficial { bits, dtype })
}

struct GemvOfficial {
    bits: Bits,
    /// one row, gate/up row pairs through SwiGLU (`gemv_official_swiglu`)
    swiglu: bool,
    /// `Tuning::gemvq`
    forced: GemvQ,
    /// `Tuning::gemvq_rows`
    rows: u32,
}

/// The 16-bit int8/int4 GEMV kernels: `Float` converts the weights to float (accumulation and x
/// exactly as in a float matmul); `Integer` quantizes x to int8 per 8 columns and multiplies bytes
/// with dp4a (about a third of the arithmetic per weight, at the cost of x's rounding). The float
/// kernel is bound by that arithmetic (73% SM throughput, 27% DRAM under ncu on an H200).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GemvqKernel {
    Float,
    Integer,
}

/// `Tuning::gemvq` (`GLM2RS_GEMVQ=float|dp4a`) forces a kernel. By default every row count of bfloat16
/// models runs `Integer` (x's 8-bit rounding is of the order of bfloat16's own: max logit error
/// 0.20 against 0.18 for the dequantize + matmul of prefill, and int4 decoding at 425 instead of
/// 390 tokens/s on an H200), and float16 models keep `Float` for one row (single-sequence
/// decoding), where it is 14x closer to the float32 model than the integer kernel.
fn gemvq_kernel(m: usize, dtype: DType, forced: GemvQ) -> GemvqKernel {
    match forced {
        GemvQ::Float => GemvqKernel::Float,
        GemvQ::Dp4a => GemvqKernel::Integer,
        GemvQ::Auto if m == 1 && dtype == DType::F16 => GemvqKernel::Float,
        GemvQ::Auto => GemvqKernel::Integer,
    }
}

/// Weight rows per warp of the integer GEMV (1, 2 or 4; `Tuning::gemvq_rows`, default 4: each x
/// record read serves four rows; 1.3x the batch-16 decode of 2 rows on an H200).
fn gemvq_rows(asked: u32) -> u32 {
    match asked {
        1 | 2 => asked,
        _ => 4,
    }
}

/// Device addresses of official int8/int4 weights (u8) and their scales (f32).
fn u8_and_f32(
    sq: &CudaStorage,
    lq: &Layout,
    ss: &CudaStorage,
    ls: &Layout,
    op: &str,
) -> Result<(u64, u64)> {
    let (q0, _) = contiguous(lq, op)?;
    let (s0, _) = contiguous(ls, op)?;
    if sq.dtype() != DType::U8 || ss.dtype() != DType::F32 {
        bail!("{op}: u8 weights and f32 scales expected")
    }
    Ok((addr(sq, q0)?, addr(ss, s0)?))
}

impl candle_core::CustomOp3 for GemvOfficial {
    cuda_only!("glm2rs-gemv-official", 3);

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sq: &CudaStorage,
        lq: &Layout,
        ss: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, rb) = lq.shape().dims2()?;
        let want = self.bits.row_bytes(k);
        if m == 0 || m > 8 || rb != want || rb % 16 != 0 || ls.shape().elem_count() != n {
            bail!(
                "gemv_official: x [{m}, {k}], q [{n}, {rb}] ({} bits)",
                self.bits.count()
            );
        }
        let (x0, _) = contiguous(lx, "gemv_official")?;
        let (q, s) = u8_and_f32(sq, lq, ss, ls, "gemv_official")?;
        let dev = &sx.device;
        // float32: the exact one-row kernel; 16-bit: see `gemvq_kernel`.
        let integer = sx.dtype() != DType::F32
            && !self.swiglu
            && gemvq_kernel(m, sx.dtype(), self.forced) == GemvqKernel::Integer;
        let (name, rows) = match sx.dtype() {
            DType::F32 if self.swiglu => bail!("gemv_official_swiglu: 16-bit inputs only"),
            DType::F32 => (format!("gemv_q{}_{m}_f32", self.bits.count()), 1),
            dt if self.swiglu => (
                format!("gemv_q{}_1_{}_swiglu", self.bits.count(), suffix(dt)?),
                2,
            ),
            dt if integer => {
                let r = gemvq_rows(self.rows);
                (
                    format!("gemv_dp4a_q{}_{m}_{}_r{r}", self.bits.count(), suffix(dt)?),
                    r,
                )
            }
            dt => (
                format!("gemv_q{}_{m}_{}_r2", self.bits.count(), suffix(dt)?),
                2,
            ),
        };
        let func = load(dev, &name)?;
        let warps = 8u32;
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(warps * rows), 1, 1),
            block_dim: (warps * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_i, k_i) = (n as i32, k as i32);
        let n_out = if self.swiglu { n / 2 } else { n };
        let groups = m * k / 8;
        let quantize = if integer {
            Some(load(
                dev,
                &format!("quantize_x{}_{}", self.bits.count(), suffix(sx.dtype())?),
            )?)
        } else {
            None
        };
        let x = addr(sx, x0)?;
        let (slice, y) = alloc(dev, sx.dtype(), m * n_out)?;
        // 16-byte records (4 x u32) of int8 x per 8 columns, kept until the GEMV has run
        let xq = match &quantize {
            Some(qf) => {
                let (xq, xq_p) = alloc(dev, DType::U32, groups * 4)?;
                let g = groups as i32;
                let mut qb = qf.builder();
                qb.arg(&x);
                qb.arg(&xq_p);
                qb.arg(&g);
                let qcfg = LaunchConfig {
                    grid_dim: ((groups as u32).div_ceil(256), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { qb.launch(qcfg) }.w()?;
                Some((xq, xq_p))
            }
            None => None,
        };
        let mut b = func.builder();
        match &xq {
            Some((_, xq_p)) => b.arg(xq_p),
            None => b.arg(&x),
        };
        b.arg(&q);
        b.arg(&s);
        b.arg(&y);
        b.arg(&n_i);
        b.arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        // the int8 records are freed in stream order, after the launch
        drop(xq);
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((m, n_out)),
        ))
    }
}

struct DequantOfficial {
    bits: Bits,
    dtype: DType,
}

impl candle_core::CustomOp2 for DequantOfficial {
    cuda_only!("glm2rs-dequant-official", 2);

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        ss: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, rb) = lq.shape().dims2()?;
        let k = self.bits.columns(rb);
        let (q, s) = u8_and_f32(sq, lq, ss, ls, "dequant_official")?;
        let dev = &sq.device;
        let func = load(
            dev,
            &format!("dequant_q{}_{}", self.bits.count(), suffix(self.dtype)?),
        )?;
        if rb % 16 != 0 {
            bail!("dequant_official: rows of {rb} bytes (multiples of 16 expected)");
        }
        let total = (n * rb / 16) as u32; // one thread per 16 bytes
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_i, k_i) = (n as i32, k as i32);
        let (slice, out) = alloc(dev, self.dtype, n * k)?;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&s);
        b.arg(&out);
        b.arg(&n_i);
        b.arg(&k_i);
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((n, k)),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs: a decoding step captured once and replayed with one launch.

/// The [`SEQ_INFO_WORDS`] words of `seq`'s row `row` of a device table for
/// [`DecodeAttention::table`].
pub fn seq_info_words(seq: &DecodeSeq, row: usize) -> Result<[u32; SEQ_INFO_WORDS]> {
    Ok(SeqInfo::of(seq, row)?.words())
}

/// Copy `words` to the start of the contiguous `u32` CUDA tensor `dst`, in stream order (a
/// replayed graph reads them when it runs).
pub fn write_u32(dst: &Tensor, words: &[u32]) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::result;
    if dst.dtype() != DType::U32 || !dst.is_contiguous() || dst.elem_count() < words.len() {
        bail!(
            "write_u32: the destination must be a contiguous u32 tensor of {} or more elements",
            words.len()
        );
    }
    let candle_core::Device::Cuda(dev) = dst.device() else {
        bail!("write_u32: the destination must be on a CUDA device")
    };
    let ptr = device_ptr(dst)?;
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    // pageable source: the call returns once the words are staged, so `words` may go
    unsafe { result::memcpy_htod_async(ptr, words, stream.cu_stream()) }.w()
}

/// A captured sequence of launches, replayed with one launch on the calling thread's stream.
pub struct Graph(candle_core::cuda_backend::cudarc::driver::CudaGraph);

// SAFETY: CUDA graph execs may be launched from any thread of the process; the owner (a
// cache's attached state, reached only through `&mut Cache`) uses it from one thread at a time.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl Graph {
    /// Capture what `body` launches on `device`'s stream (nothing runs). Host-to-device copies
    /// of kernel parameters must have been made before, by a run of the same work under
    /// [`htod_cache`]; anything else that needs the host (a copy back, a synchronization)
    /// fails the capture. The stream leaves capture mode whatever `body` does.
    pub fn capture<E: From<candle_core::Error>>(
        device: &candle_core::Device,
        body: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        use candle_core::cuda_backend::cudarc::driver::sys::{
            CUgraphInstantiate_flags, CUstreamCaptureMode,
        };
        let candle_core::Device::Cuda(dev) = device else {
            return Err(candle_core::Error::Msg("CUDA graphs need a CUDA device".into()).into());
        };
        let stream = dev.cuda_stream();
        let _cached = dev.enable_cuda_graph_htod_cache();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let ran = body();
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        ran?;
        match graph.w()? {
            Some(g) => Ok(Self(g)),
            None => Err(candle_core::Error::Msg("the captured graph is empty".into()).into()),
        }
    }

    /// Run the captured work once more.
    pub fn launch(&self) -> Result<()> {
        self.0.launch().w()
    }
}

/// While the returned guard lives, small host-to-device parameter copies of candle's kernels
/// on this thread are kept on the device by content, so that a later [`Graph::capture`] of the
/// same work finds them (candle's CUDA graph support). `None` off CUDA.
pub fn htod_cache(device: &candle_core::Device) -> Option<impl Sized> {
    match device {
        candle_core::Device::Cuda(dev) => Some(dev.enable_cuda_graph_htod_cache()),
        _ => None,
    }
}

/// The default memory pool of GPU `ordinal`: cudarc allocates every tensor from it with
/// `cuMemAllocAsync`, so its attributes are the allocator-side figures (as PyTorch's
/// `memory_allocated` / `memory_reserved`), without the CUDA context or library workspaces.
fn mem_pool(
    ordinal: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::result;
    result::init().w()?;
    let dev = result::device::get(ordinal as i32).w()?;
    unsafe { result::device::get_mem_pool(dev) }.w()
}

/// The CUDA GPUs the driver sees: (index, name, compute capability, total memory bytes).
pub fn devices() -> Result<Vec<(usize, String, (i32, i32), u64)>> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let n = cudarc::driver::CudaContext::device_count().w()? as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ctx = cudarc::driver::CudaContext::new(i).w()?;
        let name = ctx.name().w()?;
        let major = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .w()?;
        let minor = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .w()?;
        let mem = ctx.total_mem().w()? as u64;
        out.push((i, name, (major, minor), mem));
    }
    Ok(out)
}

/// Bytes a new allocation on `dev` can still get: what the driver has free plus what the
/// memory pool holds unused.
pub fn free_memory(dev: &candle_core::Device) -> Result<u64> {
    let candle_core::Device::Cuda(d) = dev else {
        bail!("free_memory: not a CUDA device")
    };
    let (free, _total) = d.cuda_stream().context().mem_get_info().w()?;
    let ordinal = d.cuda_stream().context().ordinal();
    let [used, _, reserved, _] = pool_memory(ordinal, false)?;
    Ok(free as u64 + reserved.saturating_sub(used))
}

/// `[used, used_peak, reserved, reserved_peak]` bytes of GPU `ordinal`'s pool; `reset_peak`
/// starts both peaks again from the current values.
pub fn pool_memory(ordinal: usize, reset_peak: bool) -> Result<[u64; 4]> {
    use candle_core::cuda_backend::cudarc::driver::{
        result::mem_pool, sys::CUmemPool_attribute as A,
    };
    let pool = mem_pool(ordinal)?;
    let attrs = [
        A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
        A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
    ];
    let mut out = [0u64; 4];
    for (o, a) in out.iter_mut().zip(attrs) {
        unsafe { mem_pool::get_attribute(pool, a, o as *mut u64 as *mut _) }.w()?;
    }
    if reset_peak {
        for a in [
            A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero = 0u64;
            unsafe { mem_pool::set_attribute(pool, a, &mut zero as *mut u64 as *mut _) }.w()?;
        }
    }
    Ok(out)
}

/// Keep freed memory in GPU `ordinal`'s pool instead of returning it to the driver at every
/// synchronization (the pool's default): a decode step then reuses the previous step's memory,
/// as PyTorch's caching allocator does.
pub fn keep_pool_memory(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{
        result::mem_pool, sys::CUmemPool_attribute as A,
    };
    let pool = mem_pool(ordinal)?;
    let mut keep = u64::MAX;
    unsafe {
        mem_pool::set_attribute(
            pool,
            A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut _,
        )
    }
    .w()
}
