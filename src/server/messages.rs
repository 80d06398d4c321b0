//! The `messages` of a chat completion request: roles and text content checked, as the
//! conversation the chat format renders.

use super::openai::{ApiResult, Obj};
use super::ApiError;
use crate::chat_format::tools::{render_tool_call, ToolCall};
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
        match role {
            "system" | "user" | "assistant" | "observation" => {}
            // a tool's result (OpenAI's `tool`, the older `function`): ChatGLM3's observation turn
            "tool" | "function" => {
                let content = message_content(m.get("content").unwrap_or(&Value::Null))?;
                out.push(Message::new("observation", &content));
                continue;
            }
            _ => {
                return Err(ApiError::bad(
                    "messages",
                    format!("unknown role \"{role}\""),
                ))
            }
        }
        // an assistant's calls: one ChatGLM3 assistant turn each (metadata: the tool's name)
        if let (Some(calls), "assistant") = (m.get("tool_calls").filter(|v| !v.is_null()), role) {
            let calls = calls
                .as_array()
                .ok_or_else(|| ApiError::bad("messages", "tool_calls must be a list"))?;
            for c in calls {
                out.push(tool_call_turn(c)?);
            }
            continue;
        }
        let content = message_content(m.get("content").unwrap_or(&Value::Null))?;
        out.push(Message::new(role, &content));
    }
    if !matches!(
        out.last().map(|m| m.role.as_str()),
        Some("user" | "observation")
    ) {
        return Err(ApiError::bad(
            "messages",
            "the last message must come from the user (or be a tool's result)",
        ));
    }
    Ok(out)
}

/// `{"type": "function", "function": {"name", "arguments"}}` of an assistant message as the
/// turn ChatGLM3 wrote for it (`chat_format::tools::render_tool_call`).
fn tool_call_turn(c: &Value) -> ApiResult<Message> {
    let f = c.get("function");
    let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
    let args = f.and_then(|f| f.get("arguments")).and_then(Value::as_str);
    let (Some(name), Some(args)) = (name, args) else {
        return Err(ApiError::bad(
            "messages",
            "every tool call needs function.name and function.arguments (a JSON text)",
        ));
    };
    let call = ToolCall {
        name: name.to_string(),
        arguments: args.to_string(),
    };
    let (metadata, content) =
        render_tool_call(&call).map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let mut m = Message::new("assistant", &content);
    m.metadata = metadata;
    Ok(m)
}
