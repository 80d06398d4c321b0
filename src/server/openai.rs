//! The OpenAI-compatible endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

use super::messages::messages;
use super::sse::{collect, sse, usage, Done, Kind};
use super::tools::{tool_spec, with_tools};
use super::{off_workers, parse_object, ApiError, Shared};
use crate::generate::{FinishReason, GenerationConfig, GenerationDefaults};
use crate::sampling::SamplingConfig;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) type Obj = Map<String, Value>;
pub(crate) type ApiResult<T> = std::result::Result<T, ApiError>;

pub(crate) fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = chrono::Utc::now().timestamp_micros();
    format!("{prefix}-{t:x}{n:04x}")
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// An optional number field within `[lo, hi]`.
pub(crate) fn number(o: &Obj, key: &'static str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.is_finite() && x >= lo && x <= hi {
                Ok(Some(x))
            } else {
                Err(ApiError::bad(
                    key,
                    format!("{key} must be between {lo} and {hi}, got {n}"),
                ))
            }
        }
        Some(other) => Err(ApiError::bad(
            key,
            format!("{key} must be a number, got {other}"),
        )),
    }
}

/// An optional positive integer field.
pub(crate) fn positive_int(o: &Obj, key: &'static str) -> ApiResult<Option<usize>> {
    int_in(o, key, 1, u64::MAX, "a positive integer")
}

/// An optional integer field from `lo` to `hi` (`what` names the range in the error).
pub(crate) fn int_in(
    o: &Obj,
    key: &'static str,
    lo: u64,
    hi: u64,
    what: &str,
) -> ApiResult<Option<usize>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (lo..=hi).contains(&v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
            _ => Err(ApiError::bad(key, format!("{key} must be {what}, got {n}"))),
        },
        Some(other) => Err(ApiError::bad(
            key,
            format!("{key} must be an integer, got {other}"),
        )),
    }
}

fn boolean(o: &Obj, key: &'static str) -> ApiResult<bool> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad(
            key,
            format!("{key} must be true or false, got {other}"),
        )),
    }
}

/// Sampling from `temperature` (0 = greedy) and `top_p`, with the given defaults.
pub(crate) fn sampling(
    o: &Obj,
    default_temperature: f64,
    default_top_p: f64,
    seed: Option<u64>,
) -> ApiResult<SamplingConfig> {
    let temperature = number(o, "temperature", 0.0, 2.0)?.unwrap_or(default_temperature);
    let top_p = number(o, "top_p", 0.0, 1.0)?.unwrap_or(default_top_p);
    if top_p == 0.0 {
        return Err(ApiError::bad("top_p", "top_p must be greater than 0"));
    }
    Ok(SamplingConfig {
        do_sample: temperature > 0.0,
        temperature: if temperature > 0.0 { temperature } else { 1.0 },
        top_p,
        seed,
        ..Default::default()
    })
}

/// The fields every completion request shares.
pub(crate) struct Common {
    /// The model id the response names (the base model's, or the adapter's).
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<usize>,
    pub cfg: GenerationConfig,
}

/// Most stop strings a request may give, and the longest one (OpenAI itself takes 4).
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_CHARS: usize = 1024;

/// Request fields of the OpenAI API that glm2rs does not implement yet: given a value that asks
/// for the feature, the request is refused with a 400 naming the field rather than answered as
/// if the field were absent. (`false`, `null`, empty lists and the "off" values pass.)
fn refuse_unsupported(o: &Obj, tools_ok: bool) -> ApiResult<()> {
    let asks = |key: &str| -> bool {
        match o.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::String(v)) => match key {
                "tool_choice" | "function_call" => v != "none",
                "suffix" => !v.is_empty(),
                _ => true,
            },
            Some(Value::Object(m)) if key == "response_format" => {
                m.get("type").and_then(Value::as_str) != Some("text")
            }
            Some(Value::Number(n)) if key == "best_of" => n.as_u64() != Some(1),
            Some(_) => true,
        }
    };
    for key in [
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "best_of",
        "suffix",
    ] {
        if asks(key) && !(tools_ok && matches!(key, "tools" | "tool_choice")) {
            return Err(ApiError::bad(
                Some(key),
                format!("{key} is not supported by this server yet"),
            ));
        }
    }
    Ok(())
}

/// `tools_ok`: the endpoint takes `tools` (chat).
fn common(
    o: &Obj,
    default_temperature: f64,
    default_top_p: f64,
    tools_ok: bool,
) -> ApiResult<Common> {
    refuse_unsupported(o, tools_ok)?;
    if let Some(n) = positive_int(o, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            Some(n.as_u64().unwrap_or_else(|| n.as_i64().unwrap_or(0) as u64))
        }
        Some(other) => {
            return Err(ApiError::bad(
                "seed",
                format!("seed must be an integer, got {other}"),
            ))
        }
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::bad(
                    "stop",
                    "stop must be a string or a list of strings",
                )),
            })
            .collect::<ApiResult<Vec<_>>>()?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("stop", "stop strings must not be empty"));
    }
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::bad(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters"
            ),
        ));
    }
    let max_tokens = match positive_int(o, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => positive_int(o, "max_tokens")?,
    };
    let stream = boolean(o, "stream")?;
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")?,
        Some(_) => {
            return Err(ApiError::bad(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    let sampling = sampling(o, default_temperature, default_top_p, seed)?;
    Ok(Common {
        model: String::new(),
        stream,
        include_usage,
        max_tokens,
        cfg: GenerationConfig {
            sampling,
            stop_strings: stop,
            ..Default::default()
        },
    })
}

/// Check the prompt and `max_tokens` against the context and set the length limit.
/// Check the prompt (the request field `prompt_field`) and max_tokens against the context.
fn fit(s: &Shared, prompt_field: &'static str, prompt_len: usize, c: &mut Common) -> ApiResult<()> {
    let context = s.engine.model().model().max_context();
    if prompt_len >= context {
        return Err(ApiError::bad(
            prompt_field,
            format!("the prompt has {prompt_len} tokens; this model's context is {context} tokens"),
        )
        .with_code("context_length_exceeded"));
    }
    match c.max_tokens {
        Some(m) if prompt_len.saturating_add(m) > context => {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "this model's context is {context} tokens; the prompt has {prompt_len} and max_tokens asks for {m} more"
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => c.cfg.max_new_tokens = Some(m),
        None => c.cfg.max_length = Some(context),
    }
    Ok(())
}

pub async fn models(State(s): State<Shared>) -> Json<Value> {
    let mut data = vec![
        json!({"id": s.model_name, "object": "model", "created": s.created,
                               "owned_by": "glm2rs", "root": s.model_name, "parent": null}),
    ];
    for name in s.engine.model().adapter_names() {
        data.push(json!({"id": name, "object": "model", "created": s.created,
                         "owned_by": "glm2rs", "root": name, "parent": s.model_name}));
    }
    Json(json!({"object": "list", "data": data}))
}

/// The request's `model`: an adapter loaded beside the weights runs the request with that
/// adapter; the base model's id, or any name on a server without adapters (clients send
/// their own defaults), runs the base model. A server with adapters answers 404 for other
/// names, so that a misspelt adapter is never served by the base model silently.
fn pick_model(s: &Shared, o: &Obj, c: &mut Common) -> ApiResult<()> {
    c.model = s.model_name.clone();
    let adapters = s.engine.model().adapter_names();
    let name = match o.get("model") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(n)) => n,
        Some(other) => {
            return Err(ApiError::bad(
                "model",
                format!("model must be a string, got {other}"),
            ))
        }
    };
    if adapters.contains(name) {
        c.cfg.adapter = Some(name.clone());
        c.model = name.clone();
    } else if !adapters.is_empty() && *name != s.model_name {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::refused(
                axum::http::StatusCode::NOT_FOUND,
                Some("model_not_found"),
                format!(
                    "The model `{name}` does not exist: this server has {} and the adapters {}",
                    s.model_name,
                    adapters.join(", ")
                ),
            )
        });
    }
    Ok(())
}

/// How a completion is presented: chat (post-processed deltas) or plain text.
pub async fn chat_completions(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let o = parse_object(&body)?;
    let model = s.engine.model();
    let tools = tool_spec(&o, model.tokenizer().has_roles())?;
    let mut msgs = messages(&o)?;
    if let Some(t) = &tools {
        msgs = with_tools(msgs, t);
    }
    let d = GenerationDefaults::CHAT;
    let mut c = common(&o, d.temperature, d.top_p, true)?;
    pick_model(&s, &o, &mut c)?;
    c.cfg.logprobs = super::logprobs::chat_request(&o)?;
    let ids = {
        let model = model.clone();
        let forced = tools.as_ref().and_then(|t| t.forced.clone());
        off_workers(move || {
            let (query, history) = msgs.split_last().expect("checked non-empty");
            let mut ids = model.chat_prompt_ids(query, history)?;
            // a forced call: its name is the answer's first line, the model writes the arguments
            if let Some(name) = forced {
                ids.extend(model.tokenizer().encode(&format!("{name}\n"), false)?);
            }
            Ok(ids)
        })
        .await
        .map_err(|e| ApiError::from_engine(e, Some("messages")))?
    };
    fit(&s, "messages", ids.len(), &mut c)?;
    let cfg = model.chat_config(&c.cfg);
    let rx = s
        .engine
        .submit(ids, &cfg)
        .map_err(|e| ApiError::from_engine(e, None))?;
    let id = new_id("chatcmpl");
    let tok = c.cfg.logprobs.map(|_| model.tokenizer().clone());
    if c.stream {
        return Ok(sse(&s, rx, Kind::Chat, id, &c, tools.as_ref()));
    }
    let (answer, done) = collect(rx, Kind::Chat, tools.as_ref()).await?;
    let lp = match &tok {
        Some(t) => super::logprobs::chat_json(t, &done.logprobs),
        None => Value::Null,
    };
    let (message, finish) = match answer.call {
        Some((name, arguments)) => (
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": new_id("call"), "type": "function",
                "function": {"name": name, "arguments": arguments},
            }]}),
            if answer.call_complete {
                "tool_calls"
            } else {
                done.reason.as_str()
            },
        ),
        None => (
            json!({"role": "assistant", "content": answer.text}),
            done.reason.as_str(),
        ),
    };
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": now(), "model": c.model,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}],
        "usage": usage(&done),
    }))
    .into_response())
}

pub async fn completions(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let o = parse_object(&body)?;
    let prompt = match o.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::bad(
                "prompt",
                "only one prompt per request is supported",
            ))
        }
        None => return Err(ApiError::bad("prompt", "prompt is required")),
        Some(_) => return Err(ApiError::bad("prompt", "prompt must be a string")),
    };
    let echo = boolean(&o, "echo")?;
    // echo with max_tokens 0: score the prompt only (what evaluation harnesses ask)
    let score_only =
        echo && matches!(o.get("max_tokens"), Some(Value::Number(n)) if n.as_u64() == Some(0));
    let mut o = o;
    if score_only {
        o.remove("max_tokens");
    }
    let d = GenerationDefaults::COMPLETIONS;
    let mut c = common(&o, d.temperature, d.top_p, false)?;
    pick_model(&s, &o, &mut c)?;
    c.cfg.logprobs = super::logprobs::completion_request(&o)?;
    c.max_tokens = c.max_tokens.or(d.max_new_tokens);
    if echo && c.stream {
        return Err(ApiError::bad("echo", "echo is not supported with stream"));
    }
    let tok = s.engine.model().tokenizer().clone();
    let ids = {
        let (tok, prompt) = (tok.clone(), prompt.clone());
        off_workers(move || tok.encode(&prompt, true))
            .await
            .map_err(|e| ApiError::from_engine(e, Some("prompt")))?
    };
    fit(&s, "prompt", ids.len(), &mut c)?;
    // the prompt's own log-probabilities (echo): one forward over it, off the async workers
    let prompt_lp = match (echo, c.cfg.logprobs) {
        (true, Some(k)) => {
            let (model, ids) = (
                s.engine.model().with_adapter(c.cfg.adapter.as_deref()),
                ids.clone(),
            );
            let model = model.map_err(|e| ApiError::from_engine(e, Some("model")))?;
            Some(
                off_workers(move || super::logprobs::prompt_logprobs(&model, &ids, k))
                    .await
                    .map_err(|e| ApiError::from_engine(e, Some("prompt")))?,
            )
        }
        _ => None,
    };
    let id = new_id("cmpl");
    let (text, done) = if score_only {
        let done = Done {
            reason: FinishReason::Length,
            prompt_tokens: ids.len(),
            completion_tokens: 0,
            cached_tokens: 0,
            logprobs: vec![],
        };
        (String::new(), done)
    } else {
        let rx = s
            .engine
            .submit(ids.clone(), &c.cfg)
            .map_err(|e| ApiError::from_engine(e, None))?;
        if c.stream {
            return Ok(sse(&s, rx, Kind::Text, id, &c, None));
        }
        let (answer, done) = collect(rx, Kind::Text, None).await?;
        (answer.text, done)
    };
    let lp = match (&prompt_lp, c.cfg.logprobs) {
        (Some(p), _) => super::logprobs::echo_json(&tok, &ids, p, &done.logprobs)
            .map_err(|e| ApiError::from_engine(e, None))?,
        (None, Some(_)) => super::logprobs::completion_json(&tok, &done.logprobs, 0),
        (None, None) => Value::Null,
    };
    let text = if echo { prompt + &text } else { text };
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": now(), "model": c.model,
        "choices": [{"index": 0, "text": text, "logprobs": lp,
                     "finish_reason": done.reason.as_str()}],
        "usage": usage(&done),
    }))
    .into_response())
}
