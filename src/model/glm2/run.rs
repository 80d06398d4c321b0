//! A step's inputs checked and run: several sequences in one forward, a prompt longer than
//! `Tuning::prefill_chunk` in pieces that read the earlier ones from the cache, a single token
//! through the CUDA graph.

use super::{Glm2Model, Logits};
use crate::error::{Error, Result};
use crate::model::kv_cache::Cache;
use candle_core::Tensor;

impl Glm2Model {
    /// One step of every sequence's next ids (each continuing its cache): the inputs checked,
    /// prompts longer than `Tuning::prefill_chunk` in pieces, a single token through the CUDA
    /// graph where it applies; the caches advance. The logits (`which`) and each sequence's
    /// `(first row, rows)` in the step.
    pub(super) fn run(
        &self,
        inputs: &[&[u32]],
        caches: &mut [&mut Cache],
        which: Logits,
    ) -> Result<(Tensor, Vec<(usize, usize)>)> {
        if inputs.len() != caches.len() {
            return Err(Error::invalid(format!(
                "{} inputs but {} caches",
                inputs.len(),
                caches.len()
            )));
        }
        if inputs.is_empty() {
            return Err(Error::invalid("forward needs at least one sequence"));
        }
        let vocab = self.config.padded_vocab_size;
        let mut segments = Vec::with_capacity(inputs.len());
        let mut flat = Vec::with_capacity(inputs.iter().map(|i| i.len()).sum());
        for (ids, cache) in inputs.iter().zip(caches.iter()) {
            if ids.is_empty() {
                return Err(Error::invalid("forward needs at least one token"));
            }
            if cache.position() + ids.len() > self.config.seq_length {
                return Err(Error::invalid(format!(
                    "sequence of {} tokens exceeds the model context of {} (seq_length)",
                    cache.position() + ids.len(),
                    self.config.seq_length
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary (padded_vocab_size {vocab})"
                )));
            }
            segments.push((flat.len(), ids.len()));
            flat.extend_from_slice(ids);
        }
        let chunk = self.tuning.prefill_chunk;
        if chunk > 0 && inputs.iter().any(|i| i.len() > chunk) {
            let logits = self.run_in_chunks(inputs, caches, which, chunk)?;
            return Ok((logits, segments));
        }
        let n = flat.len();
        for (cache, &(_, t)) in caches.iter_mut().zip(&segments) {
            cache.reserve(t)?;
        }
        #[cfg(feature = "cuda")]
        if which == Logits::Last && n == 1 && caches[0].adapter().is_none() {
            if let Some(logits) = self.graph_step(flat[0], &mut *caches[0])? {
                return Ok((logits, segments));
            }
        }
        let input = Tensor::from_vec(flat, (1, n), &self.device)?;
        let logits = self.forward_ids(&input, &segments, caches, which, None)?;
        for (cache, ids) in caches.iter_mut().zip(inputs) {
            cache.advance_tokens(ids);
        }
        Ok((logits, segments))
    }

    /// [`Glm2Model::run`] for inputs of which some are longer than `chunk`: passes that each take
    /// the next `chunk` ids (at most) of every sequence with ids left, so no pass holds the
    /// activations of more than `chunk` positions of one sequence (a 32K prompt in 8K pieces
    /// reading the earlier pieces from its cache). The logits rows are those of one pass.
    fn run_in_chunks(
        &self,
        inputs: &[&[u32]],
        caches: &mut [&mut Cache],
        which: Logits,
        chunk: usize,
    ) -> Result<Tensor> {
        let mut done = vec![0usize; inputs.len()];
        let mut rows: Vec<Vec<Tensor>> = vec![vec![]; inputs.len()];
        loop {
            let idx: Vec<usize> = (0..inputs.len())
                .filter(|&i| done[i] < inputs[i].len())
                .collect();
            if idx.is_empty() {
                break;
            }
            let pieces: Vec<&[u32]> = idx
                .iter()
                .map(|&i| &inputs[i][done[i]..(done[i] + chunk).min(inputs[i].len())])
                .collect();
            let mut sub: Vec<&mut Cache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| idx.contains(i))
                .map(|(_, c)| &mut **c)
                .collect();
            let (logits, segs) = self.run(&pieces, &mut sub, which)?;
            let mut row = 0;
            for (&i, &(_, t)) in idx.iter().zip(&segs) {
                let n = if which == Logits::Last { 1 } else { t };
                let last = done[i] + t == inputs[i].len();
                if which == Logits::All || last {
                    rows[i].push(logits.narrow(0, row, n)?);
                }
                row += n;
                done[i] += t;
            }
        }
        let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
        Ok(Tensor::cat(&rows, 0)?)
    }
}
