//! ChatGLM3's tool calls (the server's `tools`: `server/tools.rs`): the system turn that lists the tools,
//! the model's call parsed into a name and JSON arguments, and a call rendered back into the
//! assistant turn of a history. Follows the official code:
//! - ChatGLM3 `openai_api_demo/utils.py` `process_chatglm_messages`: with tools, a first system
//!   message `"Answer the following questions as best as you can. You have access to the
//!   following tools:"` carrying them; `tokenization_chatglm.py` `build_chat_input` appends
//!   `"\n" + json.dumps(tools, indent=4, ensure_ascii=False)` to that system content.
//! - `utils.py` `process_response(output, use_tool=True)`: the answer after `<|assistant|>` is
//!   `metadata\ncontent`; an empty metadata line is a plain answer, otherwise metadata is the tool
//!   name and the content's lines without the first and the last (the code fence) are
//!   `tool_call(key=value, ...)`, evaluated to the keyword arguments.

use crate::error::{Error, Result};
use serde_json::{Map, Number, Value};

/// The system content ChatGLM3's demos put before the tools.
pub const TOOLS_PREAMBLE: &str =
    "Answer the following questions as best as you can. You have access to the following tools:";

/// `json.dumps(value, indent=4, ensure_ascii=False)`: serde_json's pretty printer with a 4-space
/// indent writes Python's layout (`",\n"` between items, `": "` after keys, empty containers as
/// `[]` / `{}`, non-ASCII as is), keys in the order given (serde_json's `preserve_order`, on for
/// this crate, keeps a request's order).
pub fn python_json_dumps(v: &Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"    "),
    );
    v.serialize(&mut ser)
        .expect("a JSON value serializes into memory");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The system content listing `tools` (as `build_chat_input` renders a system message with tools).
pub fn tools_system_content(tools: &Value) -> String {
    format!("{TOOLS_PREAMBLE}\n{}", python_json_dumps(tools))
}

/// A call the model made: the tool's name and its arguments as a JSON object text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// `process_response(output, use_tool=True)` for one answer: `None` for a plain answer (empty
/// metadata line), the call otherwise. The arguments must be `tool_call(...)` with literal
/// keyword values (what the official code `eval`s; here parsed, never executed).
pub fn parse_tool_call(answer: &str) -> Result<Option<ToolCall>> {
    // the official loop keeps the last of several `<|assistant|>` segments
    let last = answer.rsplit("<|assistant|>").next().unwrap_or(answer);
    let (metadata, content) = last.split_once('\n').unwrap_or((last, ""));
    if metadata.trim().is_empty() {
        return Ok(None);
    }
    let lines: Vec<&str> = content.split('\n').collect();
    let body = if lines.len() >= 2 {
        lines[1..lines.len() - 1].join("\n")
    } else {
        String::new()
    };
    let args = parse_call(body.trim())?;
    Ok(Some(ToolCall {
        name: metadata.trim().to_string(),
        arguments: serde_json::to_string(&Value::Object(args))
            .map_err(|e| Error::Internal(e.to_string()))?,
    }))
}

/// The assistant turn of a call in a history: (metadata, content) as ChatGLM3 writes it.
pub fn render_tool_call(call: &ToolCall) -> Result<(String, String)> {
    let args: Value = serde_json::from_str(&call.arguments)
        .map_err(|e| Error::invalid(format!("tool call arguments are not JSON: {e}")))?;
    let Value::Object(m) = args else {
        return Err(Error::invalid("tool call arguments must be a JSON object"));
    };
    let kwargs: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k}={}", python_repr(v)))
        .collect();
    Ok((
        call.name.clone(),
        format!("```python\ntool_call({})\n```", kwargs.join(", ")),
    ))
}

/// Python's `repr` of a JSON value (strings in single quotes, True / False / None).
fn python_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let q = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut out = String::from(q);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == q => {
                        out.push('\\');
                        out.push(c);
                    }
                    c => out.push(c),
                }
            }
            out.push(q);
            out
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    python_repr(&Value::String(k.clone())),
                    python_repr(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `tool_call(k=v, ...)` with Python literal values into a JSON object.
fn parse_call(s: &str) -> Result<Map<String, Value>> {
    let bad = |why: &str| Error::invalid(format!("tool call {s:?}: {why}"));
    let inner = s
        .strip_prefix("tool_call(")
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| bad("expected tool_call(...)"))?;
    let mut p = Lit {
        s: inner.as_bytes(),
        i: 0,
    };
    let mut out = Map::new();
    loop {
        p.ws();
        if p.done() {
            break;
        }
        let key = p.ident().ok_or_else(|| bad("expected a keyword"))?;
        p.ws();
        if !p.eat(b'=') {
            return Err(bad("expected = after a keyword"));
        }
        let v = p.value().map_err(|w| bad(&w))?;
        out.insert(key, v);
        p.ws();
        if p.done() {
            break;
        }
        if !p.eat(b',') {
            return Err(bad("expected , between arguments"));
        }
    }
    Ok(out)
}

/// A reader of Python literals: strings, numbers, True / False / None, lists, tuples, dicts.
struct Lit<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn ident(&mut self) -> Option<String> {
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'_')
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn value(&mut self) -> std::result::Result<Value, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'\'') | Some(b'"') => self.string().map(Value::String),
            Some(b'[') | Some(b'(') => {
                let close = if self.s[self.i] == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = vec![];
                loop {
                    self.ws();
                    if self.eat(close) {
                        break;
                    }
                    items.push(self.value()?);
                    self.ws();
                    if !self.eat(b',') {
                        self.ws();
                        if !self.eat(close) {
                            return Err("unclosed list".into());
                        }
                        break;
                    }
                }
                Ok(Value::Array(items))
            }
            Some(b'{') => {
                self.i += 1;
                let mut m = Map::new();
                loop {
                    self.ws();
                    if self.eat(b'}') {
                        break;
                    }
                    let Value::String(k) = self.value()? else {
                        return Err("dict keys must be strings".into());
                    };
                    self.ws();
                    if !self.eat(b':') {
                        return Err("expected : in a dict".into());
                    }
                    let v = self.value()?;
                    m.insert(k, v);
                    self.ws();
                    if !self.eat(b',') {
                        self.ws();
                        if !self.eat(b'}') {
                            return Err("unclosed dict".into());
                        }
                        break;
                    }
                }
                Ok(Value::Object(m))
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && !b",)]}: \n\t".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let word =
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                match word {
                    "True" => Ok(Value::Bool(true)),
                    "False" => Ok(Value::Bool(false)),
                    "None" => Ok(Value::Null),
                    w => {
                        if let Ok(i) = w.parse::<i64>() {
                            Ok(Value::Number(i.into()))
                        } else if let Some(n) = w.parse::<f64>().ok().and_then(Number::from_f64) {
                            Ok(Value::Number(n))
                        } else {
                            Err(format!("{w:?} is not a literal"))
                        }
                    }
                }
            }
            None => Err("missing value".into()),
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out: Vec<u8> = vec![];
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            if c == q {
                return String::from_utf8(out).map_err(|e| e.to_string());
            }
            if c == b'\\' {
                let e = *self.s.get(self.i).ok_or("unfinished escape")?;
                self.i += 1;
                match e {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'\\' | b'\'' | b'"' => out.push(e),
                    other => {
                        out.push(b'\\');
                        out.push(other);
                    }
                }
            } else {
                out.push(c);
            }
        }
        Err("unclosed string".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_dumps_like_python() {
        // python3 -c 'import json; print(json.dumps([{"name": "get_weather", "description":
        //   "天气", "parameters": {"type": "object", "properties": {}, "required": ["city"]}}],
        //   indent=4, ensure_ascii=False))' (keys in the order given: serde_json's
        //   preserve_order keeps a request's order, as Python's dicts do)
        let v: Value = serde_json::from_str(
            r#"[{"name": "get_weather", "description": "天气", "parameters": {"type": "object", "properties": {}, "required": ["city"]}}]"#,
        )
        .unwrap();
        let want = "[\n    {\n        \"name\": \"get_weather\",\n        \"description\": \"天气\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {},\n            \"required\": [\n                \"city\"\n            ]\n        }\n    }\n]";
        assert_eq!(python_json_dumps(&v), want);
        // python3 -c 'import json; print(repr(json.dumps({"a": [], "b": "x\u0001\"y",
        //   "c": [1.5, None, True]}, indent=4, ensure_ascii=False)))'
        let v = serde_json::json!({"a": [], "b": "x\u{1}\"y", "c": [1.5, null, true]});
        assert_eq!(
            python_json_dumps(&v),
            "{\n    \"a\": [],\n    \"b\": \"x\\u0001\\\"y\",\n    \"c\": [\n        1.5,\n        null,\n        true\n    ]\n}"
        );
    }

    #[test]
    fn official_answers_parse() {
        assert_eq!(parse_tool_call("\n你好，我是 ChatGLM3").unwrap(), None);
        let call = parse_tool_call(
            "get_weather\n```python\ntool_call(city='北京', days=3, units=\"metric\", detail=True, extra=None, tags=['a', \"b\"], opts={'x': 1.5})\n```",
        )
        .unwrap()
        .unwrap();
        assert_eq!(call.name, "get_weather");
        let args: Value = serde_json::from_str(&call.arguments).unwrap();
        assert_eq!(
            args,
            serde_json::json!({"city": "北京", "days": 3, "units": "metric", "detail": true,
                               "extra": null, "tags": ["a", "b"], "opts": {"x": 1.5}})
        );
        assert!(parse_tool_call("f\n```python\nos.system('x')\n```").is_err());
        assert!(parse_tool_call("f\n```python\ntool_call(a=__import__('os'))\n```").is_err());
    }

    #[test]
    fn a_rendered_call_parses_back() {
        let call = ToolCall {
            name: "search".into(),
            arguments: r#"{"q": "it's \"quoted\"\n", "n": 2, "flag": false, "v": [1, null]}"#
                .into(),
        };
        let (meta, content) = render_tool_call(&call).unwrap();
        let back = parse_tool_call(&format!("{meta}\n{content}"))
            .unwrap()
            .unwrap();
        assert_eq!(back.name, "search");
        let a: Value = serde_json::from_str(&back.arguments).unwrap();
        let b: Value = serde_json::from_str(&call.arguments).unwrap();
        assert_eq!(a, b);
    }
}
