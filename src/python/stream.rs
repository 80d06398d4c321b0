//! `glm2rs.TextStreamer`: a generation stepped from Python, one decoding step per `__next__`
//! with the GIL released.

use crate::error::catch_panic;
use crate::generate::Generator;
use pyo3::prelude::*;

/// An iterator of text pieces, generated one step per `__next__` with the GIL released.
/// Dropping it (or `close()`) frees its KV cache.
#[pyclass(module = "glm2rs._glm2rs", name = "TextStreamer")]
pub struct PyStream {
    gen: Option<Generator>,
    /// Kept after the generator is freed.
    token_ids: Vec<u32>,
    finish_reason: Option<&'static str>,
    cached_tokens: usize,
    /// Kept after the generator is freed.
    logprobs: Vec<crate::generate::TokenLogprob>,
}

impl PyStream {
    pub(super) fn new(gen: Generator) -> Self {
        Self {
            cached_tokens: gen.cached_tokens(),
            gen: Some(gen),
            token_ids: vec![],
            finish_reason: None,
            logprobs: vec![],
        }
    }
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(gen) = self.gen.as_mut() else {
            return Ok(None);
        };
        let step = py.detach(|| catch_panic(|| gen.next_text()));
        let reason = gen.finish_reason().map(|r| r.as_str());
        self.token_ids = gen.generated_ids().to_vec();
        self.logprobs = gen.logprobs().to_vec();
        match step {
            Ok(Some(piece)) => Ok(Some(piece)),
            Ok(None) => {
                self.finish_reason = reason;
                self.gen = None; // free the cache now
                Ok(None)
            }
            Err(e) => {
                self.gen = None;
                Err(e.into())
            }
        }
    }

    /// Stop generating and free the cache.
    fn close(&mut self) {
        if let Some(g) = self.gen.take() {
            self.token_ids = g.generated_ids().to_vec();
            self.logprobs = g.logprobs().to_vec();
        }
    }

    /// Ids generated so far.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        match &self.gen {
            Some(g) => g.generated_ids().to_vec(),
            None => self.token_ids.clone(),
        }
    }

    /// With `logprobs=k`: per generated token `{"token", "logprob", "top_logprobs": [(id,
    /// logprob)]}` (log_softmax of the model's logits at that step); empty otherwise.
    #[getter]
    fn logprobs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyList>> {
        let lps = match &self.gen {
            Some(g) => g.logprobs(),
            None => &self.logprobs,
        };
        super::args::logprobs_to_py(py, lps)
    }

    /// Prompt tokens whose keys and values came from the prefix cache (not computed again).
    #[getter]
    fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// `"stop"` or `"length"` once finished, else None.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        match &self.gen {
            Some(g) => g.finish_reason().map(|r| r.as_str()),
            None => self.finish_reason,
        }
    }
}
