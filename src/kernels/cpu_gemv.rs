//! CPU matrix products for the linear layers: `y[m, n] = x[m, k] · W[n, k]ᵀ`, with `x` and `W`
//! in the model dtype (float16, bfloat16 or float32), converted to f32 in registers and
//! accumulated in f32.
//!
//! Decoding reads every weight once per token, so it is bound by memory bandwidth. candle's CPU
//! matmul widens a bf16 weight to a full f32 copy on every call and runs f16 through a
//! half-precision GEMM. Here, for a few rows (decoding), each weight row is streamed once for
//! all `m` inputs with AVX-512 or AVX2+F16C kernels picked at run time (a portable loop
//! elsewhere); the inputs stay 16-bit so a whole row of them fits in L1. For many rows
//! (prefill), blocks of weight rows are widened to f32 in L2 and multiplied by the `gemm`
//! crate's f32 kernel. Work is split across rayon's threads by weight rows.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

/// Inputs with at most this many rows use the streaming kernels (more rows: a GEMM pays off).
pub const MAX_ROWS: usize = 8;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 32;
/// Input rows handled per pass over a weight row (accumulators kept in registers).
pub(crate) const M_BLOCK: usize = 4;
/// Input rows per pass of the blocked matmul (each pass widens the weights once).
pub(crate) const M_CHUNK: usize = 256;

/// A row-major matrix (or row) of one of the supported dtypes, as raw bits.
#[derive(Clone, Copy)]
enum Mat<'a> {
    F16(&'a [u16]),
    BF16(&'a [u16]),
    F32(&'a [f32]),
}

impl<'a> Mat<'a> {
    fn from_storage(s: &'a CpuStorage, a: usize, b: usize) -> Result<Self> {
        Ok(match s {
            // SAFETY: f16 and bf16 are repr(transparent) over u16.
            CpuStorage::F16(v) => Mat::F16(unsafe {
                std::slice::from_raw_parts(v[a..b].as_ptr() as *const u16, b - a)
            }),
            CpuStorage::BF16(v) => Mat::BF16(unsafe {
                std::slice::from_raw_parts(v[a..b].as_ptr() as *const u16, b - a)
            }),
            CpuStorage::F32(v) => Mat::F32(&v[a..b]),
            _ => bail!("glm2rs matmul: unsupported dtype {:?}", s.dtype()),
        })
    }

    fn same_kind(&self, o: &Mat<'_>) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(o)
    }

    fn row(&self, r: usize, k: usize) -> Mat<'a> {
        match *self {
            Mat::F16(v) => Mat::F16(&v[r * k..(r + 1) * k]),
            Mat::BF16(v) => Mat::BF16(&v[r * k..(r + 1) * k]),
            Mat::F32(v) => Mat::F32(&v[r * k..(r + 1) * k]),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            Mat::F16(v) => f16::from_bits(v[i]).to_f32(),
            Mat::BF16(v) => f32::from_bits((v[i] as u32) << 16),
            Mat::F32(v) => v[i],
        }
    }

    /// Elements `at..at + out.len()` as f32.
    fn widen(&self, at: usize, out: &mut [f32]) {
        match self {
            Mat::F16(v) => {
                // SAFETY: u16 and f16 have the same layout.
                let src: &[f16] = unsafe {
                    std::slice::from_raw_parts(v[at..].as_ptr() as *const f16, out.len())
                };
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out)
            }
            Mat::BF16(v) => {
                let n = out.len();
                for (d, &b) in out.iter_mut().zip(&v[at..at + n]) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            }
            Mat::F32(v) => out.copy_from_slice(&v[at..at + out.len()]),
        }
    }
}

/// Add `W[row, k0..k1] · xs[i][k0..k1]` to `out[i]` for each input row. Portable version.
fn dots_portable(
    w: &Mat<'_>,
    row: usize,
    k: usize,
    k0: usize,
    k1: usize,
    xs: &[Mat<'_>],
    out: &mut [f32],
) {
    let base = row * k;
    for (i, x) in xs.iter().enumerate() {
        let mut acc = [0f32; 8];
        let chunks = (k1 - k0) / 8;
        for c in 0..chunks {
            let j = k0 + c * 8;
            for (l, a) in acc.iter_mut().enumerate() {
                *a += w.get(base + j + l) * x.get(j + l);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for j in k0 + chunks * 8..k1 {
            s += w.get(base + j) * x.get(j);
        }
        out[i] += s;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Mat;
    use std::arch::x86_64::*;

    macro_rules! avx512_kernel {
        ($name:ident, $load:ident) => {
            #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
            pub unsafe fn $name<const M: usize>(
                w: &Mat<'_>,
                row: usize,
                k: usize,
                k0: usize,
                k1: usize,
                xs: &[Mat<'_>],
                out: &mut [f32],
            ) {
                let base = row * k;
                let mut acc = [[_mm512_setzero_ps(); 4]; M];
                let step = 64;
                let chunks = (k1 - k0) / step;
                for c in 0..chunks {
                    let j = k0 + c * step;
                    let wv = [
                        $load(w, base + j),
                        $load(w, base + j + 16),
                        $load(w, base + j + 32),
                        $load(w, base + j + 48),
                    ];
                    for i in 0..M {
                        for u in 0..4 {
                            acc[i][u] =
                                _mm512_fmadd_ps(wv[u], $load(&xs[i], j + 16 * u), acc[i][u]);
                        }
                    }
                }
                for i in 0..M {
                    let v = _mm512_add_ps(
                        _mm512_add_ps(acc[i][0], acc[i][1]),
                        _mm512_add_ps(acc[i][2], acc[i][3]),
                    );
                    let mut s = _mm512_reduce_add_ps(v);
                    for j in k0 + chunks * step..k1 {
                        s += w.get(base + j) * xs[i].get(j);
                    }
                    out[i] += s;
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load16_f16(m: &Mat<'_>, at: usize) -> __m512 {
        let Mat::F16(v) = m else { unreachable!() };
        _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load16_bf16(m: &Mat<'_>, at: usize) -> __m512 {
        let Mat::BF16(v) = m else { unreachable!() };
        let h = _mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[inline(always)]
    unsafe fn load16_f32(m: &Mat<'_>, at: usize) -> __m512 {
        let Mat::F32(v) = m else { unreachable!() };
        _mm512_loadu_ps(v.as_ptr().add(at))
    }
    avx512_kernel!(dots_avx512_f16, load16_f16);
    avx512_kernel!(dots_avx512_bf16, load16_bf16);
    avx512_kernel!(dots_avx512_f32, load16_f32);

    macro_rules! avx2_kernel {
        ($name:ident, $load:ident) => {
            #[target_feature(enable = "avx2,f16c,fma")]
            pub unsafe fn $name<const M: usize>(
                w: &Mat<'_>,
                row: usize,
                k: usize,
                k0: usize,
                k1: usize,
                xs: &[Mat<'_>],
                out: &mut [f32],
            ) {
                let base = row * k;
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                let step = 16;
                let chunks = (k1 - k0) / step;
                for c in 0..chunks {
                    let j = k0 + c * step;
                    let w0 = $load(w, base + j);
                    let w1 = $load(w, base + j + 8);
                    for i in 0..M {
                        acc[i][0] = _mm256_fmadd_ps(w0, $load(&xs[i], j), acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(w1, $load(&xs[i], j + 8), acc[i][1]);
                    }
                }
                for i in 0..M {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[i][0], acc[i][1]));
                    let mut s: f32 = lanes.iter().sum();
                    for j in k0 + chunks * step..k1 {
                        s += w.get(base + j) * xs[i].get(j);
                    }
                    out[i] += s;
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load8_f16(m: &Mat<'_>, at: usize) -> __m256 {
        let Mat::F16(v) = m else { unreachable!() };
        _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(at) as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load8_bf16(m: &Mat<'_>, at: usize) -> __m256 {
        let Mat::BF16(v) = m else { unreachable!() };
        let h = _mm_loadu_si128(v.as_ptr().add(at) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[inline(always)]
    unsafe fn load8_f32(m: &Mat<'_>, at: usize) -> __m256 {
        let Mat::F32(v) = m else { unreachable!() };
        _mm256_loadu_ps(v.as_ptr().add(at))
    }
    avx2_kernel!(dots_avx2_f16, load8_f16);
    avx2_kernel!(dots_avx2_bf16, load8_bf16);
    avx2_kernel!(dots_avx2_f32, load8_f32);
}

type DotsFn = fn(&Mat<'_>, usize, usize, usize, usize, &[Mat<'_>], &mut [f32]);

/// Dispatch a const-generic kernel on the number of inputs (1..=M_BLOCK).
#[cfg(target_arch = "x86_64")]
macro_rules! by_m {
    ($kernel:ident) => {
        |w, r, k, k0, k1, x, o| unsafe {
            match x.len() {
                1 => x86::$kernel::<1>(w, r, k, k0, k1, x, o),
                2 => x86::$kernel::<2>(w, r, k, k0, k1, x, o),
                3 => x86::$kernel::<3>(w, r, k, k0, k1, x, o),
                _ => x86::$kernel::<4>(w, r, k, k0, k1, x, o),
            }
        }
    };
}

/// The fastest kernel this CPU runs for a dtype.
fn pick(w: &Mat<'_>) -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // SAFETY (all arms): each kernel is only chosen when the CPU has its target features.
        if has!("avx512f") && has!("avx512bw") && has!("f16c") && has!("fma") {
            return match w {
                Mat::F16(_) => by_m!(dots_avx512_f16),
                Mat::BF16(_) => by_m!(dots_avx512_bf16),
                Mat::F32(_) => by_m!(dots_avx512_f32),
            };
        }
        if has!("avx2") && has!("f16c") && has!("fma") {
            return match w {
                Mat::F16(_) => by_m!(dots_avx2_f16),
                Mat::BF16(_) => by_m!(dots_avx2_bf16),
                Mat::F32(_) => by_m!(dots_avx2_f32),
            };
        }
    }
    let _ = w;
    dots_portable
}

/// `out[n, m]` (transposed), filled by parallel tasks of `ROWS_PER_TASK` weight rows:
/// `f(row, b, out)` writes weight row `row`'s results for block `b` of the inputs (inputs
/// `b * M_BLOCK..`, `out.len()` of them: `M_BLOCK`, the last block fewer). Each weight row is
/// read by one task only, once per block.
pub(crate) fn gemv_t_blocks(
    n: usize,
    m: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, out_row) in chunk.chunks_mut(m).enumerate() {
                for (b, o) in out_row.chunks_mut(M_BLOCK).enumerate() {
                    f(task * ROWS_PER_TASK + r, b, o);
                }
            }
        });
    out_t
}

/// `out[n, m]` (transposed) = W[n, k] · x[m, k]ᵀ, streaming each weight row once.
fn gemv_t(w: Mat<'_>, x: Mat<'_>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let dots = pick(&w);
    let rows: Vec<Mat<'_>> = (0..m).map(|i| x.row(i, k)).collect();
    gemv_t_blocks(n, m, |row, b, o| {
        let xs = &rows[b * M_BLOCK..b * M_BLOCK + o.len()];
        dots(&w, row, k, 0, k, xs, o)
    })
}

/// `out[n, m]` (transposed) = W[n, k] · x[m, k]ᵀ for many rows: blocks of W rows are widened to
/// f32 by `widen(row, dst)` and multiplied by f32 `x` through the `gemm` crate (shared with the
/// quantized kernels).
pub(crate) fn blocked_matmul_t(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    widen: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let nb = ((4096 * 1024) / k.max(1)).clamp(128, 1024) / 16 * 16;
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(nb * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let row0 = task * nb;
            let rows = chunk.len() / m;
            let mut wblock = vec![0f32; rows * k];
            for r in 0..rows {
                widen(row0 + r, &mut wblock[r * k..(r + 1) * k]);
            }
            // chunk [rows, m] row-major = wblock [rows, k] · xᵀ [k, m]
            // SAFETY: every pointer covers the extent given to gemm.
            unsafe {
                gemm::gemm(
                    rows,
                    m,
                    k,
                    chunk.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    wblock.as_ptr(),
                    1,
                    k as isize,
                    x.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
    out_t
}

/// Write `out_t` (`[n, mc]`, transposed) into rows `i0..i0 + mc` of `out` (`[m, n]`).
pub(crate) fn scatter_transposed(out: &mut [f32], out_t: &[f32], i0: usize, mc: usize, n: usize) {
    for j in 0..n {
        for i in 0..mc {
            out[(i0 + i) * n + j] = out_t[j * mc + i];
        }
    }
}

/// f32 results as CPU storage of `dtype`.
pub(crate) fn f32_to_storage(out: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(out),
        DType::F16 => CpuStorage::F16(out.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(out.into_iter().map(bf16::from_f32).collect()),
        d => bail!("glm2rs matmul: unsupported dtype {d:?}"),
    })
}

/// `x[m, k]` times `W[n, k]ᵀ` -> `[m, n]`, both in the same float dtype. See the module docs.
pub struct Gemv;

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "glm2rs-cpu-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            bail!("glm2rs matmul: x is [{m}, {k}] but W is [{n}, {k2}]")
        }
        let Some((x0, x1)) = l1.contiguous_offsets() else {
            bail!("glm2rs matmul: x must be contiguous")
        };
        let Some((w0, w1)) = l2.contiguous_offsets() else {
            bail!("glm2rs matmul: W must be contiguous")
        };
        let x = Mat::from_storage(s1, x0, x1)?;
        let w = Mat::from_storage(s2, w0, w1)?;
        if !x.same_kind(&w) {
            bail!(
                "glm2rs matmul: x is {:?} but W is {:?}",
                s1.dtype(),
                s2.dtype()
            )
        }
        let mut out = vec![0f32; m * n];
        if m <= MAX_ROWS {
            scatter_transposed(&mut out, &gemv_t(w, x, m, n, k), 0, m, n);
        } else {
            let mut i0 = 0;
            while i0 < m {
                let i1 = (i0 + M_CHUNK).min(m);
                let mut xc = vec![0f32; (i1 - i0) * k];
                x.widen(i0 * k, &mut xc);
                let out_t = blocked_matmul_t(n, i1 - i0, k, &xc, |r, dst| w.widen(r * k, dst));
                scatter_transposed(&mut out, &out_t, i0, i1 - i0, n);
                i0 = i1;
            }
        }
        let storage = f32_to_storage(out, s1.dtype())?;
        Ok((storage, Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn check(dt: DType, m: usize, n: usize, k: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = f(&x).matmul(&f(&w).t().unwrap()).unwrap();
        let got = f(&x.apply_op2_no_bwd(&w, &Gemv).unwrap());
        let err = crate::testing::max_abs_diff(&got, &want);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // f32 accumulation in another order; the result rounded to the dtype
        let tol = match dt {
            DType::F32 => 1e-5 * scale.max(1.0),
            DType::F16 => 1e-3 * scale.max(1.0),
            _ => 8e-3 * scale.max(1.0),
        };
        assert!(err <= tol, "{dt:?} m={m} n={n} k={k}: {err} > {tol}");
    }

    #[test]
    fn matches_matmul_for_every_dtype_and_odd_sizes() {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            for (m, n, k) in [
                (1, 70, 64),
                (3, 33, 100),
                (5, 129, 37),
                (8, 64, 4096),
                (1, 1, 1),
                (9, 70, 64),
                (300, 50, 130),
                (33, 1000, 4096),
            ] {
                check(dt, m, n, k);
            }
        }
    }

    #[test]
    fn portable_kernel_agrees() {
        let k = 77;
        let w: Vec<u16> = (0..2 * k)
            .map(|i| f16::from_f32((i as f32 * 0.37).sin()).to_bits())
            .collect();
        let x: Vec<u16> = (0..k)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()).to_bits())
            .collect();
        let mut a = [0f32; 1];
        dots_portable(&Mat::F16(&w), 1, k, 0, k, &[Mat::F16(&x)], &mut a);
        let want: f32 = (0..k)
            .map(|j| f16::from_bits(w[k + j]).to_f32() * f16::from_bits(x[j]).to_f32())
            .sum();
        assert!((a[0] - want).abs() < 1e-4);
    }

    #[test]
    fn mixed_dtypes_are_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 8), DType::F16, &dev).unwrap();
        assert!(x.apply_op2_no_bwd(&w, &Gemv).is_err());
    }
}
