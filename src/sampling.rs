//! Choosing the next token from logits, with transformers' semantics and order:
//! repetition penalty (also in greedy mode), then temperature, top-k and top-p when sampling.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Sample (`true`) or take the most likely token (`false`).
    pub do_sample: bool,
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p`.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// > 1 discourages tokens already in the sequence (prompt included), as transformers.
    pub repetition_penalty: f64,
    /// Seed of the sampler: the same seed gives the same tokens. `None`: from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid(format!(
                "temperature must be > 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// A sampler with its own random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        let rng = match cfg.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Ok(Self { cfg, rng })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// Pick the next token from `logits` (one row, f32) given every id of the sequence so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        // official InvalidScoreLogitsProcessor: NaN/inf scores would poison sampling
        if any_non_finite(logits) {
            for x in logits.iter_mut() {
                *x = 0.0;
            }
            if logits.len() > 5 {
                logits[5] = 5e4;
            }
        }
        apply_repetition_penalty(logits, history, self.cfg.repetition_penalty as f32);
        if !self.cfg.do_sample {
            return argmax(logits);
        }
        let t = self.cfg.temperature as f32;
        if t != 1.0 {
            for x in logits.iter_mut() {
                *x /= t;
            }
        }
        let n = logits.len();
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weight = |i: u32| ((logits[i as usize] - m) as f64).exp();
        let top_k = if self.cfg.top_k > 0 && self.cfg.top_k < n {
            self.cfg.top_k
        } else {
            0
        };
        if top_k == 0 && self.cfg.top_p >= 1.0 {
            // the whole distribution: no ordering needed
            let w: Vec<f64> = (0..n as u32).map(weight).collect();
            return draw(&mut self.rng, (0..n as u32).zip(w));
        }
        // Candidates by logit, descending (ties: lower id first); only as many are ordered as
        // the cut needs (a partial selection, grown when the nucleus is wider). Keys sort as
        // plain integers: the logit's bits in descending order, then the id.
        let keys: Vec<u64> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let b = x.to_bits();
                let ascending = if b & 0x8000_0000 != 0 {
                    !b
                } else {
                    b | 0x8000_0000
                };
                ((!ascending as u64) << 32) | i as u64
            })
            .collect();
        let top = |k: usize| -> Vec<u32> {
            let mut ks = keys.clone();
            if k < n {
                ks.select_nth_unstable(k - 1);
                ks.truncate(k);
            }
            ks.sort_unstable();
            ks.into_iter().map(|key| key as u32).collect()
        };
        let by_logit = |a: &u32, b: &u32| keys[*a as usize].cmp(&keys[*b as usize]);
        // top-k: transformers keeps every token whose logit is >= the k-th largest
        let (pool, total) = if top_k > 0 {
            let kth = logits[top(top_k)[top_k - 1] as usize];
            let mut keep: Vec<u32> = (0..n as u32)
                .filter(|&i| logits[i as usize] >= kth)
                .collect();
            keep.sort_by(by_logit);
            let total: f64 = keep.iter().map(|&i| weight(i)).sum();
            (Some(keep), total)
        } else {
            (None, (0..n as u32).map(weight).sum::<f64>())
        };
        if self.cfg.top_p >= 1.0 {
            let keep = pool.expect("top-k set");
            let w: Vec<f64> = keep.iter().map(|&i| weight(i)).collect();
            return draw(&mut self.rng, keep.into_iter().zip(w));
        }
        // top-p: the shortest run of most likely tokens whose probability reaches top_p
        let target = self.cfg.top_p * total;
        let mut k = 64.min(n);
        loop {
            let order = match &pool {
                Some(p) => p.clone(),
                None => top(k),
            };
            let mut acc = 0.0;
            let mut cut = None;
            for (j, &i) in order.iter().enumerate() {
                acc += weight(i);
                if acc >= target {
                    cut = Some(j + 1);
                    break;
                }
            }
            let complete = pool.is_some() || k >= n;
            if let Some(c) = cut.or(complete.then_some(order.len())) {
                let kept = &order[..c.max(1)];
                let w: Vec<f64> = kept.iter().map(|&i| weight(i)).collect();
                return draw(&mut self.rng, kept.iter().copied().zip(w));
            }
            k = (k * 4).min(n);
        }
    }
}

/// Draw one id from (id, weight) pairs with probability proportional to the weight.
fn draw(rng: &mut rand::rngs::StdRng, items: impl Iterator<Item = (u32, f64)> + Clone) -> u32 {
    let total: f64 = items.clone().map(|(_, w)| w).sum();
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (id, w) in items {
        acc += w;
        last = id;
        if u < acc {
            return id;
        }
    }
    last
}

/// The index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    // The largest value first, over 8 independent lanes (the compiler keeps them in one vector
    // register: a vocabulary row of 65,024 scores per token and sequence), then its first
    // position. NaN is never larger: a row with no value above -inf gives 0 like the scalar scan.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            if x > *l {
                *l = x;
            }
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(rest) {
        if x > m {
            m = x;
        }
    }
    if m == f32::NEG_INFINITY || xs.first().is_some_and(|x| x.is_nan()) {
        // the scalar scan's answer for the corner cases (every value -inf, or a leading NaN
        // that nothing compares above)
        let mut best = 0;
        for (i, &x) in xs.iter().enumerate() {
            if x > xs[best] {
                best = i;
            }
        }
        return best as u32;
    }
    xs.iter().position(|&x| x == m).unwrap_or(0) as u32
}

/// Whether any value is NaN or infinite (a branch-free pass: no early exit, vectorised).
fn any_non_finite(xs: &[f32]) -> bool {
    xs.iter().fold(0u32, |acc, x| {
        acc | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    }) != 0
}

/// transformers' RepetitionPenaltyLogitsProcessor: each id seen gets its score divided by the
/// penalty if positive, multiplied if negative.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &id in history {
        let i = id as usize;
        if i < logits.len() && seen.insert(i) {
            let x = logits[i];
            logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn argmax_matches_the_scalar_scan_first_index_on_ties() {
        fn scalar(xs: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] {
                    best = i;
                }
            }
            best as u32
        }
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![1.0],
            vec![f32::NEG_INFINITY; 13],
            vec![f32::NAN, 1.0, 2.0],
            vec![1.0, f32::NAN, 3.0, 3.0, 2.0],
            vec![0.5; 20],
        ];
        let mut seed = 7u32;
        for n in [7usize, 8, 9, 64, 65_024] {
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 12) % 1000) as f32 / 7.0 // ties are common
                })
                .collect();
            rows.push(row);
        }
        for row in &rows {
            if row.is_empty() {
                assert_eq!(argmax(row), 0);
                continue;
            }
            assert_eq!(argmax(row), scalar(row), "{:?}", &row[..row.len().min(10)]);
        }
        assert!(any_non_finite(&[1.0, f32::INFINITY]) && any_non_finite(&[f32::NAN]));
        assert!(!any_non_finite(&[1.0, -3.0, f32::MAX, f32::MIN_POSITIVE]));
    }

    use super::*;

    fn cfg(do_sample: bool) -> SamplingConfig {
        SamplingConfig {
            do_sample,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_first_on_ties() {
        let mut s = Sampler::new(cfg(false)).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..cfg(false)
        })
        .unwrap();
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0], &[1, 1]), 2);
        let mut l = [-2.0f32, 4.0];
        apply_repetition_penalty(&mut l, &[0, 1], 2.0);
        assert_eq!(l, [-4.0, 2.0]);
    }

    #[test]
    fn same_seed_same_tokens_and_distribution_is_respected() {
        let logits: Vec<f32> = vec![0.0, (3.0f32).ln(), f32::NEG_INFINITY.max(-30.0)];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingConfig {
                seed: Some(seed),
                ..cfg(true)
            })
            .unwrap();
            (0..4000)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "p(1) = {ones}");
        assert!(!a.contains(&2));
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = vec![2.0f32, 1.9, 1.8, -5.0];
        let mut s = Sampler::new(SamplingConfig {
            top_k: 1,
            ..cfg(true)
        })
        .unwrap();
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
        // probabilities ~ [0.367, 0.332, 0.300, 0.0003]: top_p 0.5 keeps the first two only
        let mut s = Sampler::new(SamplingConfig {
            top_p: 0.5,
            ..cfg(true)
        })
        .unwrap();
        let seen: std::collections::HashSet<u32> = (0..500)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        assert_eq!(seen, [0u32, 1].into_iter().collect());
    }

    /// The nucleus the sampler draws from equals the one of a full sort, on random logits,
    /// wide and peaked, with and without top-k.
    #[test]
    fn partial_selection_keeps_the_full_sort_nucleus() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for case in 0..40 {
            let n = 2000;
            let spread = [0.1f32, 1.0, 5.0, 20.0][case % 4];
            let logits: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * spread).collect();
            let top_p = [0.3, 0.8, 0.95, 0.999][case / 4 % 4];
            let top_k = if case % 3 == 0 { 50 } else { 0 };
            // reference: full sort, keep the shortest prefix reaching top_p
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by(|&a, &b| {
                logits[b as usize]
                    .partial_cmp(&logits[a as usize])
                    .unwrap()
                    .then(a.cmp(&b))
            });
            if top_k > 0 {
                let kth = logits[order[top_k - 1] as usize];
                order.retain(|&i| logits[i as usize] >= kth);
            }
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = order
                .iter()
                .map(|&i| ((logits[i as usize] - m) as f64).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            let mut keep = order.len();
            for (j, x) in w.iter().enumerate() {
                acc += x;
                if acc >= top_p * total {
                    keep = j + 1;
                    break;
                }
            }
            let allowed: std::collections::HashSet<u32> = order[..keep].iter().copied().collect();
            let mut s = Sampler::new(SamplingConfig {
                top_p,
                top_k,
                seed: Some(case as u64),
                ..cfg(true)
            })
            .unwrap();
            let seen: std::collections::HashSet<u32> = (0..300)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect();
            assert!(
                seen.is_subset(&allowed),
                "case {case}: drew outside the nucleus"
            );
            if keep <= 3 {
                assert_eq!(seen, allowed, "case {case}: a small nucleus is drawn whole");
            }
        }
    }

    #[test]
    fn invalid_parameters_are_errors() {
        for bad in [
            SamplingConfig {
                temperature: 0.0,
                ..cfg(true)
            },
            SamplingConfig {
                top_p: 0.0,
                ..cfg(true)
            },
            SamplingConfig {
                top_p: 1.5,
                ..cfg(true)
            },
            SamplingConfig {
                repetition_penalty: -1.0,
                ..cfg(true)
            },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
    }
}
