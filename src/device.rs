//! Devices and dtypes: parsing `"cpu"` / `"cuda:1"` / `"metal"` and `"auto"` / `"bfloat16"`
//! strings once, the dtype `"auto"` picks, and the CUDA memory pool (kept between steps, read as
//! PyTorch's `memory_allocated` counterparts).

use crate::config::Glm2Config;
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::tuning::Tuning;
use candle_core::{DType, Device};

/// A device string split into its kind and index (`"cuda:1"` -> `("cuda", 1)`; no index: 0),
/// with the trimmed, lower-case string for messages.
fn split_device(s: &str) -> Result<(String, usize, String)> {
    let s = s.trim().to_ascii_lowercase();
    match s.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| {
                Error::invalid(format!("device \"{s}\": the index must be a number"))
            })?;
            Ok((k.to_string(), i, s.clone()))
        }
        None => Ok((s.clone(), 0, s)),
    }
}

/// Parse a device string: `"cpu"`, `"cuda"`, `"cuda:N"`, `"metal"`, `"metal:N"`.
pub fn parse_device(s: &str) -> Result<Device> {
    let (kind, index, s) = split_device(s)?;
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if !cfg!(feature = "cuda") {
                return Err(Error::invalid(format!(
                    "device \"{s}\" is not available: this build of glm2rs has no CUDA support \
                     (the CPU wheel); install the CUDA wheel (`scripts/build_wheel.sh --cuda` \
                     builds it) or build with --features cuda, or use device=\"cpu\""
                )));
            }
            let dev = Device::new_cuda(index)
                .map_err(|e| Error::invalid(format!("device \"{s}\" is not available: {e}")))?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &dev {
                check_compute_capability(d, &s)?;
                // One model on one GPU uses one stream: the per-allocation events that guard
                // tensors shared between streams only cost time (`Tuning::cuda_events` keeps
                // them). A model split over several GPUs keeps them (see `parse_devices`).
                if !Tuning::env().cuda_events {
                    unsafe { d.disable_event_tracking() };
                }
            }
            keep_pool_memory(index)?;
            Ok(dev)
        }
        "metal" | "mps" => {
            if !cfg!(feature = "metal") {
                return Err(Error::invalid(format!(
                    "device \"{s}\" is not available: this build of glm2rs has no Metal support; \
                     build it on macOS with --features metal, or use device=\"cpu\""
                )));
            }
            Device::new_metal(index)
                .map_err(|e| Error::invalid(format!("device \"{s}\" is not available: {e}")))
        }
        _ => Err(Error::invalid(format!(
            "unknown device \"{s}\": use \"cpu\", \"cuda\", \"cuda:N\" or \"metal\""
        ))),
    }
}

/// The devices of a model split over `num_gpus` GPUs starting at `device` (`"cuda"` or
/// `"cuda:K"`: GPUs K..K+num_gpus), as the official `load_model_on_gpus`.
pub fn parse_devices(s: &str, num_gpus: usize) -> Result<Vec<Device>> {
    if num_gpus <= 1 {
        return Ok(vec![parse_device(s)?]);
    }
    let (kind, first, _) = split_device(s)?;
    if kind != "cuda" && kind != "gpu" {
        return Err(Error::invalid(format!(
            "num_gpus={num_gpus} needs a CUDA device, not \"{s}\""
        )));
    }
    // Streams of several GPUs exchange tensors: keep cudarc's event tracking, which orders
    // each cross-device copy after the work that produced its source.
    (first..first + num_gpus)
        .map(|i| {
            let dev = Device::new_cuda(i).map_err(|e| {
                Error::invalid(format!("device \"cuda:{i}\" is not available: {e}"))
            })?;
            keep_pool_memory(i)?;
            Ok(dev)
        })
        .collect()
}

/// Freed GPU memory stays in the pool for the next step (`Tuning::cuda_pool_release` returns
/// it to the driver at each synchronization, the CUDA default).
fn keep_pool_memory(_ordinal: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    if !Tuning::env().cuda_pool_release {
        crate::kernels::cuda::keep_pool_memory(_ordinal)?;
    }
    Ok(())
}

/// Allocator-side GPU memory in bytes (the pool every tensor comes from; the CUDA context and
/// library workspaces are not in it): the figures PyTorch reports as `memory_allocated`,
/// `max_memory_allocated`, `memory_reserved` and `max_memory_reserved`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaMemory {
    pub used: u64,
    pub used_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
}

/// [`CudaMemory`] of a `"cuda"` / `"cuda:N"` device; `reset_peak` restarts the peaks from the
/// current values after reading them.
pub fn cuda_memory(device: &str, reset_peak: bool) -> Result<CudaMemory> {
    let (kind, _index, s) = split_device(device)?;
    if kind != "cuda" && kind != "gpu" {
        return Err(Error::invalid(format!(
            "cuda_memory needs a CUDA device, not \"{s}\""
        )));
    }
    #[cfg(feature = "cuda")]
    {
        let [used, used_peak, reserved, reserved_peak] =
            crate::kernels::cuda::pool_memory(_index, reset_peak)?;
        Ok(CudaMemory {
            used,
            used_peak,
            reserved,
            reserved_peak,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = reset_peak;
        Err(Error::invalid(
            "this build of glm2rs has no CUDA support (build with the `cuda` feature)",
        ))
    }
}

/// Parse a dtype string; `None` means `"auto"`.
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "float32" | "f32" | "fp32" | "float" => Ok(Some(DType::F32)),
        "float16" | "f16" | "fp16" | "half" => Ok(Some(DType::F16)),
        "bfloat16" | "bf16" => Ok(Some(DType::BF16)),
        other => Err(Error::invalid(format!(
            "unknown dtype \"{other}\": use \"auto\", \"float32\", \"float16\" or \"bfloat16\""
        ))),
    }
}

/// The name of a dtype as Python users write it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "other",
    }
}

/// Physical memory of this machine in bytes, if known.
/// Bytes free for new allocations on `device`: GPU memory (driver and pool) on CUDA, the RAM
/// the kernel reports available on the CPU; `None` where unknown (Metal, no `/proc`).
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::kernels::cuda::free_memory(device).ok(),
        _ => None,
    }
}

fn total_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A GPU older than the oldest target this build's kernels were compiled for is refused here,
/// saying what to use instead (rather than failing at the first kernel launch).
#[cfg(feature = "cuda")]
fn check_compute_capability(d: &candle_core::CudaDevice, name: &str) -> Result<()> {
    let (major, minor) = crate::kernels::cuda::compute_capability(d)?;
    let min = crate::kernels::cuda::MIN_COMPUTE_CAPABILITY;
    if ((major * 10 + minor) as u32) < min {
        return Err(Error::invalid(format!(
            "device \"{name}\" has compute capability {major}.{minor}; this build's CUDA kernels need {}.{} \
             or newer (the CUDA wheel: A100, RTX 30/40, L4, H100/H200 and later): use device=\"cpu\", or \
             build glm2rs from source for this GPU (CUDA_COMPUTE_CAP={major}{minor} cargo build --features cuda)",
            min / 10,
            min % 10
        )));
    }
    Ok(())
}

/// Whether a device computes in bfloat16: CUDA GPUs from compute capability 8.0 (T4 and V100
/// have no bfloat16 arithmetic), the CPU and Metal.
pub fn has_bf16(device: &Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::kernels::cuda::compute_capability(d).is_ok_and(|cc| cc.0 >= 8),
        _ => true,
    }
}

/// What `dtype="auto"` picks:
/// - CUDA: bfloat16 (the range of float32, half the memory); float16 on GPUs without bfloat16;
/// - Metal: float16;
/// - CPU: float32 when the float32 weights take at most 40% of physical memory (exact and, on
///   CPU, fastest per element), else float16 — the official checkpoints' own dtype, and the
///   16-bit type that candle's CPU matmul runs natively.
pub fn auto_dtype(cfg: &Glm2Config, device: &Device) -> DType {
    match device {
        Device::Cuda(_) if has_bf16(device) => DType::BF16,
        Device::Cuda(_) => DType::F16,
        Device::Metal(_) => DType::F16,
        Device::Cpu => {
            let f32_bytes = cfg.num_parameters() as u64 * 4;
            match total_memory_bytes() {
                Some(total) if f32_bytes * 10 <= total * 4 => DType::F32,
                _ => DType::F16,
            }
        }
    }
}

/// What this build of glm2rs can use here: the features compiled in, the CPU's vector
/// extensions the kernels pick from at run time, and the GPUs (with why they cannot be used).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildInfo {
    pub version: &'static str,
    /// Cargo features compiled in (`cuda`, `metal`, `server`, `python`).
    pub features: Vec<&'static str>,
    /// CPU extensions present (x86: avx2, fma, f16c, avx512f, avx512bw, avx512vnni...).
    pub cpu: Vec<&'static str>,
    /// Visible CUDA GPUs: (index, name, compute capability, memory bytes).
    pub gpus: Vec<(usize, String, (i32, i32), u64)>,
    /// Why CUDA is not usable here (not built in, no driver, no device), if it is not.
    pub cuda_problem: Option<String>,
}

/// [`BuildInfo`] of this process.
pub fn build_info() -> BuildInfo {
    let mut features = vec![];
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "metal") {
        features.push("metal");
    }
    if cfg!(feature = "server") {
        features.push("server");
    }
    if cfg!(feature = "python") {
        features.push("python");
    }
    #[allow(unused_mut)]
    let mut cpu = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, on) in [
            ("sse4.2", has!("sse4.2")),
            ("avx", has!("avx")),
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vnni", has!("avx512vnni")),
        ] {
            if on {
                cpu.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    cpu.push("neon");
    let (gpus, cuda_problem) = cuda_devices();
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        features,
        cpu,
        gpus,
        cuda_problem,
    }
}

#[cfg(feature = "cuda")]
fn cuda_devices() -> (Vec<(usize, String, (i32, i32), u64)>, Option<String>) {
    // (a missing driver library panics inside the loader: caught, reported as a problem)
    match crate::error::catch_panic(|| Ok(crate::kernels::cuda::devices()?)) {
        Ok(d) if d.is_empty() => (d, Some("the CUDA driver sees no GPU".into())),
        Ok(d) => {
            let min = crate::kernels::cuda::MIN_COMPUTE_CAPABILITY as i32;
            let old = d.iter().find(|g| g.2 .0 * 10 + g.2 .1 < min).map(|g| {
                format!(
                    "GPU {} ({}) has compute capability {}.{}; this build's kernels need {}.{} or newer",
                    g.0,
                    g.1,
                    g.2 .0,
                    g.2 .1,
                    min / 10,
                    min % 10
                )
            });
            (d, old)
        }
        Err(e) => (vec![], Some(format!("no usable CUDA driver: {e}"))),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices() -> (Vec<(usize, String, (i32, i32), u64)>, Option<String>) {
    (
        vec![],
        Some(
            "this build has no CUDA support (the CPU wheel; build with the `cuda` feature)".into(),
        ),
    )
}
