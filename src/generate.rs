//! One sequence being generated: its cache, its sampler and its stop rules.
//! A [`Generator`] owns everything that changes while generating; the model is shared.

use crate::error::{Error, Result};
use crate::model::{Cache, Glm2Model, Logits};
use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::{TextStream, Tokenizer};
use candle_core::Tensor;
use std::sync::Arc;

/// Used when neither `max_new_tokens` nor `max_length` is given.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// Everything that shapes one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate (the eos included).
    pub max_new_tokens: Option<usize>,
    /// Most tokens of prompt plus output, as the official code's `max_length`.
    pub max_length: Option<usize>,
    pub sampling: SamplingConfig,
    /// Ids that end generation besides the model's eos (kept as the last id, as eos is).
    pub stop_token_ids: Vec<u32>,
    /// Texts that end generation; the text stops before the first occurrence.
    pub stop_strings: Vec<String>,
    /// Record each generated token's log-probability and this many most likely alternatives
    /// (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// The LoRA adapter (loaded beside the weights, by name) to generate with; `None`: the
    /// model as given.
    pub adapter: Option<String>,
}

/// Most alternatives [`GenerationConfig::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability: `log_softmax` of the model's logits at that step (before
/// temperature, top-p or penalties), and the most likely tokens there, the likeliest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` and the `k` likeliest tokens of a row of logits.
pub fn row_logprobs(row: &[f32], token: u32, k: usize) -> TokenLogprob {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + row
        .iter()
        .map(|&x| ((x - m) as f64).exp())
        .sum::<f64>()
        .ln() as f32;
    let k = k.min(row.len());
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
    }
    idx.truncate(k);
    idx.sort_by(by);
    TokenLogprob {
        token,
        logprob: row[token as usize] - lse,
        top: idx
            .into_iter()
            .map(|i| (i, row[i as usize] - lse))
            .collect(),
    }
}

/// The defaults of a generation's sampling and length, per kind of request: defined once here,
/// used by the Python bindings and the HTTP server alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub max_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// Plain generation (`stream`, `generate`, ...): greedy, as transformers' `generate`.
    pub const PLAIN: Self = Self {
        do_sample: false,
        temperature: 1.0,
        top_p: 1.0,
        max_length: None,
        max_new_tokens: None,
    };
    /// The official `chat` / `stream_chat` (and `/v1/chat/completions`): sampling with top_p
    /// 0.8 and temperature 0.8, `max_length` 8192 (capped at the model's context).
    pub const CHAT: Self = Self {
        do_sample: true,
        temperature: 0.8,
        top_p: 0.8,
        max_length: Some(8192),
        max_new_tokens: None,
    };
    /// The official `api.py` (`POST /`): top_p 0.7, temperature 0.95, `max_length` 2048.
    pub const API_PY: Self = Self {
        do_sample: true,
        temperature: 0.95,
        top_p: 0.7,
        max_length: Some(2048),
        max_new_tokens: None,
    };
    /// OpenAI's `/v1/completions`: temperature 1, top_p 1, 16 tokens.
    pub const COMPLETIONS: Self = Self {
        do_sample: true,
        temperature: 1.0,
        top_p: 1.0,
        max_length: None,
        max_new_tokens: Some(16),
    };

    /// A [`GenerationConfig`] holding these defaults.
    pub fn config(&self) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            max_length: self.max_length,
            sampling: SamplingConfig {
                do_sample: self.do_sample,
                temperature: self.temperature,
                top_p: self.top_p,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced eos or a stop id.
    Stop,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens`, `max_length` or the context was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopString => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generation in progress.
pub struct Generator {
    model: Arc<Glm2Model>,
    tokenizer: Arc<Tokenizer>,
    cache: Cache,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    /// Prompt and generated ids.
    ids: Vec<u32>,
    prompt_len: usize,
    /// Generation ends when `ids.len()` reaches this.
    limit: usize,
    /// Ids not yet run through the model.
    to_feed: Vec<u32>,
    /// Prompt tokens whose keys and values came from the prefix cache (not run again).
    cached_tokens: usize,
    /// The cache holds nothing before `ids` but the model's P-Tuning prefix (a generation made
    /// by [`Generator::new`]), so it can be dropped and rebuilt from `ids` ([`Generator::preempt`]).
    owns_history: bool,
    /// Preempted: its cache was given back ([`Generator::resume`] looks in the prefix cache).
    preempted: bool,
    /// [`GenerationConfig::logprobs`], and what was recorded (one per generated token).
    want_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    text: TextStream,
    /// Decoded text held back because it may begin a stop string.
    held: String,
    /// All text has been returned.
    text_done: bool,
    finished: Option<FinishReason>,
}

impl Generator {
    /// Prepare a generation from `prompt` ids. Nothing runs until the first step.
    pub fn new(
        model: Arc<Glm2Model>,
        tokenizer: Arc<Tokenizer>,
        prompt: Vec<u32>,
        cfg: &GenerationConfig,
    ) -> Result<Self> {
        let model = match &cfg.adapter {
            Some(name) => Arc::new(model.with_adapter(Some(name))?),
            None => model,
        };
        let empty = model.new_cache();
        let (cache, held) = model.cache_for_prompt(&prompt);
        let mut g = Self::with_cache(model, tokenizer, empty, prompt, cfg)?;
        // the prompt's start found in the prefix cache is not run again
        g.cache = cache;
        g.to_feed.drain(..held);
        g.cached_tokens = held;
        g.owns_history = true;
        Ok(g)
    }

    /// Give back this generation's KV blocks (the pool ran out): everything so far is run again
    /// when it resumes ([`Generator::resume`]), from the prefix cache as far as its blocks are
    /// still there. `false` (nothing done) for a generation continuing a cache it was given.
    pub fn preempt(&mut self) -> bool {
        if !self.owns_history || self.finished.is_some() {
            return false;
        }
        self.cache = self.model.new_cache();
        self.to_feed = self.ids.clone();
        self.preempted = true;
        true
    }

    /// After [`Generator::preempt`]: take what the prefix cache still holds of the ids to run.
    pub fn resume(&mut self) {
        if std::mem::take(&mut self.preempted) {
            let held = self.cache.adopt_cached_prefix(&self.to_feed);
            self.to_feed.drain(..held);
        }
    }

    /// KV blocks the next step takes from the pool (its new positions, and a copy of a shared
    /// last block).
    pub fn blocks_needed(&self) -> usize {
        let chunk = self.model.tuning().prefill_chunk;
        let t = match chunk {
            0 => self.to_feed.len(),
            c => self.to_feed.len().min(c),
        };
        let bs = self.cache.pool().block_size();
        let have = self.cache.blocks().len();
        (self.cache.len() + t).div_ceil(bs).saturating_sub(have)
            + usize::from(!self.cache.len().is_multiple_of(bs))
    }

    /// KV blocks the whole prompt (what is left to run of it, after what the cache holds) takes.
    pub fn prompt_blocks(&self) -> usize {
        let bs = self.cache.pool().block_size();
        (self.cache.len() + self.to_feed.len())
            .div_ceil(bs)
            .saturating_sub(self.cache.blocks().len())
            + 1
    }

    /// The cache's pool.
    pub fn kv_pool(&self) -> &std::sync::Arc<crate::model::KvPool> {
        self.cache.pool()
    }

    /// Continue after what `cache` already holds: `prompt` are the ids to add before generating.
    pub fn with_cache(
        model: Arc<Glm2Model>,
        tokenizer: Arc<Tokenizer>,
        cache: Cache,
        prompt: Vec<u32>,
        cfg: &GenerationConfig,
    ) -> Result<Self> {
        if prompt.is_empty() && cache.position() == 0 {
            return Err(Error::invalid("the prompt is empty"));
        }
        let vocab = model.config().padded_vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let context = model.max_context();
        // positions: what the cache holds (a P-Tuning prefix excluded) plus the new prompt
        let prompt_len = cache.position() + prompt.len();
        if prompt_len >= context {
            return Err(Error::invalid(format!(
                "the prompt has {prompt_len} tokens and leaves no room in the model context of {context} tokens"
            )));
        }
        let mut limit = context;
        if let Some(m) = cfg.max_length {
            if prompt_len >= m {
                return Err(Error::invalid(format!(
                    "the prompt has {prompt_len} tokens, not fewer than max_length = {m}"
                )));
            }
            limit = limit.min(m);
        }
        match cfg.max_new_tokens {
            Some(0) => return Err(Error::invalid("max_new_tokens must be at least 1")),
            Some(n) => limit = limit.min(prompt_len.saturating_add(n)),
            None if cfg.max_length.is_none() => {
                limit = limit.min(prompt_len + DEFAULT_MAX_NEW_TOKENS)
            }
            None => {}
        }
        if cfg.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(Error::invalid("stop strings must not be empty"));
        }
        if cfg.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::invalid(format!(
                "at most {MAX_TOP_LOGPROBS} top log-probabilities per token"
            )));
        }
        let sampler = Sampler::new(cfg.sampling.clone())?;
        let mut stop_ids = model.config().eos_token_id.to_vec();
        stop_ids.extend(&cfg.stop_token_ids);
        Ok(Self {
            model,
            tokenizer,
            cache,
            sampler,
            stop_ids,
            stop_strings: cfg.stop_strings.clone(),
            ids: prompt.clone(),
            prompt_len: prompt.len(),
            limit: limit - (prompt_len - prompt.len()),
            to_feed: prompt,
            cached_tokens: 0,
            owns_history: false,
            preempted: false,
            want_logprobs: cfg.logprobs,
            logprobs: Vec::new(),
            text: TextStream::new(),
            held: String::new(),
            text_done: false,
            finished: None,
        })
    }

    /// Prompt and generated ids so far (ids held in the cache before this generation excluded).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The generated ids (an eos or stop id that ended generation included).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn generated_ids(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Prompt tokens found in the prefix cache (their keys and values reused, not computed).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// The log-probabilities recorded so far (one per generated token; empty unless asked for
    /// with [`GenerationConfig::logprobs`]).
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// The cache (holds the prompt and every generated token that has been fed back).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Run the ids not yet in the cache (e.g. the last generated token) through the model, so
    /// that the cache holds the whole sequence; returns the cache.
    pub fn into_cache(mut self, feed_last: bool) -> Result<Cache> {
        if feed_last && !self.to_feed.is_empty() {
            let ids = std::mem::take(&mut self.to_feed);
            let input = Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(0)?;
            self.model.forward(&input, &mut self.cache, Logits::Last)?;
        }
        Ok(self.cache)
    }

    /// Ids generated but not yet fed to the model.
    pub fn unfed_ids(&self) -> &[u32] {
        &self.to_feed
    }

    /// Feed pending ids (in several steps when the prompt is longer than
    /// [`Tuning::prefill_chunk`](crate::tuning::Tuning)) and pick the next token. `None` once
    /// finished.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        loop {
            if self.finished.is_some() {
                return Ok(None);
            }
            if let Some(t) = Self::step_many(&mut [&mut *self])?[0] {
                return Ok(Some(t));
            }
        }
    }

    /// Greedy without a repetition penalty: the token is the argmax, wherever it is computed.
    fn plain_greedy(&self) -> bool {
        let c = self.sampler.config();
        !c.do_sample && c.repetition_penalty == 1.0
    }

    fn accept_row(&mut self, row: &mut [f32]) -> u32 {
        let raw = self.want_logprobs.map(|_| row.to_vec());
        let token = self.sampler.sample(row, &self.ids);
        if let (Some(k), Some(raw)) = (self.want_logprobs, raw) {
            self.logprobs.push(row_logprobs(&raw, token, k));
        }
        self.accept_token(token);
        token
    }

    fn accept_token(&mut self, token: u32) {
        self.ids.push(token);
        self.to_feed.push(token);
        if self.stop_ids.contains(&token) {
            self.finished = Some(FinishReason::Stop);
        } else if self.ids.len() >= self.limit {
            self.finished = Some(FinishReason::Length);
        }
    }

    /// One decoding step of several generations of the same model in one batched forward
    /// (continuous batching: they may be at different lengths, some still prefilling).
    /// Returns each one's new token (`None` for those already finished, and for those whose
    /// prompt is still being fed in chunks: see [`Tuning::prefill_chunk`](crate::tuning::Tuning)).
    /// A failed step ends every generation that took part in it.
    pub fn step_many(gens: &mut [&mut Generator]) -> Result<Vec<Option<u32>>> {
        let active: Vec<usize> = (0..gens.len())
            .filter(|&i| gens[i].finished.is_none())
            .collect();
        let mut out = vec![None; gens.len()];
        let Some(&first) = active.first() else {
            return Ok(out);
        };
        let model = gens[first].model.clone();
        if active.iter().any(|&i| !gens[i].model.same_base(&model)) {
            return Err(Error::invalid(
                "generations stepped together must share one model",
            ));
        }
        let chunk = model.tuning().prefill_chunk;
        let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(active.len());
        let mut caches: Vec<&mut Cache> = Vec::with_capacity(active.len());
        // per active generation: whether this step feeds only part of its pending ids (no token)
        let mut partial = Vec::with_capacity(active.len());
        for g in gens.iter_mut().filter(|g| g.finished.is_none()) {
            let g: &mut Generator = g;
            if chunk > 0 && g.to_feed.len() > chunk {
                inputs.push(g.to_feed.drain(..chunk).collect());
                partial.push(true);
            } else {
                inputs.push(std::mem::take(&mut g.to_feed));
                partial.push(false);
            }
            caches.push(&mut g.cache);
        }
        let input_refs: Vec<&[u32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let logits = model.forward_last(&input_refs, &mut caches);
        drop(caches);
        let logits = match logits {
            Ok(l) => l, // [active, vocab] f32
            Err(e) => {
                for &i in &active {
                    gens[i].finished = Some(FinishReason::Length);
                }
                return Err(e);
            }
        };
        // One transfer for the whole batch: argmaxes when every row is plainly greedy and the
        // logits are on a GPU, else all rows.
        if !logits.device().is_cpu()
            && active
                .iter()
                .all(|&i| gens[i].plain_greedy() && gens[i].want_logprobs.is_none())
        {
            #[cfg(feature = "cuda")]
            let best = if logits.device().is_cuda() {
                logits
                    .contiguous()?
                    .apply_op1_no_bwd(&crate::kernels::cuda::ArgmaxRows)?
            } else {
                logits.argmax(candle_core::D::Minus1)?
            };
            #[cfg(not(feature = "cuda"))]
            let best = logits.argmax(candle_core::D::Minus1)?;
            let ids: Vec<u32> = best.to_vec1()?;
            for ((&i, t), &part) in active.iter().zip(ids).zip(&partial) {
                if !part {
                    gens[i].accept_token(t);
                    out[i] = Some(t);
                }
            }
            return Ok(out);
        }
        let vocab = logits.dim(1)?;
        let mut all: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        for ((&i, row), &part) in active.iter().zip(all.chunks_mut(vocab)).zip(&partial) {
            if !part {
                out[i] = Some(gens[i].accept_row(row));
            }
        }
        Ok(out)
    }

    /// Turn the token just produced (by [`Generator::next_token`] or [`Generator::step_many`];
    /// `None` if there was none) into text: what can be shown now, flushed to the end once the
    /// generation is finished. Empty when nothing is ready.
    pub fn push_text(&mut self, token: Option<u32>) -> Result<String> {
        if self.text_done {
            return Ok(String::new());
        }
        if let Some(token) = token {
            let piece = self.text.push(&self.tokenizer, token)?; // eos and specials add no text
            self.held.push_str(&piece);
        }
        if self.finished.is_some() {
            // Flush what the stream and the stop-string filter still hold.
            let rest = self.text.finish(&self.tokenizer)?;
            self.held.push_str(&rest);
            self.text_done = true;
            let out = std::mem::take(&mut self.held);
            return Ok(match self.cut_at_stop(out) {
                Err(before) => {
                    self.finished = Some(FinishReason::StopString);
                    before
                }
                Ok(all) => all,
            });
        }
        let held = std::mem::take(&mut self.held);
        match self.cut_at_stop(held) {
            Err(before) => {
                self.finished = Some(FinishReason::StopString);
                self.text_done = true;
                Ok(before)
            }
            Ok(text) => {
                // Hold back a tail that could still grow into a stop string.
                let keep = self.stop_prefix_len(&text);
                let (emit, hold) = text.split_at(text.len() - keep);
                self.held = hold.to_string();
                Ok(emit.to_string())
            }
        }
    }

    /// All text has been returned by [`Generator::push_text`] / [`Generator::next_text`].
    pub fn is_text_done(&self) -> bool {
        self.text_done
    }

    /// Advance until some text is ready; returns it, or `None` when the generation is over.
    /// The pieces join to exactly the decode of the generated ids (cut before a stop string).
    pub fn next_text(&mut self) -> Result<Option<String>> {
        loop {
            if self.text_done {
                return Ok(None);
            }
            let token = if self.finished.is_some() {
                None
            } else {
                self.next_token()?
            };
            let piece = self.push_text(token)?;
            if !piece.is_empty() {
                return Ok(Some(piece));
            }
        }
    }

    /// `Err(text before the stop)` if a stop string occurs in `text`, else `Ok(text)`.
    fn cut_at_stop(&self, text: String) -> std::result::Result<String, String> {
        let first = self
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        match first {
            Some(i) => Err(text[..i].to_string()),
            None => Ok(text),
        }
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn stop_prefix_len(&self, text: &str) -> usize {
        let mut best = 0;
        for s in &self.stop_strings {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }

    /// Generate to the end; returns the generated ids (eos included when produced).
    pub fn run_to_end(&mut self) -> Result<Vec<u32>> {
        while self.next_token()?.is_some() {}
        Ok(self.generated_ids().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::row_logprobs;

    #[test]
    fn logprobs_of_a_row() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        let l = row_logprobs(&row, 2, 3);
        assert!((l.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        // the likeliest first, ties by the lower id
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert_eq!(row_logprobs(&row, 0, 9).top.len(), 4);
        assert!(row_logprobs(&row, 0, 0).top.is_empty());
    }
}
