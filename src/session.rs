//! Chat: the official prompt formats, one-shot chats that re-encode the conversation (as the
//! official `chat`), and sessions that keep their KV cache between turns so that a turn only
//! runs its own new tokens.

use crate::chat_format::{chatglm3_message_ids, ChatFormat, Message, ResponseStream};
use crate::error::{Error, Result};
use crate::generate::{GenerationConfig, Generator};
use crate::model::Cache;
use crate::pipeline::Model;

/// The official `chat`: returns the post-processed response.
pub fn chat(
    model: &Model,
    query: &Message,
    history: &[Message],
    cfg: &GenerationConfig,
) -> Result<String> {
    let mut s = ChatStream::new(model, query, history, cfg)?;
    while s.next_text()?.is_some() {}
    Ok(s.response().to_string())
}

/// Generated text passed through the official response post-processing, as deltas.
pub struct ChatStream {
    gen: Generator,
    post: ResponseStream,
    done: bool,
}

impl ChatStream {
    /// A one-shot chat turn over the whole conversation; its text comes post-processed.
    pub fn new(
        model: &Model,
        query: &Message,
        history: &[Message],
        cfg: &GenerationConfig,
    ) -> Result<ChatStream> {
        let ids = model.chat_prompt_ids(query, history)?;
        let gen = model.generator(ids, &model.chat_config(cfg))?;
        Ok(ChatStream {
            gen,
            post: ResponseStream::new(),
            done: false,
        })
    }

    /// The next delta of the post-processed response; `None` at the end.
    pub fn next_text(&mut self) -> Result<Option<String>> {
        while !self.done {
            match self.gen.next_text()? {
                Some(piece) => {
                    let out = self.post.push(&piece);
                    if !out.is_empty() {
                        return Ok(Some(out));
                    }
                }
                None => {
                    self.done = true;
                    let out = self.post.finish();
                    if !out.is_empty() {
                        return Ok(Some(out));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The response so far (all of it once `next_text` returned `None`).
    pub fn response(&self) -> &str {
        self.post.text()
    }

    pub fn generator(&self) -> &Generator {
        &self.gen
    }

    fn into_parts(mut self) -> (Generator, String) {
        if !self.done {
            self.post.finish();
        }
        let text = self.post.text().to_string();
        (self.gen, text)
    }
}

/// A conversation whose KV cache is kept between turns.
///
/// The first turn's ids are the full prompt (`[gMASK] sop [Round 1]...`) and its answer; each
/// later turn appends only `\n\n[Round n]\n\n问：{q}\n\n答：` (ChatGLM2; ChatGLM3: `<|user|>` message
/// and `<|assistant|>`), as the official `stream_chat` with `past_key_values`. The cache holds
/// the prompt and every generated token except a final stop token. When a turn would not fit in
/// the context (`seq_length`, or `max_length` if set), the oldest turns are dropped and the rest
/// re-encoded; a query that does not fit even alone is an error.
pub struct ChatSession {
    model: Model,
    system: Option<String>,
    /// `None` while a turn is running.
    cache: Option<Cache>,
    ids: Vec<u32>,
    history: Vec<Message>,
    /// Started with tools: answers may be calls.
    tools: bool,
}

/// A turn in progress; hand it back to [`ChatSession::end_turn`] (also when stopped early).
pub struct ChatTurn {
    stream: ChatStream,
    query: Message,
    ids_before: Vec<u32>,
    stop_ids: Vec<u32>,
    history_before: Vec<Message>,
    tools: bool,
}

impl ChatTurn {
    pub fn next_text(&mut self) -> Result<Option<String>> {
        self.stream.next_text()
    }

    pub fn response(&self) -> &str {
        self.stream.response()
    }

    /// Tokens generated so far in this turn (the answer's, not the turn's prompt).
    pub fn generated_tokens(&self) -> usize {
        self.stream.generator().generated_ids().len()
    }

    /// The answer as the model wrote it (before the response post-processing), without a final
    /// stop token.
    pub fn raw_response(&self) -> Result<String> {
        raw_text(self.stream.generator(), &self.stop_ids)
    }

    /// In a session with tools, the call this answer made (`process_response(..., use_tool=True)`
    /// of ChatGLM3's demo: a first line naming the tool, then `tool_call(...)` in a code fence;
    /// `None` for a text answer or one that does not parse).
    pub fn tool_call(&self) -> Result<Option<crate::chat_format::tools::ToolCall>> {
        if !self.tools {
            return Ok(None);
        }
        Ok(crate::chat_format::tools::parse_tool_call(&self.raw_response()?).unwrap_or(None))
    }
}

/// Whether the answer ended on one of `stop_ids` (which the cache and the text leave out).
fn ends_with_stop(gen: &Generator, stop_ids: &[u32]) -> bool {
    gen.generated_ids()
        .last()
        .is_some_and(|t| stop_ids.contains(t))
}

fn raw_text(gen: &Generator, stop_ids: &[u32]) -> Result<String> {
    let ids = gen.generated_ids();
    let n = ids.len() - usize::from(ends_with_stop(gen, stop_ids));
    gen.tokenizer().decode(&ids[..n])
}

impl ChatSession {
    /// A chat session that keeps its KV cache between turns.
    pub fn new(model: &Model, system: Option<&str>) -> Result<ChatSession> {
        if system.is_some() && model.chat_format() == ChatFormat::ChatGlm2 {
            return Err(Error::invalid(
                "ChatGLM2 has no system role: a system prompt needs a ChatGLM3 model (chat_format=\"chatglm3\")",
            ));
        }
        Ok(ChatSession {
            model: model.clone(),
            system: system.map(str::to_string),
            cache: Some(model.model().new_cache()),
            ids: vec![],
            history: vec![],
            tools: false,
        })
    }

    /// A ChatGLM3 session whose model may call `tools` (function objects `{"name", "description",
    /// "parameters"}`): they are its system turn, as ChatGLM3's `openai_api_demo` writes it; a
    /// turn's [`ChatTurn::tool_call`] is the call the answer made, and the tool's result goes back
    /// as a turn of role `observation`.
    pub fn with_tools(model: &Model, tools: &[serde_json::Value]) -> Result<ChatSession> {
        if model.chat_format() != ChatFormat::ChatGlm3 {
            return Err(Error::invalid(
                "tools need a ChatGLM3 model (chat_format=\"chatglm3\"): ChatGLM2 has no tool format",
            ));
        }
        let content = crate::chat_format::tools::tools_system_content(&serde_json::Value::Array(
            tools.to_vec(),
        ));
        let mut s = ChatSession::new(model, Some(&content))?;
        s.tools = true;
        Ok(s)
    }

    pub fn history(&self) -> &[Message] {
        &self.history
    }

    /// Every token the cache holds, in order.
    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn is_busy(&self) -> bool {
        self.cache.is_none()
    }

    /// Forget the conversation (the system prompt stays).
    pub fn reset(&mut self) -> Result<()> {
        if self.cache.is_none() {
            return Err(Error::invalid(
                "a turn is in progress: finish it before reset()",
            ));
        }
        self.cache = Some(self.model.model().new_cache());
        self.ids.clear();
        self.history.clear();
        Ok(())
    }

    fn system_messages(&self) -> Vec<Message> {
        self.system
            .iter()
            .map(|s| Message::new("system", s))
            .collect()
    }

    /// Ids to add to a cache holding `self.ids` for the next turn.
    fn continuation_ids(&self, query: &Message) -> Result<Vec<u32>> {
        let tok = self.model.tokenizer();
        match self.model.chat_format() {
            ChatFormat::ChatGlm2 => {
                let n = self.history.len() / 2 + 1;
                let text = format!("\n\n[Round {n}]\n\n问：{}\n\n答：", query.content);
                let ids = tok.encode(&text, false)?;
                Ok(ids.into_iter().skip(1).collect())
            }
            ChatFormat::ChatGlm3 => {
                let mut ids = chatglm3_message_ids(tok, query)?;
                ids.push(tok.special_id("<|assistant|>").expect("ChatGLM3 tokenizer"));
                Ok(ids)
            }
        }
    }

    /// Start a turn. The session is busy until [`ChatSession::end_turn`].
    pub fn begin_turn(&mut self, query: &str, cfg: &GenerationConfig) -> Result<ChatTurn> {
        self.begin_turn_as("user", query, cfg)
    }

    /// Start a turn of `role`: `user`, or in ChatGLM3 `observation` (a tool's result).
    pub fn begin_turn_as(
        &mut self,
        role: &str,
        query: &str,
        cfg: &GenerationConfig,
    ) -> Result<ChatTurn> {
        if self.cache.is_none() {
            return Err(Error::invalid(
                "a turn of this session is already in progress",
            ));
        }
        if !(role == "user"
            || role == "observation" && self.model.chat_format() == ChatFormat::ChatGlm3)
        {
            return Err(Error::invalid(format!(
                "a turn's role is \"user\" (or \"observation\" for a tool's result in ChatGLM3), not \"{role}\""
            )));
        }
        let query = Message::new(role, query);
        let context = self.model.model().max_context();
        let limit = cfg.max_length.map_or(context, |m| m.min(context));
        let reserve = cfg.max_new_tokens.unwrap_or(1).max(1);
        let fits = |n: usize| n + reserve <= limit;

        let mut new_ids = if self.ids.is_empty() {
            let mut msgs = self.system_messages();
            msgs.extend(self.history.iter().cloned());
            self.model.chat_prompt_ids(&query, &msgs)?
        } else {
            self.continuation_ids(&query)?
        };
        let mut fresh = self.ids.is_empty();
        if !fits(self.ids.len() + new_ids.len()) {
            // Drop the oldest turns and re-encode what is left.
            let mut kept = self.history.clone();
            loop {
                let mut msgs = self.system_messages();
                msgs.extend(kept.iter().cloned());
                let ids = self.model.chat_prompt_ids(&query, &msgs)?;
                if fits(ids.len()) {
                    new_ids = ids;
                    break;
                }
                if kept.is_empty() {
                    return Err(Error::invalid(format!(
                        "the query needs {} tokens plus {reserve} to generate, more than the context of {limit}",
                        ids.len()
                    )));
                }
                kept.drain(..2.min(kept.len()));
            }
            self.history = kept;
            fresh = true;
        }
        let mut cache = self.cache.take().expect("checked above");
        if fresh {
            cache = self.model.model().new_cache();
            self.ids.clear();
        }
        // a session that holds nothing yet starts from the prefix cache: the longest run of
        // blocks another request or session computed for the same tokens
        if self.ids.is_empty() {
            let held = cache.adopt_cached_prefix(&new_ids);
            self.ids.extend(new_ids.drain(..held));
        }
        let chat_cfg = self.model.chat_config(cfg);
        let stop_ids: Vec<u32> = {
            let mut s = self.model.config().eos_token_id.to_vec();
            s.extend(&chat_cfg.stop_token_ids);
            s
        };
        let gen = match Generator::with_cache(
            self.model.model().clone(),
            self.model.tokenizer().clone(),
            cache,
            new_ids,
            &chat_cfg,
        ) {
            Ok(g) => g,
            Err(e) => {
                // keep the session usable: its cache was cleared or is intact
                self.cache = Some(self.model.model().new_cache());
                self.ids.clear();
                return Err(e);
            }
        };
        Ok(ChatTurn {
            stream: ChatStream {
                gen,
                post: ResponseStream::new(),
                done: false,
            },
            query,
            ids_before: self.ids.clone(),
            stop_ids,
            history_before: self.history.clone(),
            tools: self.tools,
        })
    }

    /// Finish a turn (complete or stopped early): the cache takes the generated tokens (a final
    /// stop token excepted), the history the query and the post-processed response.
    pub fn end_turn(&mut self, turn: ChatTurn) -> Result<String> {
        self.end_turn_with_call(turn).map(|(response, _)| response)
    }

    /// [`ChatSession::end_turn`], also returning the turn's [`ChatTurn::tool_call`] (parsed once,
    /// for the history and the caller).
    pub fn end_turn_with_call(
        &mut self,
        turn: ChatTurn,
    ) -> Result<(String, Option<crate::chat_format::tools::ToolCall>)> {
        let call = turn.tool_call().unwrap_or(None);
        let stop_ids = turn.stop_ids;
        let (gen, response) = turn.stream.into_parts();
        let mut ids = turn.ids_before;
        ids.extend(gen.ids());
        let ends_with_stop = ends_with_stop(&gen, &stop_ids);
        if ends_with_stop {
            ids.pop();
        }
        match gen.into_cache(!ends_with_stop) {
            Ok(cache) => {
                self.cache = Some(cache);
                self.ids = ids;
                self.history = turn.history_before;
                self.history.push(turn.query);
                // a call is the turn ChatGLM3 writes: the tool's name as metadata, the fenced call
                let answer = match call
                    .as_ref()
                    .map(crate::chat_format::tools::render_tool_call)
                {
                    Some(Ok((name, content))) => Message {
                        metadata: name,
                        ..Message::new("assistant", &content)
                    },
                    _ => Message::new("assistant", &response),
                };
                self.history.push(answer);
                Ok((response, call))
            }
            Err(e) => {
                // the cache is lost: start the next turn from the history
                self.cache = Some(self.model.model().new_cache());
                self.ids.clear();
                Err(e)
            }
        }
    }
}
