//! Continuous batching: many generations share one model, and each step runs the next tokens of
//! all of them in one batched forward ([`Generator::step_many`]). A request joins the batch at
//! the next step (its prompt is prefilled in that step next to the others' decode tokens) and
//! leaves it when it finishes or when its receiver is dropped (a client that went away).
//!
//! The engine thread owns every running [`Generator`]; callers get a channel of [`Event`]s.
//! Submissions wait in a bounded queue: when it is full, [`Engine::submit`] refuses at once
//! ([`Error::Overloaded`]) instead of letting callers hang.
//!
//! Admission is by KV memory, not only by count: a waiting request joins when the blocks its
//! prompt needs are free in the model's pool (beside what the running ones need for their next
//! step); a request whose prompt alone needs more than the whole pool is refused at submission.
//! When a step would need more blocks than are left, the youngest running requests are
//! preempted: their blocks go back (kept findable by the prefix cache), and they wait at the
//! head of the queue to run everything again, from the prefix cache as far as it still holds
//! them. No admitted request is lost: each ends with `Done` or an `Error` that says why.

mod metrics;
pub use metrics::Metrics;

use crate::error::{Error, Result};
use crate::generate::{FinishReason, GenerationConfig, Generator};
use crate::pipeline::Model;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Sizes of the batch and of the waiting queue.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most sequences decoded together in one step.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused.
    pub max_queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_queue: 256,
        }
    }
}

/// What a request receives, in order: text pieces, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Generated text (the pieces join to the whole completion; never a split character).
    Text(String),
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Generated ids, an eos that ended generation included.
        completion_tokens: usize,
        /// Prompt tokens found in the prefix cache (not computed again).
        cached_tokens: usize,
    },
    /// The log-probabilities of the tokens generated since the last such event (only when the
    /// request asked for them), sent before the text they produce.
    Logprobs(Vec<crate::generate::TokenLogprob>),
    /// The step failed (the message says why); nothing more follows.
    Error(String),
}

/// The receiving end of one request. Dropping it cancels the request at the next step.
pub type Events = UnboundedReceiver<Event>;

struct Job {
    gen: Generator,
    events: UnboundedSender<Event>,
    submitted: Instant,
    /// When its last token (the first, then each next) was delivered.
    last_token: Option<Instant>,
    /// Log-probabilities already sent.
    logprobs_sent: usize,
}

/// Counters for monitoring.
#[derive(Default)]
struct Stats {
    queued: AtomicUsize,
    running: AtomicUsize,
    steps: AtomicUsize,
    completed: AtomicUsize,
    metrics: Metrics,
}

/// A handle to the engine thread; clones share it. The thread ends when the last handle is
/// dropped and the running requests are done.
#[derive(Clone)]
pub struct Engine {
    model: Model,
    tx: SyncSender<Job>,
    stats: Arc<Stats>,
    _thread: Arc<JoinHandle<()>>,
}

impl Engine {
    pub fn new(model: Model, cfg: EngineConfig) -> Result<Self> {
        if cfg.max_batch == 0 {
            return Err(Error::invalid("max_batch must be at least 1"));
        }
        let (tx, rx) = mpsc::sync_channel(cfg.max_queue);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("glm2rs-engine".into())
            .spawn(move || run(rx, cfg.max_batch, &st))
            .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            model,
            tx,
            stats,
            _thread: Arc::new(thread),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Queue a generation from prompt ids. Bad arguments (a prompt that leaves no room in the
    /// context, out-of-range sampling values) are refused here, before anything runs.
    pub fn submit(&self, prompt: Vec<u32>, cfg: &GenerationConfig) -> Result<Events> {
        let gen = self.model.generator(prompt, cfg)?;
        let pool = gen.kv_pool();
        let need = gen.prompt_blocks();
        if need > pool.max_blocks() {
            return Err(Error::invalid(format!(
                "the prompt needs {need} KV cache blocks of {} positions and the cache holds {} in all (kv_cache_memory); shorten the prompt or raise kv_cache_memory",
                pool.block_size(),
                pool.max_blocks()
            )));
        }
        let (events, rx) = unbounded_channel();
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            gen,
            events,
            submitted: Instant::now(),
            last_token: None,
            logprobs_sent: 0,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => {
                        Error::Overloaded("the request queue is full; try again later".into())
                    }
                    TrySendError::Disconnected(_) => {
                        Error::Internal("the engine thread has stopped".into())
                    }
                })
            }
        }
    }

    /// Requests waiting for a place in the batch.
    pub fn queued(&self) -> usize {
        self.stats.queued.load(Ordering::SeqCst)
    }

    /// Requests in the batch.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::SeqCst)
    }

    /// Batched steps run so far.
    pub fn steps(&self) -> usize {
        self.stats.steps.load(Ordering::SeqCst)
    }

    /// Requests finished (completed, failed or cancelled).
    pub fn completed(&self) -> usize {
        self.stats.completed.load(Ordering::SeqCst)
    }

    /// Every metric in Prometheus' text format (the KV pool's read now).
    pub fn metrics(&self) -> String {
        let m = &self.stats.metrics;
        m.running.set(self.running() as i64);
        m.waiting.set(self.queued() as i64);
        m.render(self.model.model().kv_pool())
    }
}

/// The engine thread: admit, step, deliver, until every handle is gone and nothing runs.
fn run(rx: Receiver<Job>, max_batch: usize, stats: &Stats) {
    let mut running: Vec<Job> = Vec::new();
    // taken from the channel (or preempted), waiting for KV memory; the oldest first
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    let m = &stats.metrics;
    loop {
        // Fill `waiting` from the channel while the batch has room (block when idle).
        while open && running.len() + waiting.len() < max_batch {
            let next = if running.is_empty() && waiting.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            };
            match next {
                Some(j) => waiting.push_back(j),
                None => break,
            }
        }
        // Requests whose receiver is gone free their place.
        let before = running.len() + waiting.len();
        running.retain(|j| !j.events.is_closed());
        waiting.retain(|j| {
            let open = !j.events.is_closed();
            if !open {
                stats.queued.fetch_sub(1, Ordering::SeqCst);
            }
            open
        });
        let gone = before - running.len() - waiting.len();
        stats.completed.fetch_add(gone, Ordering::SeqCst);
        m.finished
            .with_label_values(&["cancelled"])
            .inc_by(gone as u64);
        // Admit the oldest waiting requests whose prompts fit in the KV memory left beside what
        // the running ones need next.
        let mut need: usize = running.iter().map(|j| j.gen.blocks_needed()).sum();
        while running.len() < max_batch {
            let Some(front) = waiting.front_mut() else {
                break;
            };
            front.gen.resume();
            let want = front.gen.blocks_needed();
            let pool = front.gen.kv_pool().clone();
            if need + want > pool.blocks_available() && !running.is_empty() {
                break; // wait for memory (the running ones finish or are preempted)
            }
            need += want;
            let job = waiting.pop_front().expect("front exists");
            stats.queued.fetch_sub(1, Ordering::SeqCst);
            running.push(job);
        }
        // Preempt the youngest while the step needs more blocks than the pool has left.
        while running.len() > 1 {
            let pool = running[0].gen.kv_pool().clone();
            let need: usize = running.iter().map(|j| j.gen.blocks_needed()).sum();
            if need <= pool.blocks_available() {
                break;
            }
            let mut job = running.pop().expect("more than one runs"); // the youngest
            if job.gen.preempt() {
                m.preempted.inc();
                stats.queued.fetch_add(1, Ordering::SeqCst);
                waiting.push_front(job);
            } else {
                let _ = job.events.send(Event::Error(
                    "the KV cache is full and this request's cache cannot be rebuilt; raise kv_cache_memory".into(),
                ));
                stats.completed.fetch_add(1, Ordering::SeqCst);
                m.finished.with_label_values(&["error"]).inc();
            }
        }
        stats.running.store(running.len(), Ordering::SeqCst);
        if running.is_empty() {
            if !open && waiting.is_empty() {
                return;
            }
            continue;
        }
        let mut gens: Vec<&mut Generator> = running.iter_mut().map(|j| &mut j.gen).collect();
        let step = crate::error::catch_panic(|| Generator::step_many(&mut gens));
        stats.steps.fetch_add(1, Ordering::SeqCst);
        match step {
            Ok(tokens) => {
                let mut still = Vec::with_capacity(running.len());
                for (mut job, token) in running.drain(..).zip(tokens) {
                    match deliver(&mut job, token, m) {
                        Ok(true) => still.push(job),
                        Ok(false) => {
                            stats.completed.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            let _ = job.events.send(Event::Error(e.to_string()));
                            stats.completed.fetch_add(1, Ordering::SeqCst);
                            m.finished.with_label_values(&["error"]).inc();
                        }
                    }
                }
                running = still;
            }
            Err(e) => {
                for job in running.drain(..) {
                    let _ = job.events.send(Event::Error(e.to_string()));
                    stats.completed.fetch_add(1, Ordering::SeqCst);
                    m.finished.with_label_values(&["error"]).inc();
                }
            }
        }
        stats.running.store(running.len(), Ordering::SeqCst);
    }
}

/// Send what the new token adds (the whole rest once the generation finished: `push_text`
/// flushes then); `Ok(false)` once the request is complete.
fn deliver(job: &mut Job, token: Option<u32>, m: &Metrics) -> Result<bool> {
    if token.is_some() {
        let now = Instant::now();
        match job.last_token {
            None => m.ttft.observe((now - job.submitted).as_secs_f64()),
            Some(t) => m.tpot.observe((now - t).as_secs_f64()),
        }
        job.last_token = Some(now);
        m.generation_tokens.inc();
    }
    let lp = job.gen.logprobs();
    if lp.len() > job.logprobs_sent {
        let _ = job
            .events
            .send(Event::Logprobs(lp[job.logprobs_sent..].to_vec()));
        job.logprobs_sent = lp.len();
    }
    let piece = job.gen.push_text(token)?;
    if !piece.is_empty() {
        let _ = job.events.send(Event::Text(piece));
    }
    if job.gen.is_text_done() {
        let reason = job.gen.finish_reason().unwrap_or(FinishReason::Stop);
        m.e2e.observe(job.submitted.elapsed().as_secs_f64());
        m.prompt_tokens.inc_by(job.gen.prompt_len() as u64);
        m.finished.with_label_values(&[reason.as_str()]).inc();
        let _ = job.events.send(Event::Done {
            reason: job.gen.finish_reason().unwrap_or(FinishReason::Stop),
            prompt_tokens: job.gen.prompt_len(),
            completion_tokens: job.gen.generated_ids().len(),
            cached_tokens: job.gen.cached_tokens(),
        });
        return Ok(false);
    }
    Ok(true)
}
