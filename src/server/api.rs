//! The official `api.py` contract: `POST /` with `{prompt, history, max_length, top_p,
//! temperature}` answers `{response, history, status: 200, time: "YYYY-mm-dd HH:MM:SS"}`.
//! `history` is a list of `[query, response]` pairs (ChatGLM2) or of `{role, content}` messages
//! (ChatGLM3's `api.py`); the answer's history has the same form with this turn added.

use super::openai::{positive_int, sampling};
use super::sse::{collect, Kind};
use super::{off_workers, parse_object, ApiError, Shared};
use crate::chat_format::Message;
use crate::generate::{GenerationConfig, GenerationDefaults};
use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

pub async fn official(State(s): State<Shared>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let o = parse_object(&body)?;
    let prompt = match o.get("prompt") {
        Some(Value::String(p)) if !p.is_empty() => p.clone(),
        Some(Value::String(_)) => return Err(ApiError::bad("prompt", "prompt must not be empty")),
        None | Some(Value::Null) => return Err(ApiError::bad("prompt", "prompt is required")),
        Some(_) => return Err(ApiError::bad("prompt", "prompt must be a string")),
    };
    let mut pairs_form = true;
    let mut history: Vec<Message> = vec![];
    match o.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_string) => {
                        history.push(Message::new("user", pair[0].as_str().unwrap_or_default()));
                        history.push(Message::new(
                            "assistant",
                            pair[1].as_str().unwrap_or_default(),
                        ));
                    }
                    Value::Object(m) => {
                        pairs_form = false;
                        let role = m.get("role").and_then(Value::as_str);
                        let content = m.get("content").and_then(Value::as_str);
                        match (role, content) {
                            (Some(r), Some(c)) => history.push(Message::new(r, c)),
                            _ => {
                                return Err(ApiError::bad(
                                    "history",
                                    "a history message needs string \"role\" and \"content\"",
                                ))
                            }
                        }
                    }
                    _ => {
                        return Err(ApiError::bad(
                            "history",
                            "history must be a list of [query, response] pairs",
                        ))
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::bad("history", "history must be a list")),
    }
    let d = GenerationDefaults::API_PY;
    let max_length = positive_int(&o, "max_length")?
        .or(d.max_length)
        .expect("api.py has a default max_length");
    let sampling = sampling(&o, d.temperature, d.top_p, None)?;
    let model = s.engine.model();
    let ids = {
        let (model, query, history) = (
            model.clone(),
            Message::new("user", &prompt),
            history.clone(),
        );
        off_workers(move || model.chat_prompt_ids(&query, &history))
            .await
            .map_err(|e| ApiError::from_engine(e, Some("history")))?
    };
    let context = model.model().max_context();
    if ids.len() >= max_length.min(context) {
        return Err(ApiError::bad(
            "max_length",
            format!(
                "the prompt has {} tokens, not fewer than max_length {} (context {context})",
                ids.len(),
                max_length
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let cfg = model.chat_config(&GenerationConfig {
        max_length: Some(max_length.min(context)),
        sampling,
        ..Default::default()
    });
    let rx = s
        .engine
        .submit(ids, &cfg)
        .map_err(|e| ApiError::from_engine(e, None))?;
    let (response, _) = collect(rx, Kind::Chat, None).await?;
    let response = response.text;
    let mut out_history: Vec<Value> = match o.get("history") {
        Some(Value::Array(items)) => items.clone(),
        _ => vec![],
    };
    if pairs_form {
        out_history.push(json!([prompt, response]));
    } else {
        out_history.push(json!({"role": "user", "content": prompt}));
        out_history.push(json!({"role": "assistant", "metadata": "", "content": response}));
    }
    let time = chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string();
    Ok(Json(json!({
        "response": response,
        "history": out_history,
        "status": 200,
        "time": time,
    })))
}
