//! `glm2rs.Model`: loading (a local directory or GGUF file: hub ids are resolved by the Python
//! package before this is called), logits, generation and the chat entry points.

use super::args::{gen_config, id_lists, ids, text, texts};
use super::chat::{cap_max_length, history_to_py, messages_from_py, PyChatSession, PyChatStream};
use super::errors::InvalidArgumentError;
use super::stream::PyStream;
use super::tokenizer::PyTokenizer;
use crate::chat_format::Message;
use crate::device::{dtype_name, parse_devices, parse_dtype};
use crate::error::catch_panic;
use crate::generate::GenerationDefaults;
use crate::model::KvMemory;
use crate::pipeline::{LoadOptions, Model};
use crate::session::{ChatSession, ChatStream};
use crate::tuning::Tuning;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::io::Write;
use std::path::PathBuf;

/// Loading progress on stderr: a bar redrawn in place on a terminal, plain lines (every tenth
/// and the end) in a log or pipe, where `\r` redraws would pile up.
fn progress_bar(label: &'static str) -> impl Fn(usize, usize) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let shown = std::sync::atomic::AtomicUsize::new(usize::MAX);
    move |done, total| {
        let mut err = std::io::stderr().lock();
        if !terminal {
            let tenth = if total == 0 { 10 } else { done * 10 / total };
            if shown.swap(tenth, std::sync::atomic::Ordering::Relaxed) != tenth {
                let _ = writeln!(err, "{label} {done}/{total}");
            }
            return;
        }
        let width = 30;
        let filled = if total == 0 {
            width
        } else {
            done * width / total
        };
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

/// A loaded ChatGLM2/ChatGLM3 model. Immutable and thread-safe: many streams may run at once.
#[pyclass(module = "glm2rs._glm2rs", name = "Model", frozen)]
pub struct PyModel {
    pub(super) inner: Model,
}

impl PyModel {
    /// The model id a server shows when given none: the model directory's name.
    pub(super) fn default_name(&self) -> String {
        self.inner
            .dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "chatglm2-6b".into())
    }
}

#[pymethods]
impl PyModel {
    /// Load a local model directory or GGUF file. `Model.from_pretrained` (defined by the Python
    /// package, `glm2rs/__init__.py`) resolves hub ids to a local snapshot first, then calls this.
    #[classmethod]
    #[pyo3(signature = (path, *, device = "cpu", dtype = "auto",
                        quantize = None, prefix_checkpoint = None, chat_format = None, progress = None,
                        num_gpus = 1, kv_cache_memory = None, kv_block_size = 16, prefix_cache = true,
                        adapter = None, adapters = None))]
    #[allow(clippy::too_many_arguments)]
    fn _from_local(
        _cls: &Bound<'_, pyo3::types::PyType>,
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        dtype: &str,
        quantize: Option<Bound<'_, PyAny>>,
        prefix_checkpoint: Option<PathBuf>,
        chat_format: Option<&str>,
        progress: Option<bool>,
        num_gpus: usize,
        kv_cache_memory: Option<Bound<'_, PyAny>>,
        kv_block_size: usize,
        prefix_cache: bool,
        adapter: Option<PathBuf>,
        adapters: Option<std::collections::BTreeMap<String, PathBuf>>,
    ) -> PyResult<Self> {
        let kv_cache_memory = match kv_cache_memory {
            Some(m) if !m.is_none() => {
                if m.is_instance_of::<pyo3::types::PyBool>() {
                    return Err(InvalidArgumentError::new_err(
                        "kv_cache_memory: give a share of the free memory (0.9) or bytes, not a bool",
                    ));
                }
                KvMemory::parse(&m.str()?.to_string())?
            }
            _ => KvMemory::default(),
        };
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
        let devices = parse_devices(device, num_gpus)?;
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
                    tuning: Tuning::env(),
                    kv_cache_memory,
                    kv_block_size,
                    prefix_cache,
                    adapter,
                    adapters: adapters.unwrap_or_default().into_iter().collect(),
                };
                Model::load(&path, &opts)
            })
        })?;
        Ok(Self { inner: model })
    }

    /// The names of the LoRA adapters loaded beside the weights (`adapters=` at load).
    #[getter]
    fn adapters(&self) -> Vec<String> {
        self.inner.adapter_names()
    }

    /// The adapter this model runs with (a view made by `with_adapter`), or None.
    #[getter]
    fn adapter(&self) -> Option<String> {
        self.inner.model().adapter().map(str::to_string)
    }

    /// This model (everything shared) running every call with the adapter `name` loaded beside
    /// the weights; `None`: the base model.
    #[pyo3(signature = (name))]
    fn with_adapter(&self, name: Option<&str>) -> PyResult<Self> {
        Ok(Self {
            inner: self.inner.with_adapter(name)?,
        })
    }

    /// This model (weights shared, not copied) with other step-time switches of `glm2rs::tuning`
    /// (CUDA): `fused`, `flash`, `wgmma`, `cuda_graph`, `split_decode`; and `prefill_chunk` (tokens
    /// of a prompt fed per step, 0: all). `None` keeps the current value.
    #[pyo3(signature = (*, fused = None, flash = None, cuda_graph = None, split_decode = None, prefill_chunk = None, wgmma = None))]
    #[allow(clippy::too_many_arguments)]
    fn with_tuning(
        &self,
        fused: Option<bool>,
        flash: Option<bool>,
        cuda_graph: Option<bool>,
        split_decode: Option<bool>,
        prefill_chunk: Option<usize>,
        wgmma: Option<bool>,
    ) -> Self {
        let mut t = *self.inner.model().tuning();
        t.fused = fused.unwrap_or(t.fused);
        t.flash = flash.unwrap_or(t.flash);
        t.wgmma = wgmma.unwrap_or(t.wgmma);
        t.cuda_graph = cuda_graph.unwrap_or(t.cuda_graph);
        t.split_decode = split_decode.unwrap_or(t.split_decode);
        t.prefill_chunk = prefill_chunk.unwrap_or(t.prefill_chunk);
        Self {
            inner: self.inner.with_tuning(t),
        }
    }

    /// The tuning switches this model runs with, as a dict (see `glm2rs::tuning`).
    #[getter]
    fn tuning(&self) -> std::collections::BTreeMap<&'static str, String> {
        let t = self.inner.model().tuning();
        [
            ("fused", t.fused.to_string()),
            ("flash", t.flash.to_string()),
            ("wgmma", t.wgmma.to_string()),
            ("cuda_graph", t.cuda_graph.to_string()),
            ("split_decode", t.split_decode.to_string()),
            ("prefill_chunk", t.prefill_chunk.to_string()),
            ("cuda_events", t.cuda_events.to_string()),
            ("cuda_pool_release", t.cuda_pool_release.to_string()),
            ("gemvq", format!("{:?}", t.gemvq).to_lowercase()),
            ("gemvq_rows", t.gemvq_rows.to_string()),
            ("dequantize", t.dequantize.to_string()),
            ("vnni", t.vnni.to_string()),
        ]
        .into_iter()
        .collect()
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
        dtype_name(self.inner.model().dtype())
    }

    #[getter]
    fn device(&self) -> String {
        match self.inner.model().device() {
            candle_core::Device::Cpu => "cpu".to_string(),
            candle_core::Device::Cuda(_) => "cuda".to_string(),
            candle_core::Device::Metal(_) => "metal".to_string(),
        }
    }

    /// The KV cache's block pool: `block_size` (positions per block), `block_bytes` (keys and
    /// values of every layer), `blocks_in_use`, `blocks_allocated` (in use or free, on the
    /// device), `max_blocks` (what `kv_cache_memory` allows), `blocks_cached` (held by no
    /// sequence, kept for the prefix cache), `prefix_cache` (on or off), `prefix_cache_queries`
    /// and `prefix_cache_hits` (prompt tokens looked up, and found).
    fn kv_cache_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.inner.model().kv_pool();
        let d = PyDict::new(py);
        d.set_item("block_size", p.block_size())?;
        d.set_item("block_bytes", p.block_bytes())?;
        d.set_item("blocks_in_use", p.blocks_in_use())?;
        d.set_item("blocks_allocated", p.blocks_allocated())?;
        d.set_item("max_blocks", p.max_blocks())?;
        d.set_item("blocks_cached", p.blocks_cached())?;
        d.set_item("prefix_cache", p.prefix_cache())?;
        let (queries, hits) = p.prefix_stats();
        d.set_item("prefix_cache_queries", queries)?;
        d.set_item("prefix_cache_hits", hits)?;
        Ok(d)
    }

    /// How many devices hold the layers (more than 1 when split with num_gpus).
    #[getter]
    fn num_gpus(&self) -> usize {
        self.inner.model().num_devices()
    }

    /// float32 logits `[len(input_ids), vocab]` of every position, in a fresh context.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = ids(input_ids, "input_ids")?;
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
        input_ids: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<u32>> {
        let ids = ids(input_ids, "input_ids")?;
        let cfg = gen_config(kwargs, GenerationDefaults::PLAIN)?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_ids(&ids, &cfg)))?)
    }

    /// Stream the completion of `prompt` (text, encoded with `[gMASK] sop` in front) as text pieces.
    #[pyo3(signature = (prompt, **kwargs))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyStream> {
        let prompt = text(prompt, "prompt")?;
        let cfg = gen_config(kwargs, GenerationDefaults::PLAIN)?;
        let model = self.inner.clone();
        let gen = py.detach(move || catch_panic(|| model.generator_for_prompt(&prompt, &cfg)))?;
        Ok(PyStream::new(gen))
    }

    /// Like `stream`, from token ids instead of text.
    #[pyo3(signature = (input_ids, **kwargs))]
    fn stream_ids(
        &self,
        py: Python<'_>,
        input_ids: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyStream> {
        let ids = ids(input_ids, "input_ids")?;
        let cfg = gen_config(kwargs, GenerationDefaults::PLAIN)?;
        let model = self.inner.clone();
        let gen = py.detach(move || catch_panic(|| model.generator(ids, &cfg)))?;
        Ok(PyStream::new(gen))
    }

    /// The whole completion of `prompt` as one string (the pieces of `stream` joined); with
    /// `logprobs=k`, a tuple `(text, logprobs)` (see `TextStreamer.logprobs`).
    #[pyo3(signature = (prompt, **kwargs))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prompt = text(prompt, "prompt")?;
        let cfg = gen_config(kwargs, GenerationDefaults::PLAIN)?;
        let model = self.inner.clone();
        if cfg.logprobs.is_none() {
            let out = py.detach(move || catch_panic(|| model.generate(&prompt, &cfg)))?;
            return Ok(out.into_pyobject(py)?.into_any());
        }
        let (out, lps) = py.detach(move || {
            catch_panic(|| {
                let mut g = model.generator_for_prompt(&prompt, &cfg)?;
                let mut out = String::new();
                while let Some(piece) = g.next_text()? {
                    out.push_str(&piece);
                }
                Ok((out, g.logprobs().to_vec()))
            })
        })?;
        let lps = super::args::logprobs_to_py(py, &lps)?;
        Ok((out, lps).into_pyobject(py)?.into_any())
    }

    /// Complete several prompts at once, one batched forward per step for all of them; each
    /// text equals what `generate` gives for that prompt alone (same keywords).
    #[pyo3(signature = (prompts, **kwargs))]
    fn generate_batch(
        &self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<String>> {
        let prompts = texts(prompts, "prompts")?;
        let cfg = gen_config(kwargs, GenerationDefaults::PLAIN)?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_batch(&prompts, &cfg)))?)
    }

    /// `generate_ids` for several id lists at once (one batched forward per step).
    #[pyo3(signature = (input_ids, **kwargs))]
    fn generate_batch_ids(
        &self,
        py: Python<'_>,
        input_ids: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let ids = id_lists(input_ids, "input_ids")?;
        let cfg = gen_config(kwargs, GenerationDefaults::PLAIN)?;
        let model = self.inner.clone();
        Ok(py.detach(move || catch_panic(|| model.generate_batch_ids(&ids, &cfg)))?)
    }

    /// Logits of the last position of each id list (each in its own context), `batch_size`
    /// sequences per forward: a float32 array `[len(input_ids), vocab]`.
    #[pyo3(signature = (input_ids, batch_size = 8))]
    fn last_logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'_, PyAny>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = id_lists(input_ids, "input_ids")?;
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
        query: &Bound<'py, PyAny>,
        history: Option<Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(String, Bound<'py, PyList>)> {
        let query = &text(query, "query")?;
        let mut cfg = gen_config(kwargs, GenerationDefaults::CHAT)?;
        cap_max_length(&mut cfg, &self.inner);
        let mut msgs = messages_from_py(history.as_ref())?;
        let model = self.inner.clone();
        let q = Message::new("user", query);
        let hist = msgs.clone();
        let response =
            py.detach(move || catch_panic(|| crate::session::chat(&model, &q, &hist, &cfg)))?;
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
        query: &Bound<'_, PyAny>,
        history: Option<Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyChatStream> {
        let query = &text(query, "query")?;
        let mut cfg = gen_config(kwargs, GenerationDefaults::CHAT)?;
        cap_max_length(&mut cfg, &self.inner);
        let msgs = messages_from_py(history.as_ref())?;
        let model = self.inner.clone();
        let q = Message::new("user", query);
        let hist = msgs.clone();
        let stream = py.detach(move || catch_panic(|| ChatStream::new(&model, &q, &hist, &cfg)))?;
        Ok(PyChatStream::new(
            stream,
            self.inner.chat_format(),
            query,
            msgs,
        ))
    }

    /// A chat session that keeps its KV cache between turns (`system` needs ChatGLM3). `tools`
    /// (ChatGLM3): the functions the model may call, as OpenAI's tool list or plain function
    /// objects; they are the session's system turn (ChatGLM3's tool format has no other).
    #[pyo3(signature = (system = None, tools = None))]
    fn start_chat(
        &self,
        py: Python<'_>,
        system: Option<&str>,
        tools: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyChatSession> {
        let s = match tools {
            None => ChatSession::new(&self.inner, system)?,
            Some(_) if system.is_some() => return Err(InvalidArgumentError::new_err(
                "give tools or system, not both: with tools, ChatGLM3's system turn is the tools' \
                     (as its openai_api_demo writes it)",
            )),
            Some(t) => ChatSession::with_tools(&self.inner, &super::chat::tools_from_py(py, t)?)?,
        };
        Ok(PyChatSession::new(s, self.inner.chat_format()))
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
