//! CPU matrix products with the official ChatGLM2 weight-only quantized layouts:
//! int8 `q[out, in]` or int4 `q[out, in/2]` (two signed nibbles per byte, column 2j in the high
//! nibble and 2j+1 in the low one), with one scale per output row: `W[r, c] = scale[r] * q[r, c]`.
//!
//! As the official code (which dequantizes to float16 before its matmul), each weight is
//! `f16(scale * q)`: computed in registers, rounded through float16, accumulated in f32. Decoding streams each quantized row once (a quarter of
//! the bytes of float16 for int4); many rows go through blocks dequantized to f32 and the `gemm`
//! crate's f32 kernel, as the float path does.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape};
use half::f16;

use crate::quantize::Bits;

use super::cpu_gemv::{
    blocked_matmul_t, f32_to_storage, gemv_t_blocks, scatter_transposed, MAX_ROWS, M_BLOCK, M_CHUNK,
};

/// The official dequantized weight: `scale * q` rounded to float16.
#[inline(always)]
fn deq(s: f32, q: i8) -> f32 {
    f16::from_f32(s * q as f32).to_f32()
}

/// Sum over the row of `deq(s, q[c]) * x[c]`, portable version. `x` is the plain input for
/// int8; for int4 it is the input split as `[x[0::2] | x[1::2]]`.
fn dot_portable(bits: Bits, s: f32, q: &[u8], x: &[f32], exact: bool) -> f32 {
    if !exact {
        return s * dot_portable(bits, 1.0, q, x, true);
    }
    match bits {
        Bits::Eight => q.iter().zip(x).map(|(&b, &v)| deq(s, b as i8) * v).sum(),
        Bits::Four => {
            let half = q.len();
            let (xe, xo) = x.split_at(half);
            let mut acc = 0f32;
            for (j, &b) in q.iter().enumerate() {
                let b = b as i8;
                acc += deq(s, b >> 4) * xe[j] + deq(s, (b << 4) >> 4) * xo[j];
            }
            acc
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Exact: `f16(s * q)` as f32; fast: `q` (the scale is applied to the dot product). 16 lanes.
    #[inline(always)]
    unsafe fn deq16<const EXACT: bool>(s: __m512, q: __m512i) -> __m512 {
        if EXACT {
            let w = _mm512_mul_ps(s, _mm512_cvtepi32_ps(q));
            _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(w))
        } else {
            _mm512_cvtepi32_ps(q)
        }
    }

    /// As `deq16`, 8 lanes.
    #[inline(always)]
    unsafe fn deq8<const EXACT: bool>(s: __m256, q: __m256i) -> __m256 {
        if EXACT {
            let w = _mm256_mul_ps(s, _mm256_cvtepi32_ps(q));
            _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(w))
        } else {
            _mm256_cvtepi32_ps(q)
        }
    }

    /// The dot product's final value: exact kernels already applied the scale.
    #[inline(always)]
    fn finish<const EXACT: bool>(sc: f32, v: f32) -> f32 {
        if EXACT {
            v
        } else {
            sc * v
        }
    }

    #[inline(always)]
    fn deq1<const EXACT: bool>(sc: f32, q: i8) -> f32 {
        if EXACT {
            super::deq(sc, q)
        } else {
            q as f32
        }
    }

    /// int8 row · inputs (M of them), AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    pub unsafe fn dots_i8<const M: usize, const EXACT: bool>(
        sc: f32,
        q: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let k = q.len();
        let s = _mm512_set1_ps(sc);
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        let chunks = k / 32;
        for c in 0..chunks {
            let j = c * 32;
            let b = _mm256_loadu_si256(q.as_ptr().add(j) as *const __m256i);
            let w0 = deq16::<EXACT>(s, _mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
            let w1 = deq16::<EXACT>(s, _mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(b)));
            for i in 0..M {
                let xp = xs[i].as_ptr().add(j);
                acc[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[i][1]);
            }
        }
        for i in 0..M {
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
            for j in chunks * 32..k {
                s += deq1::<EXACT>(sc, q[j] as i8) * xs[i][j];
            }
            out[i] = finish::<EXACT>(sc, s);
        }
    }

    /// int4 row (k/2 bytes) · split inputs `[even | odd]` (M of them), AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    pub unsafe fn dots_i4<const M: usize, const EXACT: bool>(
        sc: f32,
        q: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let h = q.len();
        let s = _mm512_set1_ps(sc);
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        let chunks = h / 16;
        for c in 0..chunks {
            let j = c * 16;
            let b = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr().add(j) as *const __m128i));
            let hi = deq16::<EXACT>(s, _mm512_srai_epi32::<4>(b));
            let lo = deq16::<EXACT>(s, _mm512_srai_epi32::<28>(_mm512_slli_epi32::<28>(b)));
            for i in 0..M {
                let xe = xs[i].as_ptr().add(j);
                let xo = xs[i].as_ptr().add(h + j);
                acc[i][0] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xe), acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xo), acc[i][1]);
            }
        }
        for i in 0..M {
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
            for j in chunks * 16..h {
                let b = q[j] as i8;
                s += deq1::<EXACT>(sc, b >> 4) * xs[i][j]
                    + deq1::<EXACT>(sc, (b << 4) >> 4) * xs[i][h + j];
            }
            out[i] = finish::<EXACT>(sc, s);
        }
    }

    /// Integer dot products of one weight row with activations quantized to int8 (VNNI):
    /// `xq[i]` are the M inputs (int4: arranged `[even | odd]`), `d[i]` their scales per block
    /// of 64 (int4: 64 even and 64 odd values share one), `corr[i]` the offset correction.
    /// Weights enter `vpdpbusd` as unsigned (`w + 8` / `w + 128`), whence the correction.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dots_vnni<const M: usize, const FOUR: bool>(
        sc: f32,
        q: &[u8],
        xq: &[&[i8]],
        d: &[&[f32]],
        corr: &[f32],
        out: &mut [f32],
    ) {
        let nb = q.len() / 64;
        let mut acc = [_mm512_setzero_ps(); M];
        if FOUR {
            let h = q.len();
            let flip = _mm512_set1_epi8(0x88u8 as i8);
            let low = _mm512_set1_epi8(0x0F);
            for c in 0..nb {
                let b = _mm512_xor_si512(
                    _mm512_loadu_si512(q.as_ptr().add(c * 64) as *const __m512i),
                    flip,
                );
                let lo = _mm512_and_si512(b, low); // odd columns
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(b), low); // even columns
                for i in 0..M {
                    let xe = _mm512_loadu_si512(xq[i].as_ptr().add(c * 64) as *const __m512i);
                    let xo = _mm512_loadu_si512(xq[i].as_ptr().add(h + c * 64) as *const __m512i);
                    let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xe);
                    let t = _mm512_dpbusd_epi32(t, lo, xo);
                    acc[i] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d[i][c]), acc[i]);
                }
            }
        } else {
            let flip = _mm512_set1_epi8(0x80u8 as i8);
            for c in 0..nb {
                let v = _mm512_xor_si512(
                    _mm512_loadu_si512(q.as_ptr().add(c * 64) as *const __m512i),
                    flip,
                );
                for i in 0..M {
                    let x = _mm512_loadu_si512(xq[i].as_ptr().add(c * 64) as *const __m512i);
                    let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, x);
                    acc[i] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d[i][c]), acc[i]);
                }
            }
        }
        for i in 0..M {
            out[i] = sc * (_mm512_reduce_add_ps(acc[i]) - corr[i]);
        }
    }

    /// int8, AVX2.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn dots_i8_avx2<const M: usize, const EXACT: bool>(
        sc: f32,
        q: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let k = q.len();
        let s = _mm256_set1_ps(sc);
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let chunks = k / 16;
        for c in 0..chunks {
            let j = c * 16;
            let b = _mm_loadu_si128(q.as_ptr().add(j) as *const __m128i);
            let w0 = deq8::<EXACT>(s, _mm256_cvtepi8_epi32(b));
            let w1 = deq8::<EXACT>(s, _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(b)));
            for i in 0..M {
                let xp = xs[i].as_ptr().add(j);
                acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc[i][1]);
            }
        }
        for i in 0..M {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[i][0], acc[i][1]));
            let mut s: f32 = lanes.iter().sum();
            for j in chunks * 16..k {
                s += deq1::<EXACT>(sc, q[j] as i8) * xs[i][j];
            }
            out[i] = finish::<EXACT>(sc, s);
        }
    }

    /// int4, AVX2.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn dots_i4_avx2<const M: usize, const EXACT: bool>(
        sc: f32,
        q: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let h = q.len();
        let s = _mm256_set1_ps(sc);
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let chunks = h / 8;
        for c in 0..chunks {
            let j = c * 8;
            let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.as_ptr().add(j) as *const __m128i));
            let hi = deq8::<EXACT>(s, _mm256_srai_epi32::<4>(b));
            let lo = deq8::<EXACT>(s, _mm256_srai_epi32::<28>(_mm256_slli_epi32::<28>(b)));
            for i in 0..M {
                acc[i][0] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs[i].as_ptr().add(j)), acc[i][0]);
                acc[i][1] =
                    _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs[i].as_ptr().add(h + j)), acc[i][1]);
            }
        }
        for i in 0..M {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[i][0], acc[i][1]));
            let mut s: f32 = lanes.iter().sum();
            for j in chunks * 8..h {
                let b = q[j] as i8;
                s += deq1::<EXACT>(sc, b >> 4) * xs[i][j]
                    + deq1::<EXACT>(sc, (b << 4) >> 4) * xs[i][h + j];
            }
            out[i] = finish::<EXACT>(sc, s);
        }
    }
}

type DotsFn = fn(Bits, f32, &[u8], &[&[f32]], &mut [f32]);

fn pick(exact: bool) -> DotsFn {
    if exact {
        pick_mode::<true>()
    } else {
        pick_mode::<false>()
    }
}

fn pick_mode<const EXACT: bool>() -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        macro_rules! by_m {
            ($i8:ident, $i4:ident) => {
                |bits, sc, q, xs, out| unsafe {
                    match (bits, xs.len()) {
                        (Bits::Eight, 1) => x86::$i8::<1, EXACT>(sc, q, xs, out),
                        (Bits::Eight, 2) => x86::$i8::<2, EXACT>(sc, q, xs, out),
                        (Bits::Eight, 3) => x86::$i8::<3, EXACT>(sc, q, xs, out),
                        (Bits::Eight, _) => x86::$i8::<4, EXACT>(sc, q, xs, out),
                        (Bits::Four, 1) => x86::$i4::<1, EXACT>(sc, q, xs, out),
                        (Bits::Four, 2) => x86::$i4::<2, EXACT>(sc, q, xs, out),
                        (Bits::Four, 3) => x86::$i4::<3, EXACT>(sc, q, xs, out),
                        (Bits::Four, _) => x86::$i4::<4, EXACT>(sc, q, xs, out),
                    }
                }
            };
        }
        // SAFETY: each kernel is only chosen when the CPU has its target features.
        if has!("avx512f") && has!("avx512bw") && has!("f16c") && has!("fma") {
            return by_m!(dots_i8, dots_i4);
        }
        if has!("avx2") && has!("f16c") && has!("fma") {
            return by_m!(dots_i8_avx2, dots_i4_avx2);
        }
    }
    |bits, sc, q, xs, out| {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = dot_portable(bits, sc, q, x, EXACT);
        }
    }
}

/// A quantized weight: `q` rows of `row_bytes` bytes, `k` logical columns.
struct QWeight<'a> {
    bits: Bits,
    exact: bool,
    /// The VNNI kernels may take it (`QuantMatmul::vnni`).
    vnni: bool,
    q: &'a [u8],
    scale: &'a [f32],
    k: usize,
}

impl QWeight<'_> {
    fn row_bytes(&self) -> usize {
        self.bits.row_bytes(self.k)
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.q[r * rb..(r + 1) * rb]
    }

    /// Row `r` dequantized to f32 (exact: each weight rounded to float16, vectorized).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let s = self.scale[r];
        match self.bits {
            Bits::Eight => {
                for (o, &b) in out.iter_mut().zip(self.row(r)) {
                    *o = s * (b as i8) as f32;
                }
            }
            Bits::Four => {
                for (j, &b) in self.row(r).iter().enumerate() {
                    let b = b as i8;
                    out[2 * j] = s * (b >> 4) as f32;
                    out[2 * j + 1] = s * ((b << 4) >> 4) as f32;
                }
            }
        }
        if self.exact {
            use half::slice::HalfFloatSliceExt;
            let mut h = vec![f16::ZERO; out.len()];
            h.convert_from_f32_slice(out);
            h.convert_to_f32_slice(out);
        }
    }
}

/// A whole official weight (`q` bytes of `n` rows, `scale` per row, `k` columns) dequantized to
/// f32 as the official code does (each weight rounded to float16).
pub fn dequantize_official(bits: Bits, q: &[u8], scale: &[f32], n: usize, k: usize) -> Vec<f32> {
    let w = QWeight {
        bits,
        exact: true,
        vnni: false,
        q,
        scale,
        k,
    };
    let mut out = vec![0f32; n * k];
    for (r, row) in out.chunks_mut(k).enumerate() {
        w.dequantize_row(r, row);
    }
    out
}

/// The input as the kernels want it: plain for int8, `[x[0::2] | x[1::2]]` for int4.
fn arrange(bits: Bits, x: &[f32]) -> Vec<f32> {
    match bits {
        Bits::Eight => x.to_vec(),
        Bits::Four => x
            .iter()
            .step_by(2)
            .chain(x.iter().skip(1).step_by(2))
            .copied()
            .collect(),
    }
}

/// One input row quantized to int8 for the VNNI kernels: blocks of 64 values (int4: of each
/// half of the arranged row, sharing one scale), and the correction of the weights' offset.
#[cfg(target_arch = "x86_64")]
struct QuantizedX {
    q: Vec<i8>,
    d: Vec<f32>,
    corr: f32,
}

#[cfg(target_arch = "x86_64")]
fn quantize_x(bits: Bits, arranged: &[f32]) -> QuantizedX {
    let k = arranged.len();
    let mut q = vec![0i8; k];
    let (halves, offset) = match bits {
        Bits::Four => (2, 8.0f32),
        Bits::Eight => (1, 128.0f32),
    };
    let span = k / halves; // values per half
    let nb = span / 64;
    let mut d = Vec::with_capacity(nb);
    let mut corr = 0f32;
    for b in 0..nb {
        let mut amax = 0f32;
        for hf in 0..halves {
            for &v in &arranged[hf * span + b * 64..hf * span + b * 64 + 64] {
                amax = amax.max(v.abs());
            }
        }
        let db = amax / 127.0;
        let inv = if db > 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0i32;
        for hf in 0..halves {
            let o = hf * span + b * 64;
            for j in 0..64 {
                let v = (arranged[o + j] * inv).round().clamp(-127.0, 127.0) as i8;
                q[o + j] = v;
                sum += v as i32;
            }
        }
        d.push(db);
        corr += db * offset * sum as f32;
    }
    QuantizedX { q, d, corr }
}

/// Whether the integer (VNNI) kernels take this weight: 16-bit activations, AVX-512 VNNI, and
/// rows of whole 64-byte blocks.
fn vnni_suits(w: &QWeight<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        !w.exact
            && w.vnni
            && w.row_bytes() % 64 == 0
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // no VNNI kernels off x86-64, whatever the switch says
        let _ = w.vnni;
        false
    }
}

#[cfg(target_arch = "x86_64")]
fn gemv_t_vnni(w: &QWeight<'_>, x: &[f32], m: usize, n: usize) -> Vec<f32> {
    let k = w.k;
    let qx: Vec<QuantizedX> = (0..m)
        .map(|i| quantize_x(w.bits, &arrange(w.bits, &x[i * k..(i + 1) * k])))
        .collect();
    // per block of at most M_BLOCK inputs: their values, scales and corrections
    type Block<'a> = (Vec<&'a [i8]>, Vec<&'a [f32]>, Vec<f32>);
    let blocks: Vec<Block<'_>> = qx
        .chunks(M_BLOCK)
        .map(|xs| {
            (
                xs.iter().map(|x| x.q.as_slice()).collect(),
                xs.iter().map(|x| x.d.as_slice()).collect(),
                xs.iter().map(|x| x.corr).collect(),
            )
        })
        .collect();
    gemv_t_blocks(n, m, |row, b, o| {
        let (q, d, c) = &blocks[b];
        let (sc, wr) = (w.scale[row], w.row(row));
        // SAFETY: vnni_suits checked the CPU features and the row length.
        unsafe {
            match (w.bits, o.len()) {
                (Bits::Four, 1) => x86::dots_vnni::<1, true>(sc, wr, q, d, c, o),
                (Bits::Four, 2) => x86::dots_vnni::<2, true>(sc, wr, q, d, c, o),
                (Bits::Four, 3) => x86::dots_vnni::<3, true>(sc, wr, q, d, c, o),
                (Bits::Four, _) => x86::dots_vnni::<4, true>(sc, wr, q, d, c, o),
                (Bits::Eight, 1) => x86::dots_vnni::<1, false>(sc, wr, q, d, c, o),
                (Bits::Eight, 2) => x86::dots_vnni::<2, false>(sc, wr, q, d, c, o),
                (Bits::Eight, 3) => x86::dots_vnni::<3, false>(sc, wr, q, d, c, o),
                (Bits::Eight, _) => x86::dots_vnni::<4, false>(sc, wr, q, d, c, o),
            }
        }
    })
}

fn gemv_t(w: &QWeight<'_>, x: &[f32], m: usize, n: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if vnni_suits(w) {
        return gemv_t_vnni(w, x, m, n);
    }
    let k = w.k;
    let dots = pick(w.exact);
    let rows: Vec<Vec<f32>> = (0..m)
        .map(|i| arrange(w.bits, &x[i * k..(i + 1) * k]))
        .collect();
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    gemv_t_blocks(n, m, |row, b, o| {
        let xs = &refs[b * M_BLOCK..b * M_BLOCK + o.len()];
        dots(w.bits, w.scale[row], w.row(row), xs, o)
    })
}

/// `x[m, k]` (float) times the quantized `W[n, k]ᵀ` given as `q` (U8 bytes of the int8 / packed
/// int4 values) and `scale` (f32 `[n]`) -> `[m, n]` in x's dtype.
pub struct QuantMatmul {
    pub bits: Bits,
    /// Round every dequantized weight to float16 as the official code does (bit-faithful to
    /// it; used in float32). Otherwise the scale is applied to each row's dot product, which
    /// is faster and no less accurate (used with float16/bfloat16 activations).
    pub exact: bool,
    /// Let 16-bit activations take the AVX-512 VNNI integer kernels where the CPU has them
    /// (`Tuning::vnni`).
    pub vnni: bool,
}

impl CustomOp3 for QuantMatmul {
    fn name(&self) -> &'static str {
        "glm2rs-cpu-quant-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, rb) = l2.shape().dims2()?;
        if rb != self.bits.row_bytes(k) || (self.bits == Bits::Four && k % 2 != 0) {
            bail!(
                "quantized matmul: x is [{m}, {k}] but q is [{n}, {rb}] ({:?})",
                self.bits
            )
        }
        let (Some((x0, x1)), Some((q0, q1)), Some((c0, c1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            bail!("quantized matmul: inputs must be contiguous")
        };
        let x: Vec<f32> = match s1 {
            CpuStorage::F32(v) => v[x0..x1].to_vec(),
            CpuStorage::F16(v) => v[x0..x1].iter().map(|h| h.to_f32()).collect(),
            CpuStorage::BF16(v) => v[x0..x1].iter().map(|h| h.to_f32()).collect(),
            s => bail!("quantized matmul: unsupported input dtype {:?}", s.dtype()),
        };
        let (CpuStorage::U8(q), CpuStorage::F32(scale)) = (s2, s3) else {
            bail!("quantized matmul: q must be U8 and scale F32")
        };
        let w = QWeight {
            bits: self.bits,
            exact: self.exact,
            vnni: self.vnni,
            q: &q[q0..q1],
            scale: &scale[c0..c1],
            k,
        };
        if w.scale.len() != n {
            bail!("quantized matmul: {} scales for {n} rows", w.scale.len())
        }
        let mut out = vec![0f32; m * n];
        let mut i0 = 0;
        while i0 < m {
            let i1 = if m <= MAX_ROWS {
                m
            } else {
                (i0 + M_CHUNK).min(m)
            };
            let mc = i1 - i0;
            let xc = &x[i0 * k..i1 * k];
            // integer kernels (16-bit activations) take every row count: the weight row stays in
            // L1 while the quantized inputs stream past it
            let out_t = if m <= MAX_ROWS || vnni_suits(&w) {
                gemv_t(&w, xc, mc, n)
            } else {
                blocked_matmul_t(n, mc, k, xc, |r, dst| w.dequantize_row(r, dst))
            };
            scatter_transposed(&mut out, &out_t, i0, mc, n);
            i0 = i1;
        }
        let storage = f32_to_storage(out, s1.dtype())?;
        Ok((storage, Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Dense f32 weights of a quantized one: exact as the official dequantization (float16),
    /// else `scale * q` in f32.
    fn dense(bits: Bits, exact: bool, q: &[u8], scale: &[f32], n: usize, k: usize) -> Vec<f32> {
        let w = QWeight {
            bits,
            exact,
            vnni: true,
            q,
            scale,
            k,
        };
        let mut out = vec![0f32; n * k];
        for r in 0..n {
            w.dequantize_row(r, &mut out[r * k..(r + 1) * k]);
        }
        out
    }

    #[test]
    fn matches_dequantized_matmul() {
        let dev = Device::Cpu;
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as u8
        };
        for bits in [Bits::Eight, Bits::Four] {
            for (m, n, k) in [
                (1, 37, 64),
                (3, 64, 130),
                (4, 33, 4096),
                (20, 70, 96),
                (300, 9, 34),
            ] {
                let rb = bits.row_bytes(k);
                let q: Vec<u8> = (0..n * rb).map(|_| rnd()).collect();
                let scale: Vec<f32> = (0..n).map(|i| 0.01 + i as f32 * 1e-3).collect();
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let qt = Tensor::from_vec(q.clone(), (n, rb), &dev).unwrap();
                let st = Tensor::from_vec(scale.clone(), n, &dev).unwrap();
                for exact in [true, false] {
                    let wd = Tensor::from_vec(dense(bits, exact, &q, &scale, n, k), (n, k), &dev)
                        .unwrap();
                    let want = x.matmul(&wd.t().unwrap()).unwrap();
                    let got = x
                        .apply_op3_no_bwd(
                            &qt,
                            &st,
                            &QuantMatmul {
                                bits,
                                exact,
                                vnni: true,
                            },
                        )
                        .unwrap();
                    let w = QWeight {
                        bits,
                        exact,
                        vnni: true,
                        q: &q,
                        scale: &scale,
                        k,
                    };
                    if vnni_suits(&w) {
                        // the integer kernels round the activations to int8 (about 0.7% rms
                        // per value for Gaussian inputs): compare root-mean-square errors
                        let rms = |t: &Tensor| {
                            t.sqr()
                                .unwrap()
                                .mean_all()
                                .unwrap()
                                .to_scalar::<f32>()
                                .unwrap()
                                .sqrt()
                        };
                        let rel = rms(&(&got - &want).unwrap()) / rms(&want);
                        assert!(
                            rel < 0.02,
                            "{bits:?} exact={exact} m={m} n={n} k={k}: rms error {rel}"
                        );
                    } else {
                        let err = crate::testing::max_abs_diff(&got, &want);
                        assert!(
                            err < 1e-4 * (k as f32).sqrt(),
                            "{bits:?} exact={exact} m={m} n={n} k={k}: {err}"
                        );
                    }
                }
            }
        }
    }

    /// The integer (VNNI) kernels, where the CPU has them, agree with the float kernels up to
    /// the int8 rounding of the activations.
    #[test]
    fn vnni_kernels_match_float_kernels() {
        let mut seed = 5u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as u8
        };
        for bits in [Bits::Eight, Bits::Four] {
            for (m, n, k) in [(1, 70, 256), (3, 40, 512), (5, 33, 1024)] {
                let rb = bits.row_bytes(k);
                let q: Vec<u8> = (0..n * rb).map(|_| rnd()).collect();
                let scale: Vec<f32> = (0..n).map(|i| 0.01 + i as f32 * 1e-3).collect();
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let w = QWeight {
                    bits,
                    exact: false,
                    vnni: true,
                    q: &q,
                    scale: &scale,
                    k,
                };
                if !vnni_suits(&w) {
                    eprintln!("no AVX-512 VNNI here: integer kernels not tested");
                    return;
                }
                let got = gemv_t(&w, &x, m, n); // [n, m]
                let dense = dense(bits, false, &q, &scale, n, k);
                let mut worst = 0f32;
                let mut big = 0f32;
                for r in 0..n {
                    for i in 0..m {
                        let want: f32 = (0..k).map(|c| dense[r * k + c] * x[i * k + c]).sum();
                        worst = worst.max((got[r * m + i] - want).abs());
                        big = big.max(want.abs());
                    }
                }
                assert!(
                    worst <= 0.01 * big,
                    "{bits:?} m={m} k={k}: error {worst} of {big}"
                );
            }
        }
    }

    #[test]
    fn nibble_order_is_high_then_low() {
        // byte 0x7F: column 0 = 7 (high), column 1 = -1 (low); byte 0x80: -8, 0
        let w = QWeight {
            bits: Bits::Four,
            exact: true,
            vnni: false,
            q: &[0x7F, 0x80],
            scale: &[2.0],
            k: 4,
        };
        let mut row = [0f32; 4];
        w.dequantize_row(0, &mut row);
        assert_eq!(row, [14.0, -2.0, -16.0, 0.0]);
        // products are rounded to float16 as the official dequantization does
        let w = QWeight {
            bits: Bits::Eight,
            exact: true,
            vnni: false,
            q: &[3],
            scale: &[0.1],
            k: 1,
        };
        let mut one = [0f32];
        w.dequantize_row(0, &mut one);
        assert_eq!(one[0], f16::from_f32(0.1f32 * 3.0).to_f32());
        assert_ne!(one[0], 0.1f32 * 3.0);
    }
}
