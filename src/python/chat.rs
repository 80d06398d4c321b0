//! Chat from Python: `glm2rs.ChatStreamer` (one-shot `stream_chat`), `glm2rs.ChatSession` and
//! `glm2rs.ChatTurn` (a conversation keeping its KV cache), and history conversions.

use super::args::{gen_config, text};
use super::errors::InvalidArgumentError;
use crate::chat_format::tools::ToolCall;
use crate::chat_format::{ChatFormat, Message};
use crate::error::{catch_panic, Error};
use crate::generate::{GenerationConfig, GenerationDefaults};
use crate::pipeline::Model;
use crate::session::{ChatSession, ChatStream, ChatTurn};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::sync::{Arc, Mutex};

/// The official default `max_length` (8192) can exceed a model's context: cap it there.
pub(super) fn cap_max_length(cfg: &mut GenerationConfig, model: &Model) {
    if let Some(m) = cfg.max_length {
        cfg.max_length = Some(m.min(model.model().max_context()));
    }
}

/// History from Python: `(query, response)` pairs or `{"role", "content", "metadata"?}` dicts.
/// A Python list of tools (OpenAI's `{"type": "function", "function": {...}}` or the function
/// objects themselves) as the function objects, keys in their order.
pub(super) fn tools_from_py(
    py: Python<'_>,
    tools: &Bound<'_, PyAny>,
) -> PyResult<Vec<serde_json::Value>> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (tools,))
        .map_err(|e| InvalidArgumentError::new_err(format!("tools must be JSON-like: {e}")))?
        .extract()?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| InvalidArgumentError::new_err(format!("tools: {e}")))?;
    let serde_json::Value::Array(items) = v else {
        return Err(InvalidArgumentError::new_err("tools must be a list"));
    };
    items
        .into_iter()
        .map(|t| {
            let f = match t.get("function") {
                Some(f) if t.get("type").and_then(|x| x.as_str()) == Some("function") => f.clone(),
                _ => t,
            };
            match f.get("name").and_then(|n| n.as_str()) {
                Some(n) if !n.trim().is_empty() => Ok(f),
                _ => Err(InvalidArgumentError::new_err(
                    "every tool needs a \"name\" (a function object, or {\"type\": \"function\", \"function\": {...}})",
                )),
            }
        })
        .collect()
}

pub(super) fn messages_from_py(history: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Message>> {
    let mut out = vec![];
    let Some(h) = history else { return Ok(out) };
    if h.is_none() {
        return Ok(out);
    }
    for item in h.try_iter()? {
        let item = item?;
        if let Ok(d) = item.cast::<PyDict>() {
            let get = |k: &str| -> PyResult<Option<String>> {
                match d.get_item(k)? {
                    Some(v) if !v.is_none() => Ok(Some(v.extract()?)),
                    _ => Ok(None),
                }
            };
            let role = get("role")?
                .ok_or_else(|| InvalidArgumentError::new_err("history message without \"role\""))?;
            let content = get("content")?.unwrap_or_default();
            let mut m = Message::new(&role, &content);
            m.metadata = get("metadata")?.unwrap_or_default();
            out.push(m);
        } else {
            let (q, a): (String, String) = item.extract().map_err(|_| {
                InvalidArgumentError::new_err(
                    "history items must be (query, response) pairs or role/content dicts",
                )
            })?;
            out.push(Message::new("user", &q));
            out.push(Message::new("assistant", &a));
        }
    }
    Ok(out)
}

/// History to Python: pairs for ChatGLM2, dicts for ChatGLM3.
pub(super) fn history_to_py<'py>(
    py: Python<'py>,
    format: ChatFormat,
    msgs: &[Message],
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    match format {
        ChatFormat::ChatGlm2 => {
            for pair in msgs.chunks(2) {
                let a = pair.get(1).map(|m| m.content.as_str()).unwrap_or("");
                list.append(PyTuple::new(py, [pair[0].content.as_str(), a])?)?;
            }
        }
        ChatFormat::ChatGlm3 => {
            for m in msgs {
                let d = PyDict::new(py);
                d.set_item("role", &m.role)?;
                if !m.metadata.is_empty() || m.role == "assistant" {
                    d.set_item("metadata", &m.metadata)?;
                }
                d.set_item("content", &m.content)?;
                list.append(d)?;
            }
        }
    }
    Ok(list)
}

/// Deltas of a one-shot chat answer (see `Model.stream_chat`).
#[pyclass(module = "glm2rs._glm2rs", name = "ChatStreamer")]
pub struct PyChatStream {
    stream: Option<ChatStream>,
    format: ChatFormat,
    query: String,
    history: Vec<Message>,
    response: Option<String>,
}

impl PyChatStream {
    pub(super) fn new(
        stream: ChatStream,
        format: ChatFormat,
        query: &str,
        history: Vec<Message>,
    ) -> Self {
        Self {
            stream: Some(stream),
            format,
            query: query.to_string(),
            history,
            response: None,
        }
    }
}

#[pymethods]
impl PyChatStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        match py.detach(|| catch_panic(|| stream.next_text())) {
            Ok(Some(piece)) => Ok(Some(piece)),
            Ok(None) => {
                let response = stream.response().to_string();
                self.history.push(Message::new("user", &self.query));
                self.history.push(Message::new("assistant", &response));
                self.response = Some(response);
                self.stream = None;
                Ok(None)
            }
            Err(e) => {
                self.stream = None;
                Err(e.into())
            }
        }
    }

    /// The post-processed response (so far, or all of it at the end).
    #[getter]
    fn response(&self) -> String {
        match (&self.response, &self.stream) {
            (Some(r), _) => r.clone(),
            (None, Some(s)) => s.response().to_string(),
            _ => String::new(),
        }
    }

    /// The history including this turn, once the stream has ended; before that, without it.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        history_to_py(py, self.format, &self.history)
    }

    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.stream
            .as_ref()
            .and_then(|s| s.generator().finish_reason().map(|r| r.as_str()))
    }
}

/// A conversation that keeps its KV cache between turns (see `Model.start_chat`).
#[pyclass(module = "glm2rs._glm2rs", name = "ChatSession", frozen)]
pub struct PyChatSession {
    inner: Arc<Mutex<ChatSession>>,
    format: ChatFormat,
}

impl PyChatSession {
    pub(super) fn new(session: ChatSession, format: ChatFormat) -> Self {
        Self {
            inner: Arc::new(Mutex::new(session)),
            format,
        }
    }
}

fn lock(s: &Mutex<ChatSession>) -> std::sync::MutexGuard<'_, ChatSession> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

#[pymethods]
impl PyChatSession {
    /// Send a query (or with `role="observation"`, a tool's result); returns an iterator of
    /// response deltas. The turn is committed to the session when the iterator ends, is closed or
    /// is dropped.
    #[pyo3(signature = (query, role = "user", **kwargs))]
    fn send(
        &self,
        py: Python<'_>,
        query: &Bound<'_, PyAny>,
        role: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyChatTurn> {
        let query = text(query, "query")?;
        let cfg = gen_config(
            kwargs,
            GenerationDefaults {
                max_length: None,
                ..GenerationDefaults::CHAT
            },
        )?;
        let session = self.inner.clone();
        let query = query.to_string();
        let role = role.to_string();
        let turn =
            py.detach(move || catch_panic(|| lock(&session).begin_turn_as(&role, &query, &cfg)))?;
        Ok(PyChatTurn {
            session: self.inner.clone(),
            turn: Some(turn),
            response: None,
            generated: 0,
            call: None,
        })
    }

    /// Send a query and return the whole response.
    #[pyo3(signature = (query, role = "user", **kwargs))]
    fn chat(
        &self,
        py: Python<'_>,
        query: &Bound<'_, PyAny>,
        role: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let mut turn = self.send(py, query, role, kwargs)?;
        while turn.__next__(py)?.is_some() {}
        Ok(turn.response.clone().unwrap_or_default())
    }

    /// `[(query, response), ...]` (ChatGLM2) or role/content dicts (ChatGLM3).
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        history_to_py(py, self.format, lock(&self.inner).history())
    }

    /// Every token the KV cache holds, in order.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        lock(&self.inner).token_ids().to_vec()
    }

    /// Forget the conversation and free the cache.
    fn reset(&self) -> PyResult<()> {
        Ok(lock(&self.inner).reset()?)
    }
}

/// The deltas of one session turn.
#[pyclass(module = "glm2rs._glm2rs", name = "ChatTurn")]
pub struct PyChatTurn {
    session: Arc<Mutex<ChatSession>>,
    turn: Option<ChatTurn>,
    response: Option<String>,
    /// Tokens generated, kept once the turn is committed.
    generated: usize,
    /// The tool call the answer made (sessions with tools), kept once committed.
    call: Option<ToolCall>,
}

impl PyChatTurn {
    fn commit(&mut self) -> Result<(), Error> {
        if let Some(turn) = self.turn.take() {
            self.generated = turn.generated_tokens();
            let (response, call) = lock(&self.session).end_turn_with_call(turn)?;
            self.response = Some(response);
            self.call = call;
        }
        Ok(())
    }
}

#[pymethods]
impl PyChatTurn {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(turn) = self.turn.as_mut() else {
            return Ok(None);
        };
        match py.detach(|| catch_panic(|| turn.next_text())) {
            Ok(Some(piece)) => Ok(Some(piece)),
            Ok(None) => {
                py.detach(|| catch_panic(|| self.commit()))?;
                Ok(None)
            }
            Err(e) => {
                let _ = self.commit();
                Err(e.into())
            }
        }
    }

    /// Stop generating; what was generated so far is committed to the session.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| catch_panic(|| self.commit()))?)
    }

    /// Tokens generated so far in this turn (the answer's; the turn's prompt is not counted).
    #[getter]
    fn generated_tokens(&self) -> usize {
        self.turn
            .as_ref()
            .map_or(self.generated, ChatTurn::generated_tokens)
    }

    /// In a session with tools, once the turn is finished: the call the answer made, as
    /// `{"name": ..., "arguments": JSON text}` (what ChatGLM3's `process_response` returns), or
    /// None for a text answer. Send the tool's result back with `send(result, role="observation")`.
    #[getter]
    fn tool_call<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(c) = &self.call else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("name", &c.name)?;
        d.set_item("arguments", &c.arguments)?;
        Ok(Some(d))
    }

    /// The post-processed response so far (all of it once finished).
    #[getter]
    fn response(&self) -> String {
        match (&self.response, &self.turn) {
            (Some(r), _) => r.clone(),
            (None, Some(t)) => t.response().to_string(),
            _ => String::new(),
        }
    }
}

impl Drop for PyChatTurn {
    fn drop(&mut self) {
        let _ = catch_panic(|| self.commit());
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP server (feature "server"): runs on its own threads; Python only starts and stops it.
