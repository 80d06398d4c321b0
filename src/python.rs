//! The Python face of glm2rs (`glm2rs._glm2rs`): every `#[pyclass]`/`#[pymethods]` lives here.
//! Model work runs with the GIL released; every error becomes a `glm2rs.Glm2Error` subclass.

use crate::error::{catch_panic, Error};
use crate::generate::{GenerationConfig, Generator};
use crate::sampling::SamplingConfig;
use crate::{parse_device, parse_dtype, LoadOptions, Model, Tokenizer};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

create_exception!(glm2rs, Glm2Error, PyException, "Base class of every glm2rs error.");
create_exception!(glm2rs, LoadError, Glm2Error, "A file or directory could not be read.");
create_exception!(glm2rs, ConfigError, Glm2Error, "config.json is malformed or asks for something unsupported.");
create_exception!(glm2rs, CheckpointError, Glm2Error, "A weight file is missing, truncated or has a wrong tensor.");
create_exception!(glm2rs, TokenizerError, Glm2Error, "The tokenizer could not be built or used.");
create_exception!(glm2rs, InvalidArgumentError, Glm2Error, "An argument is out of range (prompt too long, bad sampling value, ...).");

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
            Error::Internal(_) | Error::Candle(_) => Glm2Error::new_err(msg),
        }
    }
}

fn to_ids(ids: Vec<i64>, what: &str) -> Result<Vec<u32>, Error> {
    ids.into_iter()
        .map(|i| u32::try_from(i).map_err(|_| Error::invalid(format!("{what}: {i} is not a valid token id"))))
        .collect()
}

/// Generation keyword arguments shared by `generate_ids`, `generate` and `stream`.
#[allow(clippy::too_many_arguments)]
fn gen_config(
    max_new_tokens: Option<i64>,
    max_length: Option<i64>,
    do_sample: bool,
    temperature: f64,
    top_p: f64,
    top_k: i64,
    repetition_penalty: f64,
    seed: Option<u64>,
    stop_token_ids: Option<Vec<i64>>,
    stop: Option<Vec<String>>,
) -> Result<GenerationConfig, Error> {
    let non_negative = |name: &str, v: i64| -> Result<usize, Error> {
        usize::try_from(v).map_err(|_| Error::invalid(format!("{name} must be >= 0, got {v}")))
    };
    Ok(GenerationConfig {
        max_new_tokens: max_new_tokens.map(|v| non_negative("max_new_tokens", v)).transpose()?,
        max_length: max_length.map(|v| non_negative("max_length", v)).transpose()?,
        sampling: SamplingConfig {
            do_sample,
            temperature,
            top_p,
            top_k: non_negative("top_k", top_k)?,
            repetition_penalty,
            seed,
        },
        stop_token_ids: to_ids(stop_token_ids.unwrap_or_default(), "stop_token_ids")?,
        stop_strings: stop.unwrap_or_default(),
    })
}

/// A progress bar on stderr for loading.
fn progress_bar(label: &'static str) -> impl Fn(usize, usize) {
    move |done, total| {
        let width = 30;
        let filled = if total == 0 { width } else { done * width / total };
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
        Ok(Self { inner: Arc::new(tok) })
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
    fn eos_token_id(&self) -> u32 {
        2
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
        let Some(gen) = self.gen.as_mut() else { return Ok(None) };
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
                        quantize = None, prefix_checkpoint = None, chat_format = None, progress = None))]
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
    ) -> PyResult<Self> {
        if let Some(q) = quantize {
            if !q.is_none() {
                return Err(InvalidArgumentError::new_err(format!(
                    "quantize={q}: quantization is not supported by this build yet"
                )));
            }
        }
        if prefix_checkpoint.is_some() {
            return Err(InvalidArgumentError::new_err(
                "prefix_checkpoint: P-Tuning v2 prefixes are not supported by this build yet",
            ));
        }
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
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype)?;
        let show = match progress {
            Some(p) => p,
            None => py.import("sys")?.getattr("stderr")?.call_method0("isatty")?.extract().unwrap_or(false),
        };
        let model = py.detach(move || {
            catch_panic(|| {
                let bar = progress_bar("Loading weights");
                let opts = LoadOptions {
                    device,
                    dtype,
                    progress: if show { Some(&bar) } else { None },
                    chatglm3,
                };
                Model::from_dir(&dir, &opts)
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
        Ok(PyArray1::from_vec(py, data).reshape([rows, cols])?.into_any())
    }

    /// Generate from token ids; returns the new ids only (ending with eos when eos was produced).
    #[pyo3(signature = (input_ids, *, max_new_tokens = None, max_length = None, do_sample = false,
                        temperature = 1.0, top_p = 1.0, top_k = 0, repetition_penalty = 1.0,
                        seed = None, stop_token_ids = None, stop = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_ids(
        &self,
        py: Python<'_>,
        input_ids: Vec<i64>,
        max_new_tokens: Option<i64>,
        max_length: Option<i64>,
        do_sample: bool,
        temperature: f64,
        top_p: f64,
        top_k: i64,
        repetition_penalty: f64,
        seed: Option<u64>,
        stop_token_ids: Option<Vec<i64>>,
        stop: Option<StopArg>,
    ) -> PyResult<Vec<u32>> {
        let ids = to_ids(input_ids, "input_ids")?;
        let cfg = gen_config(
            max_new_tokens, max_length, do_sample, temperature, top_p, top_k, repetition_penalty, seed,
            stop_token_ids, stop.map(|s| s.0),
        )?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_ids(&ids, &cfg)))?)
    }

    /// Stream the completion of `prompt` (text, encoded with `[gMASK] sop` in front) as text pieces.
    #[pyo3(signature = (prompt, *, max_new_tokens = None, max_length = None, do_sample = false,
                        temperature = 1.0, top_p = 1.0, top_k = 0, repetition_penalty = 1.0,
                        seed = None, stop_token_ids = None, stop = None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_new_tokens: Option<i64>,
        max_length: Option<i64>,
        do_sample: bool,
        temperature: f64,
        top_p: f64,
        top_k: i64,
        repetition_penalty: f64,
        seed: Option<u64>,
        stop_token_ids: Option<Vec<i64>>,
        stop: Option<StopArg>,
    ) -> PyResult<PyStream> {
        let cfg = gen_config(
            max_new_tokens, max_length, do_sample, temperature, top_p, top_k, repetition_penalty, seed,
            stop_token_ids, stop.map(|s| s.0),
        )?;
        let model = self.inner.clone();
        let prompt = prompt.to_string();
        let gen = py.detach(move || catch_panic(|| model.generator_for_prompt(&prompt, &cfg)))?;
        Ok(PyStream {
            gen: Some(gen),
            token_ids: vec![],
            finish_reason: None,
        })
    }

    /// The whole completion of `prompt` as one string (the pieces of `stream` joined).
    #[pyo3(signature = (prompt, *, max_new_tokens = None, max_length = None, do_sample = false,
                        temperature = 1.0, top_p = 1.0, top_k = 0, repetition_penalty = 1.0,
                        seed = None, stop_token_ids = None, stop = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_new_tokens: Option<i64>,
        max_length: Option<i64>,
        do_sample: bool,
        temperature: f64,
        top_p: f64,
        top_k: i64,
        repetition_penalty: f64,
        seed: Option<u64>,
        stop_token_ids: Option<Vec<i64>>,
        stop: Option<StopArg>,
    ) -> PyResult<String> {
        let cfg = gen_config(
            max_new_tokens, max_length, do_sample, temperature, top_p, top_k, repetition_penalty, seed,
            stop_token_ids, stop.map(|s| s.0),
        )?;
        let model = self.inner.clone();
        let prompt = prompt.to_string();
        Ok(py.detach(move || catch_panic(|| model.generate(&prompt, &cfg)))?)
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

/// `stop=` accepts one string or a list of strings.
struct StopArg(Vec<String>);

impl<'a, 'py> FromPyObject<'a, 'py> for StopArg {
    type Error = PyErr;
    fn extract(ob: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(s) = ob.extract::<String>() {
            return Ok(StopArg(vec![s]));
        }
        if ob.is_instance_of::<PyList>() || ob.is_instance_of::<pyo3::types::PyTuple>() {
            return Ok(StopArg(ob.extract::<Vec<String>>()?));
        }
        Err(InvalidArgumentError::new_err("stop must be a string or a list of strings"))
    }
}

#[pymodule]
fn _glm2rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyModel>()?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyStream>()?;
    m.add("Glm2Error", py.get_type::<Glm2Error>())?;
    m.add("LoadError", py.get_type::<LoadError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
