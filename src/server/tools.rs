//! OpenAI's `tools` / `tool_choice` on ChatGLM3's own convention (`chat_format::tools`): the
//! functions listed in a system turn, the model's call (`name\n```python\ntool_call(...)\n````)
//! answered as `tool_calls`, results fed back as `<|observation|>` turns. Follows THUDM/ChatGLM3
//! `openai_api_demo/utils.py` (`process_chatglm_messages`: with tools, a system message with the
//! tools preamble replaces the client's first system message; `process_response`: an answer whose
//! first line is not empty is a call) and `api_server.py` (a call is recognised once the first
//! line of the answer is complete, so a plain answer streams as before).
//!
//! Decisions where the demo is silent: the model sees the `function` objects of OpenAI's tool list
//! (`{"name", "description", "parameters"}`, the form ChatGLM3 was trained on, keys in the order
//! the client sent them); `tool_choice: "none"` leaves the tools out of the prompt; a named
//! function (or `"required"` with one tool) is forced by writing its name as the answer's first
//! line, so the model writes only the arguments; a ChatGLM2 model given tools is a 400.

use super::openai::{ApiResult, Obj};
use super::ApiError;
use crate::chat_format::tools::{parse_tool_call, tools_system_content, ToolCall};
use crate::chat_format::{Message, ResponseStream};
use serde_json::Value;

/// The tools of a request that uses them.
#[derive(Debug, Clone)]
pub(crate) struct ToolSpec {
    /// The `function` objects, as the model sees them.
    pub functions: Vec<Value>,
    /// The function the answer must call (`tool_choice` naming one).
    pub forced: Option<String>,
}

/// `tools` and `tool_choice` of a chat request: `None` when the request uses no tools (none given,
/// or `tool_choice: "none"`). `has_roles`: the model speaks ChatGLM3's format.
pub(crate) fn tool_spec(o: &Obj, has_roles: bool) -> ApiResult<Option<ToolSpec>> {
    let no_tools = || match o.get("tool_choice") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "none" => Ok(None),
        Some(_) => Err(ApiError::bad(
            "tool_choice",
            "tool_choice is only allowed when tools are given",
        )),
    };
    let tools = match o.get("tools") {
        None | Some(Value::Null) => return no_tools(),
        Some(Value::Array(a)) if a.is_empty() => return no_tools(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad("tools", "tools must be a list")),
    };
    let mut functions = Vec::with_capacity(tools.len());
    for t in tools {
        let ok_type = t.get("type").and_then(Value::as_str) == Some("function");
        let f = t.get("function").filter(|f| f.is_object());
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        match (ok_type, f, name) {
            (true, Some(f), Some(n)) if !n.trim().is_empty() && !n.contains('\n') => functions.push(f.clone()),
            _ => {
                return Err(ApiError::bad(
                    "tools",
                    "every tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}} with a one-line name",
                ))
            }
        }
    }
    let names: Vec<&str> = functions
        .iter()
        .filter_map(|f| f.get("name").and_then(Value::as_str))
        .collect();
    let forced = match o.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => None,
            "required" if names.len() == 1 => Some(names[0].to_string()),
            "required" => {
                return Err(ApiError::bad(
                    "tool_choice",
                    "tool_choice \"required\" with several tools is not supported: name the function \
                     ({\"type\": \"function\", \"function\": {\"name\": ...}}) or use \"auto\"",
                ))
            }
            other => {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("tool_choice must be \"none\", \"auto\", \"required\" or a named function, got \"{other}\""),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::bad("tool_choice", "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")
                })?;
            if !names.contains(&name) {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("tool_choice names \"{name}\", which is not among the tools"),
                ));
            }
            Some(name.to_string())
        }
    };
    if !has_roles {
        return Err(ApiError::bad(
            "tools",
            "this model speaks ChatGLM2's format, which has no tool calls: tools need a ChatGLM3 model",
        ));
    }
    Ok(Some(ToolSpec { functions, forced }))
}

/// The conversation the model sees: the tools' system turn first (replacing the client's first
/// system message, as `process_chatglm_messages` does).
pub(crate) fn with_tools(msgs: Vec<Message>, spec: &ToolSpec) -> Vec<Message> {
    let mut out = vec![Message::new(
        "system",
        &tools_system_content(&Value::Array(spec.functions.clone())),
    )];
    let mut dropped = false;
    for m in msgs {
        if m.role == "system" && !dropped {
            dropped = true;
            continue;
        }
        out.push(m);
    }
    out
}

/// One piece of a chat answer as the client gets it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Content(String),
    /// A call began: its name is known (the arguments follow at the end).
    CallName(String),
    /// The call's arguments, a JSON object text.
    CallArguments(String),
}

#[derive(Debug)]
enum State {
    /// The answer's first two lines are not complete yet (tools asked for).
    Undecided,
    Plain,
    Call,
}

/// The answer of a chat request, from the engine's raw text: `process_response` for plain
/// answers; with tools, a call when the answer's first line is a name and the second opens the
/// code fence (`process_response` takes any non-empty first line; the fence as well keeps a
/// one-line text answer from being announced as a call).
#[derive(Debug)]
pub(crate) struct ChatAnswer {
    state: State,
    raw: String,
    post: ResponseStream,
    forced: Option<String>,
    /// A call was announced (its name sent).
    called: bool,
    /// ... and its arguments parsed.
    complete: bool,
}

impl ChatAnswer {
    pub fn new(tools: Option<&ToolSpec>) -> Self {
        let forced = tools.and_then(|t| t.forced.clone());
        Self {
            state: if tools.is_some() {
                State::Undecided
            } else {
                State::Plain
            },
            raw: String::new(),
            post: ResponseStream::new(),
            forced,
            called: false,
            complete: false,
        }
    }

    /// Whether the answer is a whole call (announced, and its arguments parsed).
    pub fn made_call(&self) -> bool {
        self.called && self.complete
    }

    /// The finish reason: `tool_calls` for a whole call, else the engine's.
    pub fn finish_reason<'a>(&self, engine: &'a str) -> &'a str {
        if self.made_call() {
            "tool_calls"
        } else {
            engine
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = vec![];
        match self.state {
            State::Plain => push_content(&mut out, self.post.push(text)),
            State::Call => self.raw.push_str(text),
            State::Undecided => {
                self.raw.push_str(text);
                if let Some(name) = self.forced.clone() {
                    self.state = State::Call;
                    self.called = true;
                    out.push(Piece::CallName(name));
                } else if let Some((first, rest)) = self.raw.split_once('\n') {
                    if first.trim().is_empty() {
                        self.state = State::Plain;
                    } else if rest.starts_with("```") {
                        self.state = State::Call;
                        self.called = true;
                        out.push(Piece::CallName(first.trim().to_string()));
                    } else if rest.len() >= 3 || !"```".starts_with(rest) {
                        self.state = State::Plain;
                    }
                    if matches!(self.state, State::Plain) {
                        let raw = std::mem::take(&mut self.raw);
                        push_content(&mut out, self.post.push(&raw));
                    }
                }
            }
        }
        out
    }

    /// The rest once the answer is complete. A call whose arguments do not parse (cut by
    /// `max_tokens`, or not `tool_call(...)` of literals) keeps the text the model wrote as its
    /// arguments, and the engine's finish reason.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = vec![];
        match self.state {
            State::Plain => push_content(&mut out, self.post.finish()),
            State::Undecided => {
                let raw = std::mem::take(&mut self.raw);
                self.state = State::Plain;
                push_content(&mut out, self.post.push(&raw));
                push_content(&mut out, self.post.finish());
            }
            State::Call => {
                let text = match &self.forced {
                    Some(name) => format!("{name}\n{}", self.raw),
                    None => self.raw.clone(),
                };
                match parse_tool_call(&text) {
                    Ok(Some(ToolCall { arguments, .. })) => {
                        self.complete = true;
                        out.push(Piece::CallArguments(arguments));
                    }
                    _ => {
                        let body = text.split_once('\n').map_or("", |(_, b)| b);
                        out.push(Piece::CallArguments(body.trim().to_string()));
                    }
                }
            }
        }
        out
    }
}

fn push_content(out: &mut Vec<Piece>, s: String) {
    if !s.is_empty() {
        out.push(Piece::Content(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: Option<&ToolSpec>, pieces: &[&str]) -> (Vec<Piece>, &'static str) {
        let mut a = ChatAnswer::new(spec);
        let mut out = vec![];
        for p in pieces {
            out.extend(a.push(p));
        }
        out.extend(a.finish());
        (out, a.finish_reason("stop"))
    }

    fn spec(forced: Option<&str>) -> ToolSpec {
        ToolSpec {
            functions: vec![serde_json::json!({"name": "get_weather"})],
            forced: forced.map(str::to_string),
        }
    }

    fn text(out: &[Piece]) -> String {
        out.iter()
            .map(|p| match p {
                Piece::Content(s) => s.as_str(),
                _ => panic!("{p:?}"),
            })
            .collect()
    }

    #[test]
    fn a_call_is_named_first_then_its_arguments() {
        let (out, finish) = run(
            Some(&spec(None)),
            &[
                "get_",
                "weather\n`",
                "``py",
                "thon\ntool_call(city='北京')\n```",
            ],
        );
        assert_eq!(finish, "tool_calls");
        assert_eq!(
            out,
            vec![
                Piece::CallName("get_weather".into()),
                Piece::CallArguments(r#"{"city":"北京"}"#.into())
            ]
        );
    }

    #[test]
    fn a_plain_answer_with_tools_is_text() {
        let (out, finish) = run(Some(&spec(None)), &["\n", "你好", "，我是 ChatGLM3  "]);
        assert_eq!(
            (text(&out).as_str(), finish),
            ("你好，我是 ChatGLM3", "stop")
        );
        // a first line without the code fence after it, or without any newline: text
        let (out, finish) = run(Some(&spec(None)), &["Hello\nwor", "ld"]);
        assert_eq!((text(&out).as_str(), finish), ("Hello\nworld", "stop"));
        let (out, _) = run(Some(&spec(None)), &["one line"]);
        assert_eq!(text(&out), "one line");
        let (out, _) = run(None, &["\n", "plain"]);
        assert_eq!(out, vec![Piece::Content("plain".into())]);
    }

    #[test]
    fn a_forced_call_gets_its_name_and_a_cut_call_keeps_its_text() {
        let (out, finish) = run(
            Some(&spec(Some("get_weather"))),
            &["```python\ntool_call(days=2)\n```"],
        );
        assert_eq!(finish, "tool_calls");
        assert_eq!(out[0], Piece::CallName("get_weather".into()));
        assert_eq!(out[1], Piece::CallArguments(r#"{"days":2}"#.into()));
        let (out, finish) = run(
            Some(&spec(None)),
            &["get_weather\n```python\ntool_call(city="],
        );
        assert_eq!(finish, "stop");
        assert_eq!(out[0], Piece::CallName("get_weather".into()));
        assert_eq!(
            out[1],
            Piece::CallArguments("```python\ntool_call(city=".into())
        );
    }
}
