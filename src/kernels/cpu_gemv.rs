//! CPU matrix-vector products for decoding: `y[m, n] = x[m, k] · W[n, k]ᵀ` for a few rows `m`,
//! with `W` in float16, bfloat16 or float32, converted to f32 on the fly and accumulated in f32.
//!
//! Decoding reads every weight once per token, so it is bound by memory bandwidth; candle's CPU
//! matmul widens a bf16 weight to a full f32 copy on every call and runs f16 through a
//! general GEMM. Here each weight row is streamed once for all `m` inputs, with AVX-512 or
//! AVX2+F16C kernels picked at run time (a portable loop elsewhere), and rows split across
//! rayon's threads.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

/// Inputs with at most this many rows use the GEMV kernels (more rows: a GEMM pays off).
pub const MAX_ROWS: usize = 8;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 32;
/// Input rows handled per pass over a weight row (accumulators kept in registers).
const M_BLOCK: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WKind {
    F16,
    BF16,
    F32,
}

/// A weight matrix `[n, k]`, row-major.
#[derive(Clone, Copy)]
enum Weights<'a> {
    F16(&'a [u16]),
    BF16(&'a [u16]),
    F32(&'a [f32]),
}

impl Weights<'_> {
    fn kind(&self) -> WKind {
        match self {
            Weights::F16(_) => WKind::F16,
            Weights::BF16(_) => WKind::BF16,
            Weights::F32(_) => WKind::F32,
        }
    }
}

#[inline(always)]
fn to_f32_scalar(w: &Weights<'_>, i: usize) -> f32 {
    match w {
        Weights::F16(v) => f16::from_bits(v[i]).to_f32(),
        Weights::BF16(v) => f32::from_bits((v[i] as u32) << 16),
        Weights::F32(v) => v[i],
    }
}

/// Add the dot products of weight row `row`, columns `k0..k1`, with `xs.len()` (<= M_BLOCK)
/// inputs to `out`. Portable version.
fn dots_portable(w: &Weights<'_>, row: usize, k: usize, k0: usize, k1: usize, xs: &[&[f32]], out: &mut [f32]) {
    let base = row * k;
    let mut acc = [[0f32; 8]; M_BLOCK];
    let chunks = (k1 - k0) / 8;
    for c in 0..chunks {
        let j = k0 + c * 8;
        let mut wv = [0f32; 8];
        for (l, v) in wv.iter_mut().enumerate() {
            *v = to_f32_scalar(w, base + j + l);
        }
        for (a, x) in acc.iter_mut().zip(xs) {
            for l in 0..8 {
                a[l] += wv[l] * x[j + l];
            }
        }
    }
    for (i, x) in xs.iter().enumerate() {
        let mut s: f32 = acc[i].iter().sum();
        for j in k0 + chunks * 8..k1 {
            s += to_f32_scalar(w, base + j) * x[j];
        }
        out[i] += s;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{to_f32_scalar, Weights};
    use std::arch::x86_64::*;

    macro_rules! avx512_kernel {
        ($name:ident, $load:expr) => {
            #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
            pub unsafe fn $name<const M: usize>(
                w: &Weights<'_>, row: usize, k: usize, k0: usize, k1: usize, xs: &[&[f32]], out: &mut [f32],
            ) {
                let base = row * k;
                let mut acc = [[_mm512_setzero_ps(); 4]; M];
                let step = 64;
                let chunks = (k1 - k0) / step;
                for c in 0..chunks {
                    let j = k0 + c * step;
                    let wv: [__m512; 4] = [
                        $load(w, base + j),
                        $load(w, base + j + 16),
                        $load(w, base + j + 32),
                        $load(w, base + j + 48),
                    ];
                    for i in 0..M {
                        let xp = xs[i].as_ptr().add(j);
                        for u in 0..4 {
                            acc[i][u] = _mm512_fmadd_ps(wv[u], _mm512_loadu_ps(xp.add(16 * u)), acc[i][u]);
                        }
                    }
                }
                for i in 0..M {
                    let v = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
                    let mut s = _mm512_reduce_add_ps(v);
                    for j in k0 + chunks * step..k1 {
                        s += to_f32_scalar(w, base + j) * xs[i][j];
                    }
                    out[i] += s;
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load16_f16(w: &Weights<'_>, at: usize) -> __m512 {
        let Weights::F16(v) = w else { unreachable!() };
        _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load16_bf16(w: &Weights<'_>, at: usize) -> __m512 {
        let Weights::BF16(v) = w else { unreachable!() };
        let h = _mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[inline(always)]
    unsafe fn load16_f32(w: &Weights<'_>, at: usize) -> __m512 {
        let Weights::F32(v) = w else { unreachable!() };
        _mm512_loadu_ps(v.as_ptr().add(at))
    }
    avx512_kernel!(dots_avx512_f16, load16_f16);
    avx512_kernel!(dots_avx512_bf16, load16_bf16);
    avx512_kernel!(dots_avx512_f32, load16_f32);

    macro_rules! avx2_kernel {
        ($name:ident, $load:expr) => {
            #[target_feature(enable = "avx2,f16c,fma")]
            pub unsafe fn $name<const M: usize>(
                w: &Weights<'_>, row: usize, k: usize, k0: usize, k1: usize, xs: &[&[f32]], out: &mut [f32],
            ) {
                let base = row * k;
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                let step = 16;
                let chunks = (k1 - k0) / step;
                for c in 0..chunks {
                    let j = k0 + c * step;
                    let w0: __m256 = $load(w, base + j);
                    let w1: __m256 = $load(w, base + j + 8);
                    for i in 0..M {
                        let xp = xs[i].as_ptr().add(j);
                        acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc[i][1]);
                    }
                }
                for i in 0..M {
                    let v = _mm256_add_ps(acc[i][0], acc[i][1]);
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    let mut s: f32 = lanes.iter().sum();
                    for j in k0 + chunks * step..k1 {
                        s += to_f32_scalar(w, base + j) * xs[i][j];
                    }
                    out[i] += s;
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load8_f16(w: &Weights<'_>, at: usize) -> __m256 {
        let Weights::F16(v) = w else { unreachable!() };
        _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(at) as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load8_bf16(w: &Weights<'_>, at: usize) -> __m256 {
        let Weights::BF16(v) = w else { unreachable!() };
        let h = _mm_loadu_si128(v.as_ptr().add(at) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[inline(always)]
    unsafe fn load8_f32(w: &Weights<'_>, at: usize) -> __m256 {
        let Weights::F32(v) = w else { unreachable!() };
        _mm256_loadu_ps(v.as_ptr().add(at))
    }
    avx2_kernel!(dots_avx2_f16, load8_f16);
    avx2_kernel!(dots_avx2_bf16, load8_bf16);
    avx2_kernel!(dots_avx2_f32, load8_f32);
}

type DotsFn = fn(&Weights<'_>, usize, usize, usize, usize, &[&[f32]], &mut [f32]);

/// Dispatch a const-generic kernel on the number of inputs (1..=M_BLOCK).
macro_rules! by_m {
    ($module:ident :: $kernel:ident) => {
        |w, r, k, k0, k1, x, o| unsafe {
            match x.len() {
                1 => $module::$kernel::<1>(w, r, k, k0, k1, x, o),
                2 => $module::$kernel::<2>(w, r, k, k0, k1, x, o),
                3 => $module::$kernel::<3>(w, r, k, k0, k1, x, o),
                _ => $module::$kernel::<4>(w, r, k, k0, k1, x, o),
            }
        }
    };
}

/// The fastest kernel this CPU runs for a weight dtype.
fn pick(kind: WKind) -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // SAFETY (all arms): each kernel is only chosen when the CPU has its target features.
        if has!("avx512f") && has!("avx512bw") && has!("f16c") && has!("fma") {
            return match kind {
                WKind::F16 => by_m!(x86::dots_avx512_f16),
                WKind::BF16 => by_m!(x86::dots_avx512_bf16),
                WKind::F32 => by_m!(x86::dots_avx512_f32),
            };
        }
        if has!("avx2") && has!("f16c") && has!("fma") {
            return match kind {
                WKind::F16 => by_m!(x86::dots_avx2_f16),
                WKind::BF16 => by_m!(x86::dots_avx2_bf16),
                WKind::F32 => by_m!(x86::dots_avx2_f32),
            };
        }
    }
    let _ = kind;
    dots_portable
}

/// Columns per block: a block of every input (`M_BLOCK * K_BLOCK` f32) stays in L1 while the
/// rows of a task stream past it.
const K_BLOCK: usize = 1 << 20;

/// `out[n, m]` (transposed) = W[n, k] · x[m, k]ᵀ.
fn gemv_t(w: Weights<'_>, x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let dots = pick(w.kind());
    let mut out_t = vec![0f32; n * m];
    out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
        let row0 = task * ROWS_PER_TASK;
        let mut i0 = 0;
        while i0 < m {
            let i1 = (i0 + M_BLOCK).min(m);
            let xs: Vec<&[f32]> = (i0..i1).map(|i| &x[i * k..(i + 1) * k]).collect();
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + K_BLOCK).min(k);
                for (r, out_row) in chunk.chunks_mut(m).enumerate() {
                    dots(&w, row0 + r, k, k0, k1, &xs, &mut out_row[i0..i1]);
                }
                k0 = k1;
            }
            i0 = i1;
        }
    });
    out_t
}

/// `x[m, k]` (any float dtype) times `W[n, k]ᵀ` -> `[m, n]` in x's dtype. See the module docs.
pub struct Gemv;

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "glm2rs-cpu-gemv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            bail!("gemv: x is [{m}, {k}] but W is [{n}, {k2}]")
        }
        let Some((x0, x1)) = l1.contiguous_offsets() else { bail!("gemv: x must be contiguous") };
        let Some((w0, w1)) = l2.contiguous_offsets() else { bail!("gemv: W must be contiguous") };
        let x: Vec<f32> = match s1 {
            CpuStorage::F32(v) => v[x0..x1].to_vec(),
            CpuStorage::F16(v) => v[x0..x1].iter().map(|h| h.to_f32()).collect(),
            CpuStorage::BF16(v) => v[x0..x1].iter().map(|h| h.to_f32()).collect(),
            _ => bail!("gemv: unsupported input dtype {:?}", s1.dtype()),
        };
        let w = match s2 {
            // SAFETY: f16/bf16 are repr(transparent) over u16.
            CpuStorage::F16(v) => Weights::F16(unsafe { std::slice::from_raw_parts(v[w0..w1].as_ptr() as *const u16, w1 - w0) }),
            CpuStorage::BF16(v) => Weights::BF16(unsafe { std::slice::from_raw_parts(v[w0..w1].as_ptr() as *const u16, w1 - w0) }),
            CpuStorage::F32(v) => Weights::F32(&v[w0..w1]),
            _ => bail!("gemv: unsupported weight dtype {:?}", s2.dtype()),
        };
        let out_t = gemv_t(w, &x, m, n, k);
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = out_t[j * m + i];
            }
        }
        let storage = match s1.dtype() {
            DType::F32 => CpuStorage::F32(out),
            DType::F16 => CpuStorage::F16(out.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(out.into_iter().map(bf16::from_f32).collect()),
            d => bail!("gemv: unsupported input dtype {d:?}"),
        };
        Ok((storage, Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn check(wdt: DType, m: usize, n: usize, k: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(wdt).unwrap();
        let want = x.matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
        let got = x.apply_op2_no_bwd(&w, &Gemv).unwrap();
        let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 1e-5 * scale.max(1.0) * (k as f32).sqrt(), "{wdt:?} m={m} n={n} k={k}: {err}");
    }

    #[test]
    fn matches_matmul_for_every_dtype_and_odd_sizes() {
        for wdt in [DType::F16, DType::BF16, DType::F32] {
            for (m, n, k) in [(1, 70, 64), (3, 33, 100), (5, 129, 37), (8, 64, 4096), (1, 1, 1)] {
                check(wdt, m, n, k);
            }
        }
    }

    #[test]
    fn portable_kernel_agrees() {
        let k = 77;
        let w: Vec<u16> = (0..2 * k).map(|i| f16::from_f32((i as f32 * 0.37).sin()).to_bits()).collect();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut a = [0f32; 1];
        dots_portable(&Weights::F16(&w), 1, k, 0, k, &[&x], &mut a);
        let want: f32 = (0..k).map(|j| f16::from_bits(w[k + j]).to_f32() * x[j]).sum();
        assert!((a[0] - want).abs() < 1e-4);
    }
}
