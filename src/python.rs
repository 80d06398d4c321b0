//! The Python face of glm2rs (`glm2rs._glm2rs`): every `#[pyclass]`/`#[pymethods]` lives here.
//! Model work runs with the GIL released; every error becomes a `glm2rs.Glm2Error` subclass.

use crate::chat_format::{ChatFormat, Message};
use crate::error::{catch_panic, Error};
use crate::generate::{GenerationConfig, Generator};
use crate::sampling::SamplingConfig;
use crate::session::{ChatSession, ChatStream, ChatTurn};
use crate::{parse_dtype, LoadOptions, Model, Tokenizer};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

create_exception!(
    glm2rs,
    Glm2Error,
    PyException,
    "Base class of every glm2rs error."
);
create_exception!(
    glm2rs,
    LoadError,
    Glm2Error,
    "A file or directory could not be read."
);
create_exception!(
    glm2rs,
    ConfigError,
    Glm2Error,
    "config.json is malformed or asks for something unsupported."
);
create_exception!(
    glm2rs,
    CheckpointError,
    Glm2Error,
    "A weight file is missing, truncated or has a wrong tensor."
);
create_exception!(
    glm2rs,
    TokenizerError,
    Glm2Error,
    "The tokenizer could not be built or used."
);
create_exception!(
    glm2rs,
    InvalidArgumentError,
    Glm2Error,
    "An argument is out of range (prompt too long, bad sampling value, ...)."
);

/// The one place where Rust errors become Python exceptions.
impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Io { .. } => LoadError::new_err(msg),
            Error::Config(_) => ConfigError::new_err(msg),
            Error::Checkpoint { .. } => CheckpointError::new_err(msg),
            Error::Tokenizer(_) => TokenizerError::new_err(msg),
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
            Error::Internal(_) | Error::Candle(_) | Error::Overloaded(_) => Glm2Error::new_err(msg),
        }
    }
}

fn to_ids(ids: Vec<i64>, what: &str) -> Result<Vec<u32>, Error> {
    ids.into_iter()
        .map(|i| {
            u32::try_from(i)
                .map_err(|_| Error::invalid(format!("{what}: {i} is not a valid token id")))
        })
        .collect()
}

/// Defaults of the generation keywords: plain generation is greedy; chat uses the official
/// chat defaults (sampling, top_p 0.8, temperature 0.8, max_length 8192 capped at the context).
#[derive(Clone, Copy)]
struct GenDefaults {
    do_sample: bool,
    temperature: f64,
    top_p: f64,
    max_length: Option<usize>,
}

const PLAIN: GenDefaults = GenDefaults {
    do_sample: false,
    temperature: 1.0,
    top_p: 1.0,
    max_length: None,
};
const CHAT: GenDefaults = GenDefaults {
    do_sample: true,
    temperature: 0.8,
    top_p: 0.8,
    max_length: Some(8192),
};

/// The generation keywords shared by every generating method, parsed in one place:
/// `max_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_p`, `top_k`,
/// `repetition_penalty`, `seed`, `stop_token_ids`, `stop` (a string or a list of strings).
/// A wrong name, type or value is an `InvalidArgumentError`.
fn gen_config(kwargs: Option<&Bound<'_, PyDict>>, d: GenDefaults) -> PyResult<GenerationConfig> {
    let mut cfg = GenerationConfig {
        max_length: d.max_length,
        sampling: SamplingConfig {
            do_sample: d.do_sample,
            temperature: d.temperature,
            top_p: d.top_p,
            ..Default::default()
        },
        ..Default::default()
    };
    let Some(kwargs) = kwargs else { return Ok(cfg) };
    fn bad(key: &str, v: &Bound<'_, PyAny>) -> PyErr {
        let shown = v.repr().map(|r| r.to_string()).unwrap_or_default();
        InvalidArgumentError::new_err(format!("{key}: {shown} is not a valid value"))
    }
    fn int(key: &str, v: &Bound<'_, PyAny>) -> PyResult<i64> {
        if v.is_instance_of::<pyo3::types::PyBool>() {
            return Err(bad(key, v));
        }
        v.extract::<i64>().map_err(|_| bad(key, v))
    }
    fn count(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        if v.is_none() {
            return Ok(None);
        }
        let n = int(key, v)?;
        usize::try_from(n)
            .map(Some)
            .map_err(|_| InvalidArgumentError::new_err(format!("{key} must be >= 0, got {n}")))
    }
    fn float(key: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
        v.extract::<f64>().map_err(|_| bad(key, v))
    }
    for (k, v) in kwargs.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "max_new_tokens" => cfg.max_new_tokens = count(&key, &v)?,
            "max_length" => cfg.max_length = count(&key, &v)?,
            "do_sample" => cfg.sampling.do_sample = v.extract::<bool>().map_err(|_| bad(&key, &v))?,
            "temperature" => cfg.sampling.temperature = float(&key, &v)?,
            "top_p" => cfg.sampling.top_p = float(&key, &v)?,
            "top_k" => cfg.sampling.top_k = count(&key, &v)?.unwrap_or(0),
            "repetition_penalty" => cfg.sampling.repetition_penalty = float(&key, &v)?,
            "seed" => {
                cfg.sampling.seed = if v.is_none() { None } else { Some(v.extract::<u64>().map_err(|_| bad(&key, &v))?) }
            }
            "stop_token_ids" => {
                let ids: Vec<i64> = if v.is_none() { vec![] } else { v.extract().map_err(|_| bad(&key, &v))? };
                cfg.stop_token_ids = to_ids(ids, "stop_token_ids")?;
            }
            "stop" => {
                cfg.stop_strings = if v.is_none() {
                    vec![]
                } else if let Ok(s) = v.extract::<String>() {
                    vec![s]
                } else if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
                    v.extract().map_err(|_| bad(&key, &v))?
                } else {
                    return Err(InvalidArgumentError::new_err("stop must be a string or a list of strings"));
                }
            }
            other => {
                return Err(InvalidArgumentError::new_err(format!(
                    "unknown keyword {other:?}: use max_new_tokens, max_length, do_sample, temperature, top_p, \
                     top_k, repetition_penalty, seed, stop_token_ids, stop"
                )))
            }
        }
    }
    Ok(cfg)
}

/// A progress bar on stderr for loading.
fn progress_bar(label: &'static str) -> impl Fn(usize, usize) {
    move |done, total| {
        let width = 30;
        let filled = if total == 0 {
            width
        } else {
            done * width / total
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{label} [{}{}] {done}/{total}",
            "#".repeat(filled),
            ".".repeat(width - filled)
        );
        if done == total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

/// The ChatGLM2 tokenizer (SentencePiece BPE built in Rust, with ChatGLM's special tokens).
#[pyclass(module = "glm2rs._glm2rs", name = "Tokenizer", frozen)]
pub struct PyTokenizer {
    inner: Arc<Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    /// Build from a SentencePiece `tokenizer.model` file.
    #[staticmethod]
    #[pyo3(signature = (path, *, chatglm3 = false))]
    fn from_file(py: Python<'_>, path: PathBuf, chatglm3: bool) -> PyResult<Self> {
        let tok = py.detach(|| catch_panic(|| Tokenizer::from_spm_file(&path, chatglm3)))?;
        Ok(Self {
            inner: Arc::new(tok),
        })
    }

    /// Token ids of `text`; with `add_special_tokens`, `[gMASK] sop` come first.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let tok = self.inner.clone();
        let text = text.to_string();
        Ok(py.detach(|| catch_panic(|| tok.encode(&text, add_special_tokens)))?)
    }

    /// Text of `ids`; special ids and ids unknown to the tokenizer decode to nothing.
    fn decode(&self, ids: Vec<i64>) -> PyResult<String> {
        let ids = to_ids(ids, "decode")?;
        Ok(catch_panic(|| self.inner.decode(&ids))?)
    }

    /// The text pieces a stream emits for `ids`, one entry per id (empty while a character is
    /// incomplete); they join to exactly `decode(ids)`.
    fn stream_decode(&self, ids: Vec<i64>) -> PyResult<Vec<String>> {
        let ids = to_ids(ids, "stream_decode")?;
        Ok(catch_panic(|| {
            let mut ts = crate::TextStream::new();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(ts.push(&self.inner, id)?);
            }
            if let Some(last) = out.last_mut() {
                last.push_str(&ts.finish(&self.inner)?);
            }
            Ok(out)
        })?)
    }

    /// The official ChatGLM2 prompt: `[Round N]\n\n问：...\n\n答：`.
    #[pyo3(signature = (query, history = None))]
    fn build_prompt(&self, query: &str, history: Option<Vec<(String, String)>>) -> String {
        crate::build_prompt(query, &history.unwrap_or_default())
    }

    /// Prompt ids of a chat turn: ChatGLM3's `build_chat_input` (`[gMASK] sop`, each message as
    /// `<|role|>` + metadata line + content, then `<|assistant|>`) for a tokenizer with role
    /// tokens, else the ChatGLM2 prompt `encode(build_prompt(query, history))`.
    #[pyo3(signature = (query, history = None, role = "user"))]
    fn build_chat_input(
        &self,
        query: &str,
        history: Option<Bound<'_, PyAny>>,
        role: &str,
    ) -> PyResult<Vec<u32>> {
        let msgs = messages_from_py(history.as_ref())?;
        let q = Message::new(role, query);
        Ok(catch_panic(|| {
            if self.inner.has_roles() {
                let mut all = msgs.clone();
                all.push(q.clone());
                crate::chat_format::chatglm3_prompt_ids(&self.inner, &all)
            } else {
                if role != "user" {
                    return Err(Error::invalid(format!("ChatGLM2 has no \"{role}\" role")));
                }
                let pairs = crate::session::pairs_from_messages(&msgs)?;
                self.inner.encode(&crate::build_prompt(query, &pairs), true)
            }
        })?)
    }

    /// Write a Hugging Face `tokenizer.json`.
    fn save(&self, path: PathBuf) -> PyResult<()> {
        Ok(self.inner.save(&path)?)
    }

    /// Id of a special token (`"[gMASK]"`, `"sop"`, `"<|user|>"`...), or None.
    fn special_id(&self, name: &str) -> Option<u32> {
        self.inner.special_id(name)
    }

    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.vocab_size()
    }

    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.inner().token_to_id("</s>")
    }

    fn __len__(&self) -> usize {
        self.inner.vocab_size() as usize
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer(vocab_size={})", self.inner.vocab_size())
    }
}

/// An iterator of text pieces, generated one step per `__next__` with the GIL released.
/// Dropping it (or `close()`) frees its KV cache.
#[pyclass(module = "glm2rs._glm2rs", name = "TextStreamer")]
pub struct PyStream {
    gen: Option<Generator>,
    /// Kept after the generator is freed.
    token_ids: Vec<u32>,
    finish_reason: Option<&'static str>,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(gen) = self.gen.as_mut() else {
            return Ok(None);
        };
        let step = py.detach(|| catch_panic(|| gen.next_text()));
        let reason = gen.finish_reason().map(|r| r.as_str());
        self.token_ids = gen.generated_ids().to_vec();
        match step {
            Ok(Some(piece)) => Ok(Some(piece)),
            Ok(None) => {
                self.finish_reason = reason;
                self.gen = None; // free the cache now
                Ok(None)
            }
            Err(e) => {
                self.gen = None;
                Err(e.into())
            }
        }
    }

    /// Stop generating and free the cache.
    fn close(&mut self) {
        if let Some(g) = self.gen.take() {
            self.token_ids = g.generated_ids().to_vec();
        }
    }

    /// Ids generated so far.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        match &self.gen {
            Some(g) => g.generated_ids().to_vec(),
            None => self.token_ids.clone(),
        }
    }

    /// `"stop"` or `"length"` once finished, else None.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        match &self.gen {
            Some(g) => g.finish_reason().map(|r| r.as_str()),
            None => self.finish_reason,
        }
    }
}

/// A loaded ChatGLM2/ChatGLM3 model. Immutable and thread-safe: many streams may run at once.
#[pyclass(module = "glm2rs._glm2rs", name = "Model", frozen)]
pub struct PyModel {
    inner: Model,
}

#[pymethods]
impl PyModel {
    /// Load a local model directory or a Hugging Face hub id (resolved with huggingface_hub).
    #[classmethod]
    #[pyo3(signature = (name_or_path, *, revision = None, device = "cpu", dtype = "auto",
                        quantize = None, prefix_checkpoint = None, chat_format = None, progress = None,
                        num_gpus = 1))]
    #[allow(clippy::too_many_arguments)]
    fn from_pretrained(
        _cls: &Bound<'_, pyo3::types::PyType>,
        py: Python<'_>,
        name_or_path: &str,
        revision: Option<&str>,
        device: &str,
        dtype: &str,
        quantize: Option<Bound<'_, PyAny>>,
        prefix_checkpoint: Option<PathBuf>,
        chat_format: Option<&str>,
        progress: Option<bool>,
        num_gpus: usize,
    ) -> PyResult<Self> {
        let quantize = match quantize {
            Some(q) if !q.is_none() => {
                Some(crate::quantize::QuantType::parse(&q.str()?.to_string())?)
            }
            _ => None,
        };
        let chatglm3 = match chat_format {
            None => None,
            Some("chatglm2") => Some(false),
            Some("chatglm3") => Some(true),
            Some(other) => {
                return Err(InvalidArgumentError::new_err(format!(
                    "chat_format={other:?}: use \"chatglm2\" or \"chatglm3\""
                )))
            }
        };
        let dir: PathBuf = py
            .import("glm2rs.hub")?
            .call_method1("resolve", (name_or_path, revision))?
            .extract()?;
        let devices = crate::parse_devices(device, num_gpus)?;
        let device = devices[0].clone();
        let dtype = parse_dtype(dtype)?;
        let show = match progress {
            Some(p) => p,
            None => py
                .import("sys")?
                .getattr("stderr")?
                .call_method0("isatty")?
                .extract()
                .unwrap_or(false),
        };
        let model = py.detach(move || {
            catch_panic(|| {
                let bar = progress_bar("Loading weights");
                let opts = LoadOptions {
                    device,
                    dtype,
                    progress: if show { Some(&bar) } else { None },
                    chatglm3,
                    prefix_checkpoint,
                    quantize,
                    layer_devices: devices,
                };
                Model::load(&dir, &opts)
            })
        })?;
        Ok(Self { inner: model })
    }

    /// The parsed `config.json` as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = self.inner.config_json().to_string();
        py.import("json")?.call_method1("loads", (text,))
    }

    #[getter]
    fn tokenizer(&self) -> PyTokenizer {
        PyTokenizer {
            inner: self.inner.tokenizer().clone(),
        }
    }

    /// The dtype the model runs in (`"float32"`, `"float16"`, `"bfloat16"`).
    #[getter]
    fn dtype(&self) -> &'static str {
        crate::dtype_name(self.inner.model().dtype())
    }

    #[getter]
    fn device(&self) -> String {
        match self.inner.model().device() {
            candle_core::Device::Cpu => "cpu".to_string(),
            candle_core::Device::Cuda(_) => "cuda".to_string(),
            candle_core::Device::Metal(_) => "metal".to_string(),
        }
    }

    /// How many devices hold the layers (more than 1 when split with num_gpus).
    #[getter]
    fn num_gpus(&self) -> usize {
        self.inner.model().num_devices()
    }

    /// float32 logits `[len(input_ids), vocab]` of every position, in a fresh context.
    fn logits<'py>(&self, py: Python<'py>, input_ids: Vec<i64>) -> PyResult<Bound<'py, PyAny>> {
        let ids = to_ids(input_ids, "input_ids")?;
        let model = self.inner.clone();
        let (data, rows, cols) = py.detach(move || {
            catch_panic(|| {
                let t = model.logits(&ids)?;
                let (r, c) = t.dims2()?;
                Ok((t.flatten_all()?.to_vec1::<f32>()?, r, c))
            })
        })?;
        Ok(PyArray1::from_vec(py, data)
            .reshape([rows, cols])?
            .into_any())
    }

    /// Generate from token ids; returns the new ids only (ending with eos when eos was produced).
    #[pyo3(signature = (input_ids, **kwargs))]
    fn generate_ids(
        &self,
        py: Python<'_>,
        input_ids: Vec<i64>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<u32>> {
        let ids = to_ids(input_ids, "input_ids")?;
        let cfg = gen_config(kwargs, PLAIN)?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_ids(&ids, &cfg)))?)
    }

    /// Stream the completion of `prompt` (text, encoded with `[gMASK] sop` in front) as text pieces.
    #[pyo3(signature = (prompt, **kwargs))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyStream> {
        let cfg = gen_config(kwargs, PLAIN)?;
        let model = self.inner.clone();
        let prompt = prompt.to_string();
        let gen = py.detach(move || catch_panic(|| model.generator_for_prompt(&prompt, &cfg)))?;
        Ok(PyStream {
            gen: Some(gen),
            token_ids: vec![],
            finish_reason: None,
        })
    }

    /// Like `stream`, from token ids instead of text.
    #[pyo3(signature = (input_ids, **kwargs))]
    fn stream_ids(
        &self,
        py: Python<'_>,
        input_ids: Vec<i64>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyStream> {
        let ids = to_ids(input_ids, "input_ids")?;
        let cfg = gen_config(kwargs, PLAIN)?;
        let model = self.inner.clone();
        let gen = py.detach(move || catch_panic(|| model.generator(ids, &cfg)))?;
        Ok(PyStream {
            gen: Some(gen),
            token_ids: vec![],
            finish_reason: None,
        })
    }

    /// The whole completion of `prompt` as one string (the pieces of `stream` joined).
    #[pyo3(signature = (prompt, **kwargs))]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let cfg = gen_config(kwargs, PLAIN)?;
        let model = self.inner.clone();
        let prompt = prompt.to_string();
        Ok(py.detach(move || catch_panic(|| model.generate(&prompt, &cfg)))?)
    }

    /// Complete several prompts at once, one batched forward per step for all of them; each
    /// text equals what `generate` gives for that prompt alone (same keywords).
    #[pyo3(signature = (prompts, **kwargs))]
    fn generate_batch(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<String>> {
        let cfg = gen_config(kwargs, PLAIN)?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_batch(&prompts, &cfg)))?)
    }

    /// `generate_ids` for several id lists at once (one batched forward per step).
    #[pyo3(signature = (input_ids, **kwargs))]
    fn generate_batch_ids(
        &self,
        py: Python<'_>,
        input_ids: Vec<Vec<i64>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let ids = input_ids
            .into_iter()
            .map(|v| to_ids(v, "input_ids"))
            .collect::<Result<Vec<_>, Error>>()?;
        let cfg = gen_config(kwargs, PLAIN)?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_batch_ids(&ids, &cfg)))?)
    }

    /// Logits of the last position of each id list (each in its own context), `batch_size`
    /// sequences per forward: a float32 array `[len(input_ids), vocab]`.
    #[pyo3(signature = (input_ids, batch_size = 8))]
    fn last_logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: Vec<Vec<i64>>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = input_ids
            .into_iter()
            .map(|v| to_ids(v, "input_ids"))
            .collect::<Result<Vec<_>, Error>>()?;
        let model = self.inner.clone();
        let rows = py.detach(move || catch_panic(|| model.last_logits_batch(&ids, batch_size)))?;
        let n = rows.len();
        let vocab = self.inner.config().padded_vocab_size;
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        Ok(PyArray1::from_vec(py, flat).reshape([n, vocab])?.into_any())
    }

    /// How the linear layers are quantized ("int8", "int4", "q4_0", ...), or None.
    #[getter]
    fn quantization(&self) -> Option<String> {
        self.inner.quantization().map(str::to_string)
    }

    /// Bytes held by the weights.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.model().weight_bytes()
    }

    /// Write the model as held (quantized or not), its config and tokenizer to one GGUF file
    /// that `Model.from_pretrained(path)` loads back.
    fn save_quantized(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.save_quantized(&path)))?)
    }

    /// "chatglm2" or "chatglm3".
    #[getter]
    fn chat_format(&self) -> &'static str {
        self.inner.chat_format().name()
    }

    /// The official `chat`: the whole conversation re-encoded, the response post-processed.
    /// Returns `(response, history)`; defaults as the official code (sampling, top_p 0.8,
    /// temperature 0.8, max_length 8192 capped at the context).
    #[pyo3(signature = (query, history = None, **kwargs))]
    fn chat<'py>(
        &self,
        py: Python<'py>,
        query: &str,
        history: Option<Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(String, Bound<'py, PyList>)> {
        let mut cfg = gen_config(kwargs, CHAT)?;
        cap_max_length(&mut cfg, &self.inner);
        let mut msgs = messages_from_py(history.as_ref())?;
        let model = self.inner.clone();
        let q = Message::new("user", query);
        let hist = msgs.clone();
        let response = py.detach(move || catch_panic(|| model.chat(&q, &hist, &cfg)))?;
        msgs.push(Message::new("user", query));
        msgs.push(Message::new("assistant", &response));
        Ok((
            response.clone(),
            history_to_py(py, self.inner.chat_format(), &msgs)?,
        ))
    }

    /// Like `chat`, but an iterator of text deltas (not the cumulative text the official
    /// `stream_chat` yields). After the end, `.response` and `.history` hold the results.
    #[pyo3(signature = (query, history = None, **kwargs))]
    fn stream_chat(
        &self,
        py: Python<'_>,
        query: &str,
        history: Option<Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyChatStream> {
        let mut cfg = gen_config(kwargs, CHAT)?;
        cap_max_length(&mut cfg, &self.inner);
        let msgs = messages_from_py(history.as_ref())?;
        let model = self.inner.clone();
        let q = Message::new("user", query);
        let hist = msgs.clone();
        let stream = py.detach(move || catch_panic(|| model.chat_stream(&q, &hist, &cfg)))?;
        Ok(PyChatStream {
            stream: Some(stream),
            format: self.inner.chat_format(),
            query: query.to_string(),
            history: msgs,
            response: None,
        })
    }

    /// A chat session that keeps its KV cache between turns (`system` needs ChatGLM3).
    #[pyo3(signature = (system = None))]
    fn start_chat(&self, system: Option<&str>) -> PyResult<PyChatSession> {
        let s = self.inner.start_chat(system)?;
        Ok(PyChatSession {
            inner: Arc::new(Mutex::new(s)),
            format: self.inner.chat_format(),
        })
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Model({}, layers={}, hidden={}, dtype={}, device={})",
            self.inner.dir().display(),
            c.num_layers,
            c.hidden_size,
            self.dtype(),
            self.device()
        )
    }
}

/// The official default `max_length` (8192) can exceed a model's context: cap it there.
fn cap_max_length(cfg: &mut GenerationConfig, model: &Model) {
    if let Some(m) = cfg.max_length {
        cfg.max_length = Some(m.min(model.model().max_context()));
    }
}

/// History from Python: `(query, response)` pairs or `{"role", "content", "metadata"?}` dicts.
fn messages_from_py(history: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Message>> {
    let mut out = vec![];
    let Some(h) = history else { return Ok(out) };
    if h.is_none() {
        return Ok(out);
    }
    for item in h.try_iter()? {
        let item = item?;
        if let Ok(d) = item.cast::<PyDict>() {
            let get = |k: &str| -> PyResult<Option<String>> {
                match d.get_item(k)? {
                    Some(v) if !v.is_none() => Ok(Some(v.extract()?)),
                    _ => Ok(None),
                }
            };
            let role = get("role")?
                .ok_or_else(|| InvalidArgumentError::new_err("history message without \"role\""))?;
            let content = get("content")?.unwrap_or_default();
            let mut m = Message::new(&role, &content);
            m.metadata = get("metadata")?.unwrap_or_default();
            out.push(m);
        } else {
            let (q, a): (String, String) = item.extract().map_err(|_| {
                InvalidArgumentError::new_err(
                    "history items must be (query, response) pairs or role/content dicts",
                )
            })?;
            out.push(Message::new("user", &q));
            out.push(Message::new("assistant", &a));
        }
    }
    Ok(out)
}

/// History to Python: pairs for ChatGLM2, dicts for ChatGLM3.
fn history_to_py<'py>(
    py: Python<'py>,
    format: ChatFormat,
    msgs: &[Message],
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    match format {
        ChatFormat::ChatGlm2 => {
            for pair in msgs.chunks(2) {
                let a = pair.get(1).map(|m| m.content.as_str()).unwrap_or("");
                list.append(PyTuple::new(py, [pair[0].content.as_str(), a])?)?;
            }
        }
        ChatFormat::ChatGlm3 => {
            for m in msgs {
                let d = PyDict::new(py);
                d.set_item("role", &m.role)?;
                if !m.metadata.is_empty() || m.role == "assistant" {
                    d.set_item("metadata", &m.metadata)?;
                }
                d.set_item("content", &m.content)?;
                list.append(d)?;
            }
        }
    }
    Ok(list)
}

/// Deltas of a one-shot chat answer (see `Model.stream_chat`).
#[pyclass(module = "glm2rs._glm2rs", name = "ChatStreamer")]
pub struct PyChatStream {
    stream: Option<ChatStream>,
    format: ChatFormat,
    query: String,
    history: Vec<Message>,
    response: Option<String>,
}

#[pymethods]
impl PyChatStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        match py.detach(|| catch_panic(|| stream.next_text())) {
            Ok(Some(piece)) => Ok(Some(piece)),
            Ok(None) => {
                let response = stream.response().to_string();
                self.history.push(Message::new("user", &self.query));
                self.history.push(Message::new("assistant", &response));
                self.response = Some(response);
                self.stream = None;
                Ok(None)
            }
            Err(e) => {
                self.stream = None;
                Err(e.into())
            }
        }
    }

    /// The post-processed response (so far, or all of it at the end).
    #[getter]
    fn response(&self) -> String {
        match (&self.response, &self.stream) {
            (Some(r), _) => r.clone(),
            (None, Some(s)) => s.response().to_string(),
            _ => String::new(),
        }
    }

    /// The history including this turn, once the stream has ended; before that, without it.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        history_to_py(py, self.format, &self.history)
    }

    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.stream
            .as_ref()
            .and_then(|s| s.generator().finish_reason().map(|r| r.as_str()))
    }
}

/// A conversation that keeps its KV cache between turns (see `Model.start_chat`).
#[pyclass(module = "glm2rs._glm2rs", name = "ChatSession", frozen)]
pub struct PyChatSession {
    inner: Arc<Mutex<ChatSession>>,
    format: ChatFormat,
}

fn lock(s: &Mutex<ChatSession>) -> std::sync::MutexGuard<'_, ChatSession> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

#[pymethods]
impl PyChatSession {
    /// Send a query; returns an iterator of response deltas. The turn is committed to the
    /// session when the iterator ends, is closed or is dropped.
    #[pyo3(signature = (query, **kwargs))]
    fn send(
        &self,
        py: Python<'_>,
        query: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyChatTurn> {
        let cfg = gen_config(
            kwargs,
            GenDefaults {
                max_length: None,
                ..CHAT
            },
        )?;
        let session = self.inner.clone();
        let query = query.to_string();
        let turn = py.detach(move || catch_panic(|| lock(&session).begin_turn(&query, &cfg)))?;
        Ok(PyChatTurn {
            session: self.inner.clone(),
            turn: Some(turn),
            response: None,
        })
    }

    /// Send a query and return the whole response.
    #[pyo3(signature = (query, **kwargs))]
    fn chat(
        &self,
        py: Python<'_>,
        query: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let mut turn = self.send(py, query, kwargs)?;
        while turn.__next__(py)?.is_some() {}
        Ok(turn.response.clone().unwrap_or_default())
    }

    /// `[(query, response), ...]` (ChatGLM2) or role/content dicts (ChatGLM3).
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        history_to_py(py, self.format, lock(&self.inner).history())
    }

    /// Every token the KV cache holds, in order.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        lock(&self.inner).token_ids().to_vec()
    }

    /// Forget the conversation and free the cache.
    fn reset(&self) -> PyResult<()> {
        Ok(lock(&self.inner).reset()?)
    }
}

/// The deltas of one session turn.
#[pyclass(module = "glm2rs._glm2rs", name = "ChatTurn")]
pub struct PyChatTurn {
    session: Arc<Mutex<ChatSession>>,
    turn: Option<ChatTurn>,
    response: Option<String>,
}

impl PyChatTurn {
    fn commit(&mut self) -> Result<(), Error> {
        if let Some(turn) = self.turn.take() {
            self.response = Some(lock(&self.session).end_turn(turn)?);
        }
        Ok(())
    }
}

#[pymethods]
impl PyChatTurn {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let Some(turn) = self.turn.as_mut() else {
            return Ok(None);
        };
        match py.detach(|| catch_panic(|| turn.next_text())) {
            Ok(Some(piece)) => Ok(Some(piece)),
            Ok(None) => {
                py.detach(|| catch_panic(|| self.commit()))?;
                Ok(None)
            }
            Err(e) => {
                let _ = self.commit();
                Err(e.into())
            }
        }
    }

    /// Stop generating; what was generated so far is committed to the session.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| catch_panic(|| self.commit()))?)
    }

    /// The post-processed response so far (all of it once finished).
    #[getter]
    fn response(&self) -> String {
        match (&self.response, &self.turn) {
            (Some(r), _) => r.clone(),
            (None, Some(t)) => t.response().to_string(),
            _ => String::new(),
        }
    }
}

impl Drop for PyChatTurn {
    fn drop(&mut self) {
        let _ = catch_panic(|| self.commit());
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP server (feature "server"): runs on its own threads; Python only starts and stops it.

#[cfg(feature = "server")]
#[pyclass(module = "glm2rs._glm2rs", name = "Server", frozen)]
pub struct PyServer {
    inner: Mutex<Option<crate::server::ServerHandle>>,
    addr: std::net::SocketAddr,
}

#[cfg(feature = "server")]
#[pymethods]
impl PyServer {
    /// Serve `model` on `host:port` (port 0: a free one) until `stop()`.
    #[new]
    #[pyo3(signature = (model, host = "127.0.0.1", port = 8000, api_key = None, model_name = None, max_batch = 32, max_queue = 256))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &PyModel,
        host: &str,
        port: u16,
        api_key: Option<String>,
        model_name: Option<String>,
        max_batch: usize,
        max_queue: usize,
    ) -> PyResult<Self> {
        let name = model_name.unwrap_or_else(|| {
            model
                .inner
                .dir()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "chatglm2-6b".into())
        });
        let cfg = crate::server::ServerConfig {
            host: host.to_string(),
            port,
            api_key,
            model_name: name,
            engine: crate::engine::EngineConfig {
                max_batch,
                max_queue,
            },
        };
        let m = model.inner.clone();
        let handle =
            py.detach(move || catch_panic(|| crate::server::ServerHandle::start(m, cfg)))?;
        let addr = handle.addr();
        Ok(Self {
            inner: Mutex::new(Some(handle)),
            addr,
        })
    }

    /// The port actually bound.
    #[getter]
    fn port(&self) -> u16 {
        self.addr.port()
    }

    #[getter]
    fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// `http://host:port`
    #[getter]
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner
            .lock()
            .map(|h| h.as_ref().is_some_and(|h| h.is_running()))
            .unwrap_or(false)
    }

    /// Stop serving (open streams are cut) and wait for the server threads.
    fn stop(&self, py: Python<'_>) {
        let handle = self.inner.lock().ok().and_then(|mut h| h.take());
        if let Some(mut h) = handle {
            py.detach(move || h.stop());
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.stop(py);
    }
}

/// Allocator-side memory of a GPU in bytes: ``used``, ``used_peak``, ``reserved``,
/// ``reserved_peak`` (PyTorch's ``memory_allocated`` and friends). ``reset_peak`` restarts the
/// peaks after reading them.
#[pyfunction]
#[pyo3(signature = (device = "cuda", reset_peak = false))]
fn cuda_memory(
    device: &str,
    reset_peak: bool,
) -> PyResult<std::collections::HashMap<&'static str, u64>> {
    let m = crate::cuda_memory(device, reset_peak)?;
    Ok([
        ("used", m.used),
        ("used_peak", m.used_peak),
        ("reserved", m.reserved),
        ("reserved_peak", m.reserved_peak),
    ]
    .into_iter()
    .collect())
}

#[pymodule]
fn _glm2rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(cuda_memory, m)?)?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyStream>()?;
    m.add_class::<PyChatStream>()?;
    m.add_class::<PyChatSession>()?;
    m.add_class::<PyChatTurn>()?;
    #[cfg(feature = "server")]
    m.add_class::<PyServer>()?;
    m.add("Glm2Error", py.get_type::<Glm2Error>())?;
    m.add("LoadError", py.get_type::<LoadError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
