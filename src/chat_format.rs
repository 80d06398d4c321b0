//! Prompt formats of the ChatGLM family, and the official response post-processing.

pub mod tools;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The official ChatGLM2 `build_prompt`:
/// `[Round N]\n\n问：{query}\n\n答：{response}\n\n` per past turn, then the open turn.
pub fn build_prompt(query: &str, history: &[(String, String)]) -> String {
    let mut prompt = String::new();
    for (i, (q, a)) in history.iter().enumerate() {
        prompt.push_str(&format!("[Round {}]\n\n问：{}\n\n答：{}\n\n", i + 1, q, a));
    }
    prompt.push_str(&format!(
        "[Round {}]\n\n问：{}\n\n答：",
        history.len() + 1,
        query
    ));
    prompt
}

/// Which conversation format a model speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `[Round N]\n\n问：...\n\n答：...`, history as (query, response) pairs.
    ChatGlm2,
    /// Role tokens `<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>`.
    ChatGlm3,
}

impl ChatFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "chatglm2" => Ok(ChatFormat::ChatGlm2),
            "chatglm3" => Ok(ChatFormat::ChatGlm3),
            other => Err(Error::invalid(format!(
                "chat_format \"{other}\": use \"chatglm2\" or \"chatglm3\""
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ChatFormat::ChatGlm2 => "chatglm2",
            ChatFormat::ChatGlm3 => "chatglm3",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `observation`.
    pub role: String,
    pub content: String,
    /// ChatGLM3 metadata (e.g. a tool name); empty for plain turns.
    pub metadata: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            metadata: String::new(),
        }
    }
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "observation"];

/// ChatGLM2 history as (query, response) pairs; other roles are an error.
pub fn pairs_from_messages(history: &[Message]) -> Result<Vec<(String, String)>> {
    let mut pairs = vec![];
    let mut it = history.iter();
    while let Some(q) = it.next() {
        if q.role != "user" {
            return Err(Error::invalid(format!(
                "ChatGLM2 has no \"{}\" role: its history is (query, response) pairs{}",
                q.role,
                if q.role == "system" {
                    " and it takes no system prompt (use a ChatGLM3 model)"
                } else {
                    ""
                }
            )));
        }
        let a = it
            .next()
            .ok_or_else(|| Error::invalid("ChatGLM2 history must alternate query and response"))?;
        if a.role != "assistant" {
            return Err(Error::invalid(
                "ChatGLM2 history must alternate query and response",
            ));
        }
        pairs.push((q.content.clone(), a.content.clone()));
    }
    Ok(pairs)
}

/// ChatGLM3's `build_single_message`: `<|role|>` + encode(metadata + "\n") + encode(content).
pub fn chatglm3_message_ids(tok: &Tokenizer, m: &Message) -> Result<Vec<u32>> {
    if !ROLES.contains(&m.role.as_str()) {
        return Err(Error::invalid(format!(
            "unknown role \"{}\": ChatGLM3 roles are system, user, assistant, observation",
            m.role
        )));
    }
    let role_id = tok.special_id(&format!("<|{}|>", m.role)).ok_or_else(|| {
        Error::invalid(
            "this tokenizer has no ChatGLM3 role tokens (load with chat_format=\"chatglm3\")",
        )
    })?;
    let mut ids = vec![role_id];
    ids.extend(tok.encode(&format!("{}\n", m.metadata), false)?);
    ids.extend(tok.encode(&m.content, false)?);
    Ok(ids)
}

/// ChatGLM3's `build_chat_input`: `[gMASK] sop`, every message, then `<|assistant|>`.
pub fn chatglm3_prompt_ids(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    let special = |n: &str| {
        tok.special_id(n)
            .ok_or_else(|| Error::invalid(format!("tokenizer lacks {n}")))
    };
    let mut ids = vec![special("[gMASK]")?, special("sop")?];
    for m in messages {
        ids.extend(chatglm3_message_ids(tok, m)?);
    }
    ids.push(special("<|assistant|>")?);
    Ok(ids)
}

/// The ids that end a ChatGLM3 answer besides eos.
pub fn chatglm3_stop_ids(tok: &Tokenizer) -> Vec<u32> {
    ["<|user|>", "<|observation|>"]
        .iter()
        .filter_map(|n| tok.special_id(n))
        .collect()
}

/// The official ChatGLM2 `process_response`: strip, and `[[训练时间]]` becomes `2023年`.
pub fn process_response(text: &str) -> String {
    text.trim().replace(TRAINING_TIME, "2023年")
}

const TRAINING_TIME: &str = "[[训练时间]]";

/// Applies [`process_response`] to streamed pieces: the pieces it returns join to exactly
/// `process_response(all input)`. Leading whitespace is dropped, trailing whitespace and a
/// possible start of `[[训练时间]]` are held back until the text goes on.
#[derive(Debug, Default, Clone)]
pub struct ResponseStream {
    raw: String,
    emitted: String,
}

impl ResponseStream {
    pub fn new() -> Self {
        Self::default()
    }

    fn held_len(&self) -> usize {
        let ws = self.raw.len() - self.raw.trim_end().len();
        let body = &self.raw[..self.raw.len() - ws];
        let mut marker = 0;
        for (i, _) in TRAINING_TIME.char_indices().skip(1) {
            if body.ends_with(&TRAINING_TIME[..i]) {
                marker = i;
            }
        }
        if marker > 0 {
            self.raw.len() - (body.len() - marker)
        } else {
            ws
        }
    }

    fn emit(&mut self, processed: String) -> String {
        match processed.strip_prefix(self.emitted.as_str()) {
            Some(rest) if !rest.is_empty() => {
                let rest = rest.to_string();
                self.emitted = processed;
                rest
            }
            _ => String::new(),
        }
    }

    /// Add raw text; returns the processed text that is now certain.
    pub fn push(&mut self, piece: &str) -> String {
        self.raw.push_str(piece);
        let stable = &self.raw[..self.raw.len() - self.held_len()];
        let processed = stable.trim_start().replace(TRAINING_TIME, "2023年");
        self.emit(processed)
    }

    /// The rest, once the raw text is complete.
    pub fn finish(&mut self) -> String {
        let processed = process_response(&self.raw);
        self.emit(processed)
    }

    /// The processed response so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

/// Prompt ids of a whole conversation plus a new query, in the tokenizer's format: ChatGLM3's
/// `build_chat_input` for a tokenizer with role tokens, else the ChatGLM2 prompt
/// `encode(build_prompt(query, history))` (the official `chat` re-encodes so).
pub fn chat_prompt_ids(tok: &Tokenizer, query: &Message, history: &[Message]) -> Result<Vec<u32>> {
    if tok.has_roles() {
        let mut all = history.to_vec();
        all.push(query.clone());
        return chatglm3_prompt_ids(tok, &all);
    }
    if query.role != "user" {
        return Err(Error::invalid(format!(
            "ChatGLM2 has no \"{}\" role",
            query.role
        )));
    }
    let pairs = pairs_from_messages(history)?;
    tok.encode(&build_prompt(&query.content, &pairs), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_numbered_from_one() {
        let h = vec![("q1".to_string(), "a1".to_string())];
        assert_eq!(
            build_prompt("q2", &h),
            "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答："
        );
        assert_eq!(build_prompt("hi", &[]), "[Round 1]\n\n问：hi\n\n答：");
    }

    #[test]
    fn response_stream_joins_to_process_response() {
        let cases = [
            "  hello world  \n",
            "我在[[训练时间]]训练",
            "[[训练",
            "[[训练时间]] at the start and end [[训练时间]]",
            "\n\n",
            "a [[ b ]] c [[训练时 d",
        ];
        for text in cases {
            let want = process_response(text);
            // every split into pieces
            for step in 1..4 {
                let chars: Vec<char> = text.chars().collect();
                let mut rs = ResponseStream::new();
                let mut got = String::new();
                for chunk in chars.chunks(step) {
                    got.push_str(&rs.push(&chunk.iter().collect::<String>()));
                }
                got.push_str(&rs.finish());
                assert_eq!(got, want, "{text:?} in pieces of {step}");
            }
        }
    }
}
