//! CPU decode attention over the paged KV cache: one new query per head attends to every key and
//! value of its sequence, read in place from the pool's slabs through the block table (no gathered
//! copy of the cache per layer and step). Scores, softmax and the weighted sum are float32, as the
//! reference attention's. Work is split over rayon's threads by (KV group, run of heads): each
//! task reads its group's keys and values once for all of its heads (multi-query attention).

use half::{bf16, f16};
use rayon::prelude::*;

/// One slab's keys or values (`[rows, groups, head_dim]`) as stored.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Rows<'_> {
    /// `out.len()` values from element `at` as f32.
    fn widen(&self, at: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Rows::F32(v) => out.copy_from_slice(&v[at..at + n]),
            Rows::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[at..at + n]) {
                    *o = x.to_f32();
                }
            }
            Rows::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[at..at + n]) {
                    *o = x.to_f32();
                }
            }
        }
    }
}

/// A layer of the paged cache as the kernel reads it (see `crate::model::kv_pool` for the layout).
pub struct PagedLayer<'a> {
    /// Per slab: keys, values.
    pub k: Vec<Rows<'a>>,
    pub v: Vec<Rows<'a>>,
    pub block_size: usize,
    pub slab_blocks: usize,
    pub groups: usize,
    pub head_dim: usize,
}

impl PagedLayer<'_> {
    /// Runs of the first `n` positions of a sequence with table `blocks` that lie one after
    /// another in a slab: (first position, positions, slab, first row).
    fn runs(&self, blocks: &[u32], n: usize) -> Vec<(usize, usize, usize, usize)> {
        let bs = self.block_size;
        let mut out: Vec<(usize, usize, usize, usize)> = Vec::new();
        for (i, &b) in blocks.iter().take(n.div_ceil(bs)).enumerate() {
            let b = b as usize;
            let (p0, len) = (i * bs, bs.min(n - i * bs));
            let (slab, row) = (b / self.slab_blocks, (b % self.slab_blocks) * bs);
            match out.last_mut() {
                Some(r) if r.2 == slab && r.3 + r.1 == row && r.0 + r.1 == p0 => r.1 += len,
                _ => out.push((p0, len, slab, row)),
            }
        }
        out
    }

    /// `rows` positions of group `g` from row `row` of `src` as an f32 matrix: its address and
    /// row stride (the slab itself for f32, else widened into `buf`).
    fn matrix(
        &self,
        src: Rows<'_>,
        row: usize,
        rows: usize,
        g: usize,
        buf: &mut Vec<f32>,
    ) -> (*const f32, usize) {
        let (d, stride) = (self.head_dim, self.groups * self.head_dim);
        let at = row * stride + g * d;
        match src {
            Rows::F32(v) => (v[at..at + (rows - 1) * stride + d].as_ptr(), stride),
            other => {
                buf.resize(rows * d, 0.0);
                for r in 0..rows {
                    other.widen(at + r * stride, &mut buf[r * d..(r + 1) * d]);
                }
                (buf.as_ptr(), d)
            }
        }
    }
}

/// Attention of `q` (`[heads, head_dim]` f32) over the first `n` positions of the sequence with
/// block table `blocks`: `[heads, head_dim]` f32. Heads `h` use KV group `h / (heads / groups)`.
/// Per task, the scores of its heads against each run of positions and the weighted sum of the
/// values are small matrix products (the `gemm` crate) on the slab rows in place.
pub fn decode(
    layer: &PagedLayer<'_>,
    blocks: &[u32],
    n: usize,
    q: &[f32],
    heads: usize,
    scale: f32,
) -> Vec<f32> {
    let (groups, d) = (layer.groups, layer.head_dim);
    let r = heads / groups;
    // enough tasks for every thread, each a run of one group's heads
    let parts = rayon::current_num_threads()
        .div_ceil(groups)
        .clamp(1, r.max(1));
    let per = r.div_ceil(parts);
    let tasks: Vec<(usize, usize, usize)> = (0..groups)
        .flat_map(|g| {
            (0..r)
                .step_by(per)
                .map(move |h0| (g, h0, (h0 + per).min(r)))
        })
        .collect();
    let runs = layer.runs(blocks, n);
    let outs: Vec<(usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(g, h0, h1)| {
            let nh = h1 - h0;
            let first = g * r + h0; // first head of the run
            let qs = &q[first * d..(first + nh) * d];
            let mut scores = vec![0f32; nh * n]; // [nh, n]
            let mut buf = Vec::new();
            for &(p0, len, slab, row) in &runs {
                let (k, ks) = layer.matrix(layer.k[slab], row, len, g, &mut buf);
                // scores[:, p0..p0 + len] = scale * qs [nh, d] . K^T [d, len]
                // SAFETY: every pointer covers the extent given to gemm.
                unsafe {
                    gemm::gemm(
                        nh,
                        len,
                        d,
                        scores.as_mut_ptr().add(p0),
                        1,
                        n as isize,
                        false,
                        qs.as_ptr(),
                        1,
                        d as isize,
                        k,
                        ks as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
            let mut sums = vec![0f32; nh];
            for (h, s) in scores.chunks_mut(n.max(1)).enumerate().take(nh) {
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - m).exp();
                    z += *x;
                }
                sums[h] = z;
            }
            let mut out = vec![0f32; nh * d];
            for &(p0, len, slab, row) in &runs {
                let (v, vs) = layer.matrix(layer.v[slab], row, len, g, &mut buf);
                // out [nh, d] += scores[:, p0..p0 + len] . V [len, d]
                // SAFETY: every pointer covers the extent given to gemm.
                unsafe {
                    gemm::gemm(
                        nh,
                        d,
                        len,
                        out.as_mut_ptr(),
                        1,
                        d as isize,
                        true,
                        scores.as_ptr().add(p0),
                        1,
                        n as isize,
                        v,
                        1,
                        vs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
            for h in 0..nh {
                let inv = 1.0 / sums[h];
                for o in &mut out[h * d..(h + 1) * d] {
                    *o *= inv;
                }
            }
            (first, out)
        })
        .collect();
    let mut y = vec![0f32; heads * d];
    for (first, out) in outs {
        y[first * d..first * d + out.len()].copy_from_slice(&out);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a direct float64 computation, on a table whose blocks are out of order and in two
    /// slabs.
    #[test]
    fn matches_float64_through_a_shuffled_table() {
        for bf in [false, true] {
            check(bf);
        }
    }

    /// float32 rows, or bfloat16 (the reference computed from the rounded values).
    fn check(bf: bool) {
        let (groups, d, bs, sb, heads) = (2, 8, 4, 2, 6);
        let slabs = 3;
        let rows = slabs * sb * bs;
        let round = |x: f32| if bf { bf16::from_f32(x).to_f32() } else { x };
        let val = |i: usize| round(((i * 7919 % 1000) as f32 / 500.0) - 1.0);
        let kdata: Vec<Vec<f32>> = (0..slabs)
            .map(|s| {
                (0..rows / slabs * groups * d)
                    .map(|i| val(i + s * 100_000))
                    .collect()
            })
            .collect();
        let vdata: Vec<Vec<f32>> = (0..slabs)
            .map(|s| {
                (0..rows / slabs * groups * d)
                    .map(|i| val(i * 3 + s * 7 + 1))
                    .collect()
            })
            .collect();
        let to16 = |v: &Vec<Vec<f32>>| -> Vec<Vec<bf16>> {
            v.iter()
                .map(|s| s.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect()
        };
        let (k16, v16) = (to16(&kdata), to16(&vdata));
        let layer = PagedLayer {
            k: if bf {
                k16.iter().map(|v| Rows::BF16(v)).collect()
            } else {
                kdata.iter().map(|v| Rows::F32(v)).collect()
            },
            v: if bf {
                v16.iter().map(|v| Rows::BF16(v)).collect()
            } else {
                vdata.iter().map(|v| Rows::F32(v)).collect()
            },
            block_size: bs,
            slab_blocks: sb,
            groups,
            head_dim: d,
        };
        // out of order, in two slabs, with an adjacent pair (2, 3) read as one run
        let blocks = [5u32, 0, 2, 3];
        let n = 14;
        let q: Vec<f32> = (0..heads * d).map(|i| val(i * 13 + 5)).collect();
        let scale = 0.3;
        let got = decode(&layer, &blocks, n, &q, heads, scale);
        let r = heads / groups;
        for h in 0..heads {
            let g = h / r;
            let pos = |p: usize| {
                let b = blocks[p / bs] as usize;
                let row = (b % sb) * bs + p % bs;
                (b / sb, (row * groups + g) * d)
            };
            let s: Vec<f64> = (0..n)
                .map(|p| {
                    let (sl, at) = pos(p);
                    (0..d)
                        .map(|e| q[h * d + e] as f64 * kdata[sl][at + e] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for e in 0..d {
                let want: f64 = (0..n)
                    .map(|p| {
                        let (sl, at) = pos(p);
                        w[p] * vdata[sl][at + e] as f64
                    })
                    .sum::<f64>()
                    / z;
                let diff = (got[h * d + e] as f64 - want).abs();
                assert!(
                    diff < 1e-5,
                    "bf16 {bf} head {h} dim {e}: {} vs {want}",
                    got[h * d + e]
                );
            }
        }
    }
}
