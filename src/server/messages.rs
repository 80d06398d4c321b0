//! The `messages` of a chat completion request: roles and text content checked, as the
//! conversation the chat format renders.

use super::openai::{ApiResult, Obj};
use super::ApiError;
use crate::chat_format::Message;
use serde_json::Value;

fn message_content(v: &Value) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        // [{"type": "text", "text": ...}, ...]
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            "messages",
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::bad(
            "messages",
            "a message's content must be a string",
        )),
    }
}

pub(crate) fn messages(o: &Obj) -> ApiResult<Vec<Message>> {
    let Some(list) = o.get("messages") else {
        return Err(ApiError::bad("messages", "messages is required"));
    };
    let Value::Array(list) = list else {
        return Err(ApiError::bad("messages", "messages must be a list"));
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("messages", "every message needs a string \"role\""))?;
        if !matches!(role, "system" | "user" | "assistant" | "observation") {
            return Err(ApiError::bad(
                "messages",
                format!("unknown role \"{role}\""),
            ));
        }
        let content = message_content(m.get("content").unwrap_or(&Value::Null))?;
        out.push(Message::new(role, &content));
    }
    if out.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(ApiError::bad(
            "messages",
            "the last message must come from the user",
        ));
    }
    Ok(out)
}
