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
    /// (slab, element offset) of group `g` at position `p` of a sequence with table `blocks`.
    fn at(&self, blocks: &[u32], p: usize, g: usize) -> (usize, usize) {
        let b = blocks[p / self.block_size] as usize;
        let row = (b % self.slab_blocks) * self.block_size + p % self.block_size;
        (
            b / self.slab_blocks,
            (row * self.groups + g) * self.head_dim,
        )
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Attention of `q` (`[heads, head_dim]` f32) over the first `n` positions of the sequence with
/// block table `blocks`: `[heads, head_dim]` f32. Heads `h` use KV group `h / (heads / groups)`.
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
    let outs: Vec<(usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(g, h0, h1)| {
            let nh = h1 - h0;
            let first = g * r + h0; // first head of the run
            let qs = &q[first * d..(first + nh) * d];
            let mut row = vec![0f32; d];
            let mut scores = vec![0f32; nh * n];
            for p in 0..n {
                let (slab, at) = layer.at(blocks, p, g);
                layer.k[slab].widen(at, &mut row);
                for h in 0..nh {
                    scores[h * n + p] = dot(&qs[h * d..(h + 1) * d], &row) * scale;
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
            for p in 0..n {
                let (slab, at) = layer.at(blocks, p, g);
                layer.v[slab].widen(at, &mut row);
                for h in 0..nh {
                    let w = scores[h * n + p];
                    for (o, x) in out[h * d..(h + 1) * d].iter_mut().zip(&row) {
                        *o += w * x;
                    }
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
        let (groups, d, bs, sb, heads) = (2, 8, 4, 2, 6);
        let slabs = 3;
        let rows = slabs * sb * bs;
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
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
        let layer = PagedLayer {
            k: kdata.iter().map(|v| Rows::F32(v)).collect(),
            v: vdata.iter().map(|v| Rows::F32(v)).collect(),
            block_size: bs,
            slab_blocks: sb,
            groups,
            head_dim: d,
        };
        let blocks = [5u32, 0, 3, 2];
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
                    "head {h} dim {e}: {} vs {want}",
                    got[h * d + e]
                );
            }
        }
    }
}
