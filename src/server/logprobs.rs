//! OpenAI's log-probability fields: the request side (`logprobs` / `top_logprobs` of chat
//! completions, the integer `logprobs` of completions) and the response shapes of both
//! (`choices[].logprobs.content[]` for chat; `tokens` / `token_logprobs` / `top_logprobs` /
//! `text_offset` for completions), from the engine's [`TokenLogprob`]s.

use super::openai::{int_in, ApiResult, Obj};
use super::ApiError;
use crate::generate::{TokenLogprob, MAX_TOP_LOGPROBS};
use crate::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// Most alternatives per token the legacy completions API takes (OpenAI's own limit).
const MAX_COMPLETION_LOGPROBS: u64 = 5;

fn count(o: &Obj, key: &'static str, most: u64) -> ApiResult<Option<usize>> {
    int_in(o, key, 0, most, &format!("an integer from 0 to {most}"))
}

/// Chat completions: `logprobs` (bool) and `top_logprobs` (0..=20, only with `logprobs`).
pub(crate) fn chat_request(o: &Obj) -> ApiResult<Option<usize>> {
    let on = match o.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(ApiError::bad(
                "logprobs",
                format!("logprobs must be a boolean, got {other}"),
            ))
        }
    };
    let top = count(o, "top_logprobs", MAX_TOP_LOGPROBS as u64)?;
    match (on, top) {
        (false, Some(k)) if k > 0 => Err(ApiError::bad(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (false, _) => Ok(None),
        (true, k) => Ok(Some(k.unwrap_or(0))),
    }
}

/// Completions: `logprobs` (0..=5 alternatives; the chosen token's always).
pub(crate) fn completion_request(o: &Obj) -> ApiResult<Option<usize>> {
    count(o, "logprobs", MAX_COMPLETION_LOGPROBS)
}

fn text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// The legacy `top_logprobs` entry of one token: `{token text: logprob}`, the likeliest first
/// (a text two alternatives share keeps the likelier).
fn top_map(tok: &Tokenizer, l: &TokenLogprob) -> Value {
    let mut m = Map::new();
    for &(i, p) in &l.top {
        m.entry(text(tok, i).0).or_insert(json!(p));
    }
    Value::Object(m)
}

/// `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
pub(crate) fn chat_json(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (t, b) = text(tok, id);
        json!({"token": t, "logprob": lp, "bytes": b})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|&(i, p)| entry(i, p)).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

/// The legacy shape: `{tokens, token_logprobs, top_logprobs, text_offset}`; offsets count
/// characters from `offset` (where this piece of text starts in the choice's text).
pub(crate) fn completion_json(tok: &Tokenizer, lps: &[TokenLogprob], offset: usize) -> Value {
    let mut tokens = vec![];
    let mut token_logprobs = vec![];
    let mut top = vec![];
    let mut offsets = vec![];
    let mut at = offset;
    for l in lps {
        let (t, _) = text(tok, l.token);
        offsets.push(at);
        at += t.chars().count();
        tokens.push(Value::String(t));
        token_logprobs.push(json!(l.logprob));
        top.push(top_map(tok, l));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// The prompt's log-probabilities for `echo`: each token after the first scored by the model's
/// logits at the position before it (log_softmax, with the `k` likeliest tokens there); the
/// first has none (as OpenAI's `null`).
pub(crate) fn prompt_logprobs(
    model: &crate::pipeline::Model,
    ids: &[u32],
    k: usize,
) -> crate::error::Result<Vec<Option<TokenLogprob>>> {
    let logits = model.logits(ids)?; // [n, vocab]
    let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    let mut out = vec![None];
    for (i, &id) in ids.iter().enumerate().skip(1) {
        out.push(Some(crate::generate::row_logprobs(&rows[i - 1], id, k)));
    }
    Ok(out)
}

/// The legacy shape for an echoed prompt and its completion: every token's text is what it adds
/// to the decoded text (so `text_offset` points into the response's text, the prompt first),
/// `null` log-probability for the first prompt token.
pub(crate) fn echo_json(
    tok: &Tokenizer,
    prompt_ids: &[u32],
    prompt: &[Option<TokenLogprob>],
    generated: &[TokenLogprob],
) -> crate::error::Result<Value> {
    let ids: Vec<u32> = prompt_ids
        .iter()
        .copied()
        .chain(generated.iter().map(|l| l.token))
        .collect();
    let entries: Vec<Option<&TokenLogprob>> = prompt
        .iter()
        .map(Option::as_ref)
        .chain(generated.iter().map(Some))
        .collect();
    let (mut tokens, mut token_logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut before = 0usize; // characters decoded before this token
    let mut text_before = String::new();
    for (i, e) in entries.iter().enumerate() {
        let decoded = tok.decode(&ids[..=i])?;
        let piece: String = decoded.chars().skip(before).collect();
        let added = if decoded.starts_with(&text_before) {
            piece
        } else {
            String::new()
        };
        offsets.push(before);
        before = decoded.chars().count();
        text_before = decoded;
        tokens.push(Value::String(added));
        match e {
            Some(l) => {
                token_logprobs.push(json!(l.logprob));
                top.push(top_map(tok, l));
            }
            None => {
                token_logprobs.push(Value::Null);
                top.push(Value::Null);
            }
        }
    }
    Ok(
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}),
    )
}
