//! The split (flash-decoding) decode attention against the one-block kernel, on a GPU (feature
//! `cuda`; `scripts/build_wheel.sh --cuda --tests` builds this binary for the device machine), and
//! the fused prefill (`prefill_qkv` + the paged flash kernel) against float64 (last test).
//! Random queries, keys and values of ChatGLM2-6B's attention shapes (32 heads, 2 KV groups,
//! head_dim 128) and of the tiny fixture's (4 heads, 2 groups, head_dim 8), caches of 1 to 20,000
//! entries, one sequence and a batch mixing short and long ones. float32 takes the CUDA-core split
//! kernel and must agree to float32 rounding; bfloat16 / float16 take the tensor-core one, whose
//! probabilities are rounded to 16 bits before the value product (as FlashAttention's): its error
//! against a float64 reference must stay within that of the one-block kernel plus the 16-bit
//! rounding of the output. Both kernels must write the same new key and value into the cache.
//! The caches are paged (`KvPool` blocks, tables interleaved between the sequences of a batch):
//! the split kernel reads blocks of 16 positions, the one-block kernel blocks of 64.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use glm2rs::kernels::cuda::{DecodeAttention, DecodeSeq};
use glm2rs::model::{Cache, KvPool, PoolOptions};
use std::sync::Arc;

struct Case {
    heads: usize,
    groups: usize,
    head_dim: usize,
    lens: Vec<usize>,
}

/// float64 attention of one new token per sequence over `len` cached entries plus itself, from
/// the values the kernels read (q, k, v after bias and rotary, as the kernels round them).
fn reference(q: &[Vec<f64>], keys: &[Vec<f64>], vals: &[Vec<f64>], scale: f64) -> Vec<Vec<f64>> {
    q.iter()
        .map(|qh| {
            let s: Vec<f64> = keys
                .iter()
                .map(|k| qh.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            (0..qh.len())
                .map(|e| w.iter().zip(vals).map(|(wi, v)| wi * v[e]).sum::<f64>() / z)
                .collect()
        })
        .collect()
}

/// Standard-normal values of `shape` as `dtype` on `dev`.
fn random(dev: &Device, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// One new token's `qkv` row per sequence of `case`, and each sequence's cached keys and values
/// (random, `[groups, len, head_dim]`).
fn inputs(dev: &Device, case: &Case, dtype: DType) -> (Tensor, Vec<(Tensor, Tensor)>) {
    let (nh, ng, hd) = (case.heads, case.groups, case.head_dim);
    let qkv = random(dev, &[case.lens.len(), (nh + 2 * ng) * hd], dtype);
    let kv = case
        .lens
        .iter()
        .map(|&len| {
            (
                random(dev, &[1, ng, len, hd], dtype),
                random(dev, &[1, ng, len, hd], dtype),
            )
        })
        .collect();
    (qkv, kv)
}

/// Paged caches in a pool of `block_size`-position blocks holding `kv`, filled a block at a
/// time round-robin (so the tables interleave), each with a block reserved for the new token.
fn paged(
    dev: &Device,
    case: &Case,
    dtype: DType,
    kv: &[(Tensor, Tensor)],
    block_size: usize,
    max_bytes: Option<u64>,
) -> Vec<Cache> {
    let opts = PoolOptions {
        block_size,
        max_bytes,
        ..Default::default()
    };
    let pool =
        Arc::new(KvPool::new(opts, vec![dev.clone()], case.groups, case.head_dim, dtype).unwrap());
    let mut caches: Vec<Cache> = kv
        .iter()
        .map(|_| Cache::new(pool.clone(), 1 << 20))
        .collect();
    loop {
        let mut more = false;
        for (c, (k, v)) in caches.iter_mut().zip(kv) {
            let (len, done) = (k.dim(2).unwrap(), c.len());
            if done < len {
                let n = block_size.min(len - done);
                c.reserve(n).unwrap();
                c.write(
                    0,
                    &k.narrow(2, done, n).unwrap(),
                    &v.narrow(2, done, n).unwrap(),
                )
                .unwrap();
                c.advance(n, true);
                more = true;
            }
        }
        if !more {
            break;
        }
    }
    for c in &mut caches {
        c.reserve(1).unwrap();
    }
    caches
}

/// The kernels' view of `caches` (rotary positions offset by `seed`).
fn decode_seqs(dev: &Device, caches: &mut [Cache], seed: u64) -> Vec<DecodeSeq> {
    caches
        .iter_mut()
        .map(|c| {
            let mut q = c.decode_seq(0, dev).unwrap();
            q.rot = q.len + seed as usize % 7;
            q
        })
        .collect()
}

/// The decode attention of `qkv` over `seqs` (which it writes the new entries into), as f32.
fn attend(dev: &Device, case: &Case, qkv: &Tensor, seqs: &[DecodeSeq], split: bool) -> Vec<f32> {
    // rotary tables of ones and zeros: no rotation (the rotation is the one-block kernel's,
    // checked by the model parity tests); the attention is what differs
    let rot_half = case.head_dim / 4;
    let cos = Tensor::ones((65536, rot_half), qkv.dtype(), dev).unwrap();
    let sin = Tensor::zeros((65536, rot_half), qkv.dtype(), dev).unwrap();
    let op = DecodeAttention {
        seqs,
        table: None,
        bias: None,
        cos: &cos,
        sin: &sin,
        heads: case.heads,
        groups: case.groups,
        head_dim: case.head_dim,
        split,
    };
    host(&qkv.apply_op1_no_bwd(&op).unwrap())
}

/// `t`'s values on the host, flattened, as `E` (f64 for the references, f32 where the kernels'
/// own rounding is compared).
fn host<E: candle_core::WithDType>(t: &Tensor) -> Vec<E> {
    t.to_dtype(E::DTYPE)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn to64(t: &Tensor) -> Vec<f64> {
    host(t)
}

#[test]
fn split_decode_matches_the_one_block_kernel_and_float64() {
    let dev = glm2rs::parse_device("cuda").expect("a CUDA device");
    let cases = [
        Case {
            heads: 32,
            groups: 2,
            head_dim: 128,
            lens: vec![0],
        },
        Case {
            heads: 32,
            groups: 2,
            head_dim: 128,
            lens: vec![77],
        },
        Case {
            heads: 32,
            groups: 2,
            head_dim: 128,
            lens: vec![3000],
        },
        Case {
            heads: 32,
            groups: 2,
            head_dim: 128,
            lens: vec![20_000],
        },
        Case {
            heads: 32,
            groups: 2,
            head_dim: 128,
            lens: vec![2500, 5, 9000, 700, 0, 64],
        },
        Case {
            heads: 4,
            groups: 2,
            head_dim: 8,
            lens: vec![3500, 1, 130],
        },
        // a head_dim that is a multiple of 16 but not of 32: the tensor-core kernel's last block
        // of 32 dimensions is half empty
        Case {
            heads: 8,
            groups: 2,
            head_dim: 80,
            lens: vec![1500, 2, 40],
        },
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (ci, case) in cases.iter().enumerate() {
            let seed = ci as u64;
            candle_core::Device::Cpu.set_seed(seed).ok();
            let (nh, ng, hd) = (case.heads, case.groups, case.head_dim);
            let (qkv, kv) = inputs(&dev, case, dtype);
            // the same inputs through both kernels, each in its own pool
            let mut split_caches = paged(&dev, case, dtype, &kv, 16, None);
            let mut one_caches = paged(&dev, case, dtype, &kv, 64, None);
            let split = attend(
                &dev,
                case,
                &qkv,
                &decode_seqs(&dev, &mut split_caches, seed),
                true,
            );
            let one = attend(
                &dev,
                case,
                &qkv,
                &decode_seqs(&dev, &mut one_caches, seed),
                false,
            );
            // both wrote the new key and value at `len`: the caches agree everywhere
            let mut contents = vec![];
            for (i, (a, b)) in split_caches.iter().zip(&one_caches).enumerate() {
                let what = format!("{dtype:?} case {ci} seq {i}");
                let (ka, va) = a.gather(0, a.len() + 1).unwrap();
                let (kb, vb) = b.gather(0, b.len() + 1).unwrap();
                assert_eq!(to64(&ka), to64(&kb), "{what}: keys written differently");
                assert_eq!(to64(&va), to64(&vb), "{what}: values written differently");
                let (k0, _) = &kv[i];
                let n = k0.dim(2).unwrap();
                if n > 0 {
                    let back = to64(&ka.narrow(2, 0, n).unwrap());
                    assert_eq!(
                        back,
                        to64(k0),
                        "{what}: the cached keys read back as written"
                    );
                }
                contents.push((to64(&kb), to64(&vb), b.len()));
            }
            // float64 reference from the cache contents (new entry included)
            let q = to64(&qkv);
            let width = (nh + 2 * ng) * hd;
            let scale = 1.0 / (hd as f64).sqrt();
            let (mut err_split, mut err_one, mut biggest) = (0f64, 0f64, 0f64);
            for (i, (kk, vv, len)) in contents.iter().enumerate() {
                let cap = len + 1;
                for g in 0..ng {
                    let rows_of = |t: &[f64]| -> Vec<Vec<f64>> {
                        (0..=*len)
                            .map(|p| t[(g * cap + p) * hd..(g * cap + p + 1) * hd].to_vec())
                            .collect()
                    };
                    let r = nh / ng;
                    let qs: Vec<Vec<f64>> = (0..r)
                        .map(|h| {
                            q[i * width + (g * r + h) * hd..i * width + (g * r + h + 1) * hd]
                                .to_vec()
                        })
                        .collect();
                    let want = reference(&qs, &rows_of(kk), &rows_of(vv), scale);
                    for (h, w) in want.iter().enumerate() {
                        for (e, &x) in w.iter().enumerate() {
                            let at = i * nh * hd + (g * r + h) * hd + e;
                            err_split = err_split.max((split[at] as f64 - x).abs());
                            err_one = err_one.max((one[at] as f64 - x).abs());
                            biggest = biggest.max(x.abs());
                        }
                    }
                }
            }
            let eps = match dtype {
                DType::F32 => 1e-5,
                DType::BF16 => 2f64.powi(-8),
                _ => 2f64.powi(-11),
            };
            // one output rounding of |x| <= biggest, plus 16-bit probabilities (relative eps)
            let allowed = err_one + 2.0 * eps * biggest.max(1.0);
            println!(
                "{dtype:?} case {ci} (heads {nh}, groups {ng}, head_dim {hd}, lens {:?}): max err split {err_split:.2e}, one-block {err_one:.2e}, allowed {allowed:.2e}",
                case.lens
            );
            assert!(
                err_split.is_finite() && err_split <= allowed,
                "{dtype:?} case {ci}: split error {err_split} over {allowed}"
            );
        }
    }
}

/// The prefill path of 16-bit models: `prefill_qkv` (bias, rotary, keys and values into the
/// paged cache, queries out) then `flash_prefill_paged` (causal attention through the block
/// table, token-major output), against float64 from the same inputs: the projections rounded as
/// the model stores them (bias added, rounded to the dtype), turned by the rotary tables, and
/// attention of query i (position past + i) over positions 0..=past + i. Caches that already hold
/// `past` entries (a chunked prompt, a cached prefix) in blocks interleaved with another
/// sequence's; rotary positions offset from the cache positions (a P-Tuning prefix).
#[test]
fn fused_prefill_matches_float64() {
    let dev = glm2rs::parse_device("cuda").expect("a CUDA device");
    // (heads, groups, head_dim, past, t, block size): blocks of 16 and 64 are one bulk copy each
    // per key tile half in flash_wgmma, of 256 a copy takes half a block
    let cases = [
        (32, 2, 128, 0, 300, 16),
        (32, 2, 128, 250, 130, 16),
        (32, 2, 128, 1000, 1, 16),
        (4, 2, 64, 37, 70, 16),
        (32, 2, 128, 200, 333, 64),
        (32, 2, 128, 300, 400, 256),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for (ci, &(nh, ng, hd, past, t, bs)) in cases.iter().enumerate() {
            candle_core::Device::Cpu.set_seed(100 + ci as u64).ok();
            let case = Case {
                heads: nh,
                groups: ng,
                head_dim: hd,
                lens: vec![past, 45],
            };
            let (_, kv) = inputs(&dev, &case, dtype);
            // a pool of 8 MiB: slabs of 64 blocks of 16 (4 of 256), so a sequence spans several
            // slabs (each with its own tensor maps in flash_wgmma)
            let mut caches = paged(&dev, &case, dtype, &kv, bs, Some(8 << 20));
            let cache = &mut caches[0];
            cache.reserve(t).unwrap();
            let mut seq = cache.decode_seq(0, &dev).unwrap();
            seq.rot = past + 3; // rotary positions apart from the cache positions
            let width = (nh + 2 * ng) * hd;
            let qkv = random(&dev, &[t, width], dtype);
            let bias = random(&dev, &[width], dtype);
            // the model's rotary tables: angles pos / 10000^(2i / rot) in float32, stored in the dtype
            let rot_half = hd / 4;
            let positions = seq.rot + t;
            let (mut cos, mut sin) = (vec![], vec![]);
            for p in 0..positions {
                for i in 0..rot_half {
                    let a = p as f32 / 10000f32.powf(2.0 * i as f32 / (2 * rot_half) as f32);
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            let table = |v: Vec<f32>| {
                Tensor::from_vec(v, (positions, rot_half), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap()
            };
            let (cos, sin) = (table(cos), table(sin));
            let q =
                glm2rs::kernels::cuda::prefill_qkv(&qkv, Some(&bias), &cos, &sin, &seq, nh, ng, hd)
                    .unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            // both flash kernels: mma.sync, and wgmma (Hopper, head_dim 128; elsewhere the same)
            let outs: Vec<(bool, Tensor)> = [false, true]
                .into_iter()
                .map(|wgmma| {
                    let out = glm2rs::kernels::cuda::flash_prefill_paged(
                        &q,
                        &seq,
                        ng,
                        scale as f32,
                        wgmma,
                    )
                    .unwrap()
                    .expect("the flash kernel takes these shapes");
                    assert_eq!(out.dims(), &[1, t, nh * hd]);
                    (wgmma, out)
                })
                .collect();
            // float64 reference of the projections: bias added and rounded as stored, then turned
            let x = to64(
                &qkv.to_dtype(DType::F32)
                    .unwrap()
                    .broadcast_add(&bias.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            let (c64, s64) = (to64(&cos), to64(&sin));
            let turned = |i: usize, off: usize| -> Vec<f64> {
                let mut y = x[i * width + off..i * width + off + hd].to_vec();
                let pos = seq.rot + i;
                for j in 0..rot_half {
                    let (c, s) = (c64[pos * rot_half + j], s64[pos * rot_half + j]);
                    let (a, b) = (y[2 * j], y[2 * j + 1]);
                    y[2 * j] = a * c - b * s;
                    y[2 * j + 1] = a * s + b * c;
                }
                y
            };
            let eps = if dtype == DType::BF16 {
                2f64.powi(-8)
            } else {
                2f64.powi(-11)
            };
            let what = format!(
                "{dtype:?} case {ci} (heads {nh}, groups {ng}, head_dim {hd}, past {past}, t {t})"
            );
            // queries: one rounding of the turned value
            let qk = to64(&q);
            for h in 0..nh {
                for i in 0..t {
                    let want = turned(i, h * hd);
                    for e in 0..hd {
                        let got = qk[(h * t + i) * hd + e];
                        assert!(
                            (got - want[e]).abs() <= 2.0 * eps * want[e].abs().max(1e-3),
                            "{what}: query {i} head {h} dim {e}: {got} vs {}",
                            want[e]
                        );
                    }
                }
            }
            // the cache: the old entries untouched, the new keys turned, the new values as stored
            let (kc, vc) = cache.gather(0, past + t).unwrap(); // [1, ng, past + t, hd]
            let (kc, vc) = (to64(&kc), to64(&vc));
            // (an empty tensor has nothing to read back: candle's cast of it is an invalid launch)
            let old_k = if past > 0 { to64(&kv[0].0) } else { vec![] };
            let cap = past + t;
            for g in 0..ng {
                for p in 0..past {
                    for e in 0..hd {
                        assert_eq!(
                            kc[(g * cap + p) * hd + e],
                            old_k[(g * past + p) * hd + e],
                            "{what}: old key"
                        );
                    }
                }
                for i in 0..t {
                    let want_k = turned(i, (nh + g) * hd);
                    for e in 0..hd {
                        let at = (g * cap + past + i) * hd + e;
                        assert!(
                            (kc[at] - want_k[e]).abs() <= 2.0 * eps * want_k[e].abs().max(1e-3),
                            "{what}: key {i} group {g} dim {e}"
                        );
                        assert_eq!(
                            vc[at],
                            x[i * width + (nh + ng + g) * hd + e],
                            "{what}: value {i}"
                        );
                    }
                }
            }
            // attention from what the kernel reads (its queries, the cache), causal
            for (wgmma, out) in &outs {
                let o = to64(out);
                let (mut err, mut biggest) = (0f64, 0f64);
                let r = nh / ng;
                for h in 0..nh {
                    let g = h / r;
                    let rows = |c: &[f64], n: usize| -> Vec<Vec<f64>> {
                        (0..n)
                            .map(|p| c[(g * cap + p) * hd..(g * cap + p + 1) * hd].to_vec())
                            .collect()
                    };
                    for i in 0..t {
                        let n = past + i + 1;
                        let qi = vec![qk[(h * t + i) * hd..(h * t + i + 1) * hd].to_vec()];
                        let want = reference(&qi, &rows(&kc, n), &rows(&vc, n), scale);
                        for (e, &w) in want[0].iter().enumerate() {
                            err = err.max((o[(i * nh + h) * hd + e] - w).abs());
                            biggest = biggest.max(w.abs());
                        }
                    }
                }
                // 16-bit probabilities before the value product and one output rounding
                let allowed = 3.0 * eps * biggest.max(1.0);
                println!(
                    "{what} wgmma {wgmma}: max attention error {err:.2e}, allowed {allowed:.2e}"
                );
                assert!(
                    err.is_finite() && err <= allowed,
                    "{what} wgmma {wgmma}: attention error {err} over {allowed}"
                );
            }
        }
    }
}

/// `x` rounded to `dtype` (float32 stays as it is).
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `v` on the GPU as a contiguous `shape` tensor starting `offset` elements into its buffer
/// (offset 1: not 16-byte aligned, the kernels' element-wise path).
fn on_gpu_at(dev: &Device, v: &[f32], shape: &[usize], offset: usize, dtype: DType) -> Tensor {
    let mut buf = vec![0f32; offset];
    buf.extend_from_slice(v);
    Tensor::from_vec(buf, v.len() + offset, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
        .narrow(0, offset, v.len())
        .unwrap()
        .reshape(shape)
        .unwrap()
}

/// The SwiGLU and add + RMSNorm kernels, 16-byte accesses (aligned rows of a multiple of 16
/// bytes) and element by element (an odd width, or a buffer offset by one element), against the
/// rounding they document, computed here: swiglu rounds silu(gate) to the dtype before the
/// product (as candle's silu then mul); add_rmsnorm rounds h = a + b, then y = h / rms(h) * w
/// (statistics in float32). Both paths must give the same values where the data are the same.
#[test]
fn swiglu_and_add_rmsnorm_match_their_rounding() {
    let dev = glm2rs::parse_device("cuda").expect("a CUDA device");
    let ulp = |dtype: DType| match dtype {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 1e-6,
    };
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        candle_core::Device::Cpu.set_seed(7).ok();
        // swiglu: (rows, f)
        for &(rows, f) in &[(37usize, 1024usize), (5, 1001), (3, 13696)] {
            let x: Vec<f32> = host::<f32>(
                &Tensor::randn(0f32, 2f32, rows * 2 * f, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            let mut outs = vec![];
            for offset in [0, 1] {
                let t = on_gpu_at(&dev, &x, &[rows, 2 * f], offset, dtype);
                let y = t.apply_op1_no_bwd(&glm2rs::kernels::cuda::SwiGlu).unwrap();
                assert_eq!(y.dims(), &[rows, f]);
                outs.push(host::<f32>(&y));
            }
            assert_eq!(
                outs[0], outs[1],
                "{dtype:?} swiglu {rows}x{f}: vector and element paths differ"
            );
            for r in 0..rows {
                for c in 0..f {
                    let (g, u) = (x[r * 2 * f + c], x[r * 2 * f + f + c]);
                    let sa = round_to(dtype, g / (1.0 + (-g).exp()));
                    let want = round_to(dtype, sa * u);
                    let got = outs[0][r * f + c];
                    // __expf may move silu by one rounding step of the dtype
                    let tol = 2.0 * ulp(dtype) * want.abs().max(sa.abs() * u.abs()) + 1e-6;
                    assert!(
                        (got - want).abs() <= tol,
                        "{dtype:?} swiglu {rows}x{f} [{r},{c}]: {got} vs {want}"
                    );
                }
            }
        }
        // add_rmsnorm: (rows, n); n / 8 > 1024 reads rows back
        for &(rows, n) in &[(6usize, 4096usize), (3, 1001), (2, 16384)] {
            let rnd = |v: Vec<f32>| {
                host::<f32>(
                    &Tensor::from_vec(v, n * rows, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
            };
            let a = rnd(host::<f32>(
                &Tensor::randn(0f32, 1f32, rows * n, &Device::Cpu).unwrap(),
            ));
            let b = rnd(host::<f32>(
                &Tensor::randn(0f32, 1f32, rows * n, &Device::Cpu).unwrap(),
            ));
            let w: Vec<f32> = host::<f32>(
                &Tensor::randn(1f32, 0.1f32, n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            let wt = on_gpu_at(&dev, &w, &[n], 0, dtype);
            let mut outs = vec![];
            for offset in [0, 1] {
                let at = on_gpu_at(&dev, &a, &[rows, n], offset, dtype);
                let bt = on_gpu_at(&dev, &b, &[rows, n], 0, dtype);
                let (h, y) = glm2rs::kernels::cuda::add_rmsnorm(&at, Some(&bt), &wt, 1e-5).unwrap();
                outs.push((host::<f32>(&h), host::<f32>(&y)));
            }
            assert_eq!(
                outs[0].0, outs[1].0,
                "{dtype:?} add_rmsnorm {rows}x{n}: h differs between the paths"
            );
            for r in 0..rows {
                let h: Vec<f32> = (0..n)
                    .map(|i| round_to(dtype, a[r * n + i] + b[r * n + i]))
                    .collect();
                let ms = h.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                for (k, (hs, ys)) in outs.iter().enumerate() {
                    for i in 0..n {
                        assert_eq!(
                            hs[r * n + i],
                            h[i],
                            "{dtype:?} add_rmsnorm {rows}x{n} path {k}: h[{r},{i}]"
                        );
                        let want = h[i] as f64 * inv * w[i] as f64;
                        let got = ys[r * n + i] as f64;
                        let tol = ulp(dtype) as f64 * want.abs() + 1e-5 * want.abs() + 1e-7;
                        assert!(
                            (got - want).abs() <= tol,
                            "{dtype:?} add_rmsnorm {rows}x{n} path {k}: y[{r},{i}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
