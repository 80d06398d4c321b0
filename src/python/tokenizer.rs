//! `glm2rs.Tokenizer`.

use super::args;
use super::chat::messages_from_py;
use crate::chat_format::Message;
use crate::error::catch_panic;
use crate::tokenizer::Tokenizer;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// The ChatGLM2 tokenizer (SentencePiece BPE built in Rust, with ChatGLM's special tokens).
#[pyclass(module = "glm2rs._glm2rs", name = "Tokenizer", frozen)]
pub struct PyTokenizer {
    pub(super) inner: Arc<Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    /// Build from a SentencePiece `tokenizer.model` file.
    #[staticmethod]
    #[pyo3(signature = (path, *, chatglm3 = false))]
    fn from_file(py: Python<'_>, path: PathBuf, chatglm3: bool) -> PyResult<Self> {
        let tok = py.detach(|| catch_panic(|| Tokenizer::from_spm_file(&path, chatglm3)))?;
        Ok(Self {
            inner: Arc::new(tok),
        })
    }

    /// Token ids of `text`; with `add_special_tokens`, `[gMASK] sop` come first.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        add_special_tokens: bool,
    ) -> PyResult<Vec<u32>> {
        let tok = self.inner.clone();
        let text = args::text(text, "text")?;
        Ok(py.detach(|| catch_panic(|| tok.encode(&text, add_special_tokens)))?)
    }

    /// Text of `ids`; special ids and ids unknown to the tokenizer decode to nothing.
    fn decode(&self, ids: &Bound<'_, PyAny>) -> PyResult<String> {
        let ids = args::ids(ids, "ids")?;
        Ok(catch_panic(|| self.inner.decode(&ids))?)
    }

    /// The text pieces a stream emits for `ids`, one entry per id (empty while a character is
    /// incomplete); they join to exactly `decode(ids)`.
    fn stream_decode(&self, ids: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let ids = args::ids(ids, "ids")?;
        Ok(catch_panic(|| {
            let mut ts = crate::tokenizer::TextStream::new();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(ts.push(&self.inner, id)?);
            }
            if let Some(last) = out.last_mut() {
                last.push_str(&ts.finish(&self.inner)?);
            }
            Ok(out)
        })?)
    }

    /// The official ChatGLM2 prompt: `[Round N]\n\n问：...\n\n答：`.
    #[pyo3(signature = (query, history = None))]
    fn build_prompt(
        &self,
        query: &Bound<'_, PyAny>,
        history: Option<Vec<(String, String)>>,
    ) -> PyResult<String> {
        let query = args::text(query, "query")?;
        Ok(crate::chat_format::build_prompt(
            &query,
            &history.unwrap_or_default(),
        ))
    }

    /// Prompt ids of a chat turn: ChatGLM3's `build_chat_input` (`[gMASK] sop`, each message as
    /// `<|role|>` + metadata line + content, then `<|assistant|>`) for a tokenizer with role
    /// tokens, else the ChatGLM2 prompt `encode(build_prompt(query, history))`.
    #[pyo3(signature = (query, history = None, role = "user"))]
    fn build_chat_input(
        &self,
        query: &Bound<'_, PyAny>,
        history: Option<Bound<'_, PyAny>>,
        role: &str,
    ) -> PyResult<Vec<u32>> {
        let query = args::text(query, "query")?;
        let msgs = messages_from_py(history.as_ref())?;
        let q = Message::new(role, &query);
        Ok(catch_panic(|| {
            crate::chat_format::chat_prompt_ids(&self.inner, &q, &msgs)
        })?)
    }

    /// Write a Hugging Face `tokenizer.json`.
    fn save(&self, path: PathBuf) -> PyResult<()> {
        Ok(self.inner.save(&path)?)
    }

    /// Id of a special token (`"[gMASK]"`, `"sop"`, `"<|user|>"`...), or None.
    fn special_id(&self, name: &str) -> Option<u32> {
        self.inner.special_id(name)
    }

    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.vocab_size()
    }

    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.inner().token_to_id("</s>")
    }

    fn __len__(&self) -> usize {
        self.inner.vocab_size() as usize
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer(vocab_size={})", self.inner.vocab_size())
    }
}
