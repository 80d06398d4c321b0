//! A completion's answer as the client gets it: whole (`collect`) or as server-sent events
//! (`sse`), for chat (with ChatGLM's `process_response` and, with tools, calls: `tools.rs`) and
//! text completions.

use super::openai::{new_id, now, ApiResult, Common};
use super::tools::{ChatAnswer, Piece, ToolSpec};
use super::{ApiError, Shared};
use crate::engine::{Event, Events};
use crate::generate::{FinishReason, TokenLogprob};
use crate::tokenizer::Tokenizer;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

pub(crate) struct Done {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Each generated token's log-probability (when asked for).
    pub logprobs: Vec<TokenLogprob>,
}

pub(crate) fn usage(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": d.cached_tokens},
    })
}

/// A whole answer: its text, and for a chat answer that called a tool, the call (name,
/// arguments) and whether it was whole (`finish_reason` `tool_calls`).
pub(crate) struct Answer {
    pub text: String,
    pub call: Option<(String, String)>,
    pub call_complete: bool,
}

/// Collect a whole completion (`tools`: the chat request's tools, if it has any).
pub(crate) async fn collect(
    mut rx: Events,
    kind: Kind,
    tools: Option<&ToolSpec>,
) -> ApiResult<(Answer, Done)> {
    let mut chat = ChatAnswer::new(tools);
    let mut pieces = vec![];
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Logprobs(l) => lps.extend(l),
            Event::Text(t) => match kind {
                Kind::Chat => pieces.extend(chat.push(&t)),
                Kind::Text => text.push_str(&t),
            },
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let mut call = None;
                if kind == Kind::Chat {
                    pieces.extend(chat.finish());
                    let mut name = None;
                    for p in pieces {
                        match p {
                            Piece::Content(c) => text.push_str(&c),
                            Piece::CallName(n) => name = Some(n),
                            Piece::CallArguments(a) => call = name.take().map(|n| (n, a)),
                        }
                    }
                }
                let call_complete = chat.made_call();
                return Ok((
                    Answer {
                        text,
                        call,
                        call_complete,
                    },
                    Done {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                        logprobs: lps,
                    },
                ));
            }
            Event::Error(m) => {
                return Err(ApiError::from_engine(
                    crate::error::Error::Internal(m),
                    None,
                ))
            }
        }
    }
    Err(ApiError::from_engine(
        crate::error::Error::Internal("the engine dropped the request".into()),
        None,
    ))
}

/// The state of one server-sent-event stream.
struct StreamState {
    rx: Events,
    kind: Kind,
    post: ChatAnswer,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    pending: VecDeque<String>,
    ended: bool,
    /// The server's "cut now" signal (see `AppState::cut`).
    cut: Option<tokio::sync::watch::Receiver<bool>>,
    /// Log-probabilities asked for: the tokenizer to name tokens, those not sent yet, and the
    /// characters of text sent (completions' `text_offset`).
    logprobs: Option<Arc<Tokenizer>>,
    pending_lp: Vec<TokenLogprob>,
    sent_chars: usize,
}

impl StreamState {
    /// The server is stopping and this stream would be cut: end it with an error event and
    /// `[DONE]` (dropping the engine's receiver frees the sequence).
    fn on_shutdown(&mut self) {
        let e = ApiError::refused(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Some("server_shutdown"),
            "the server is shutting down; the answer was cut here",
        );
        self.pending.push_back(e.body().to_string());
        self.pending.push_back("[DONE]".into());
        self.ended = true;
    }

    /// The log-probabilities not sent yet, in this stream's shape (`null` when not asked for).
    fn take_logprobs(&mut self, piece: Option<&str>) -> Value {
        let Some(tok) = &self.logprobs else {
            return Value::Null;
        };
        let lps = std::mem::take(&mut self.pending_lp);
        let v = match self.kind {
            Kind::Chat => super::logprobs::chat_json(tok, &lps),
            Kind::Text => super::logprobs::completion_json(tok, &lps, self.sent_chars),
        };
        self.sent_chars += piece.map_or(0, |p| p.chars().count());
        v
    }

    fn chunk(&mut self, piece: Option<&str>, first: bool, finish: Option<&str>) -> String {
        let lp = if first {
            Value::Null
        } else {
            self.take_logprobs(piece)
        };
        let mut v = match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(p) = piece {
                    delta.insert("content".into(), json!(p));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                })
            }
            Kind::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": piece.unwrap_or(""), "logprobs": lp, "finish_reason": finish}],
            }),
        };
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// A chat chunk whose delta is one tool call's part (OpenAI's streamed `tool_calls`).
    fn call_chunk(&mut self, part: Value) -> String {
        let lp = self.take_logprobs(None);
        let mut v = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": {"tool_calls": [part]}, "logprobs": lp, "finish_reason": null}],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// Queue a chat answer's pieces: text as content deltas, a call as its name (with the call's
    /// id and type) and then its arguments.
    fn on_pieces(&mut self, pieces: Vec<Piece>) {
        for p in pieces {
            let c = match p {
                Piece::Content(text) => self.chunk(Some(&text), false, None),
                Piece::CallName(name) => self.call_chunk(json!({
                    "index": 0, "id": new_id("call"), "type": "function",
                    "function": {"name": name, "arguments": ""},
                })),
                Piece::CallArguments(a) => {
                    self.call_chunk(json!({"index": 0, "function": {"arguments": a}}))
                }
            };
            self.pending.push_back(c);
        }
    }

    /// Turn the next engine event into SSE data lines.
    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Logprobs(l)) => self.pending_lp.extend(l),
            Some(Event::Text(t)) => match self.kind {
                Kind::Chat => {
                    let pieces = self.post.push(&t);
                    self.on_pieces(pieces);
                }
                Kind::Text if !t.is_empty() => {
                    let c = self.chunk(Some(&t), false, None);
                    self.pending.push_back(c);
                }
                Kind::Text => {}
            },
            Some(Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                if self.kind == Kind::Chat {
                    let pieces = self.post.finish();
                    self.on_pieces(pieces);
                }
                let finish = self.post.finish_reason(reason.as_str());
                let c = self.chunk(None, false, Some(finish));
                self.pending.push_back(c);
                if self.include_usage {
                    let d = Done {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                        logprobs: vec![],
                    };
                    let object = match self.kind {
                        Kind::Chat => "chat.completion.chunk",
                        Kind::Text => "text_completion",
                    };
                    self.pending.push_back(
                        json!({"id": self.id, "object": object, "created": self.created,
                               "model": self.model, "choices": [], "usage": usage(&d)})
                        .to_string(),
                    );
                }
                self.pending.push_back("[DONE]".into());
                self.ended = true;
            }
            Some(Event::Error(m)) => {
                let e = ApiError::from_engine(crate::error::Error::Internal(m), None);
                self.pending.push_back(e.body().to_string());
                self.pending.push_back("[DONE]".into());
                self.ended = true;
            }
            None => self.ended = true,
        }
    }
}

/// The server-sent-event response of request `c` (`kind`, response `id`, the chat request's
/// `tools`) fed by `rx`.
pub(crate) fn sse(
    s: &Shared,
    rx: Events,
    kind: Kind,
    id: String,
    c: &Common,
    tools: Option<&ToolSpec>,
) -> Response {
    let (model, include_usage, cut) = (c.model.clone(), c.include_usage, s.cut.clone());
    let logprobs = c.cfg.logprobs.map(|_| s.engine.model().tokenizer().clone());
    let mut st = StreamState {
        rx,
        kind,
        post: ChatAnswer::new(tools),
        id,
        created: now(),
        model,
        include_usage,
        pending: VecDeque::new(),
        ended: false,
        cut,
        logprobs,
        pending_lp: Vec::new(),
        sent_chars: 0,
    };
    if kind == Kind::Chat {
        let first = st.chunk(Some(""), true, None);
        st.pending.push_back(first);
    }
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Sse::default().data(data)), st));
            }
            if st.ended {
                return None;
            }
            let shutting_down = async {
                let cut_now = match st.cut.as_mut() {
                    Some(c) => c.wait_for(|cut| *cut).await.is_ok(),
                    None => false,
                };
                if !cut_now {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                ev = st.rx.recv() => st.on_event(ev),
                _ = shutting_down => st.on_shutdown(),
            }
        }
    });
    axum::response::sse::Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
