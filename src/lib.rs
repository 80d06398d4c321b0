//! glm2rs: a fast inference engine for the ChatGLM2-6B family on candle.
//!
//! ```no_run
//! use glm2rs::{Model, LoadOptions, GenerationConfig};
//! let model = Model::from_dir("chatglm2-6b".as_ref(), &LoadOptions::default())?;
//! let cfg = GenerationConfig { max_new_tokens: Some(32), ..Default::default() };
//! let mut gen = model.generator_for_prompt(&glm2rs::build_prompt("你好", &[]), &cfg)?;
//! while let Some(piece) = gen.next_text()? {
//!     print!("{piece}");
//! }
//! # Ok::<(), glm2rs::Error>(())
//! ```

pub mod chat_format;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod pth;
pub mod quantize;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod tokenizer;

#[cfg(feature = "python")]
mod python;

pub use chat_format::{build_prompt, process_response, ChatFormat, Message};
pub use config::Glm2Config;
pub use engine::{Engine, EngineConfig, Event};
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerationConfig, Generator};
pub use model::{Cache, Glm2Model, Logits};
pub use sampling::SamplingConfig;
pub use session::{ChatSession, ChatStream, ChatTurn};
pub use tokenizer::{TextStream, Tokenizer};

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A device string split into its kind and index (`"cuda:1"` -> `("cuda", 1)`; no index: 0),
/// with the trimmed, lower-case string for messages.
fn split_device(s: &str) -> Result<(String, usize, String)> {
    let s = s.trim().to_ascii_lowercase();
    match s.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| {
                Error::invalid(format!("device \"{s}\": the index must be a number"))
            })?;
            Ok((k.to_string(), i, s.clone()))
        }
        None => Ok((s.clone(), 0, s)),
    }
}

/// Parse a device string: `"cpu"`, `"cuda"`, `"cuda:N"`, `"metal"`, `"metal:N"`.
pub fn parse_device(s: &str) -> Result<Device> {
    let (kind, index, s) = split_device(s)?;
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            let dev = Device::new_cuda(index)
                .map_err(|e| Error::invalid(format!("device \"{s}\" is not available: {e}")))?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &dev {
                // One model on one GPU uses one stream: the per-allocation events that guard
                // tensors shared between streams only cost time (GLM2RS_CUDA_EVENTS=1 keeps
                // them). A model split over several GPUs keeps them (see `parse_devices`).
                if std::env::var("GLM2RS_CUDA_EVENTS").map_or(true, |v| v != "1") {
                    unsafe { d.disable_event_tracking() };
                }
            }
            keep_pool_memory(index)?;
            Ok(dev)
        }
        "metal" | "mps" => Device::new_metal(index)
            .map_err(|e| Error::invalid(format!("device \"{s}\" is not available: {e}"))),
        _ => Err(Error::invalid(format!(
            "unknown device \"{s}\": use \"cpu\", \"cuda\", \"cuda:N\" or \"metal\""
        ))),
    }
}

/// The devices of a model split over `num_gpus` GPUs starting at `device` (`"cuda"` or
/// `"cuda:K"`: GPUs K..K+num_gpus), as the official `load_model_on_gpus`.
pub fn parse_devices(s: &str, num_gpus: usize) -> Result<Vec<Device>> {
    if num_gpus <= 1 {
        return Ok(vec![parse_device(s)?]);
    }
    let (kind, first, _) = split_device(s)?;
    if kind != "cuda" && kind != "gpu" {
        return Err(Error::invalid(format!(
            "num_gpus={num_gpus} needs a CUDA device, not \"{s}\""
        )));
    }
    // Streams of several GPUs exchange tensors: keep cudarc's event tracking, which orders
    // each cross-device copy after the work that produced its source.
    (first..first + num_gpus)
        .map(|i| {
            let dev = Device::new_cuda(i).map_err(|e| {
                Error::invalid(format!("device \"cuda:{i}\" is not available: {e}"))
            })?;
            keep_pool_memory(i)?;
            Ok(dev)
        })
        .collect()
}

/// Freed GPU memory stays in the pool for the next step (`GLM2RS_CUDA_POOL_RELEASE=1` returns
/// it to the driver at each synchronization, the CUDA default).
fn keep_pool_memory(_ordinal: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    if std::env::var("GLM2RS_CUDA_POOL_RELEASE").map_or(true, |v| v != "1") {
        kernels::cuda::keep_pool_memory(_ordinal)?;
    }
    Ok(())
}

/// Allocator-side GPU memory in bytes (the pool every tensor comes from; the CUDA context and
/// library workspaces are not in it): the figures PyTorch reports as `memory_allocated`,
/// `max_memory_allocated`, `memory_reserved` and `max_memory_reserved`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaMemory {
    pub used: u64,
    pub used_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
}

/// [`CudaMemory`] of a `"cuda"` / `"cuda:N"` device; `reset_peak` restarts the peaks from the
/// current values after reading them.
pub fn cuda_memory(device: &str, reset_peak: bool) -> Result<CudaMemory> {
    let (kind, _index, s) = split_device(device)?;
    if kind != "cuda" && kind != "gpu" {
        return Err(Error::invalid(format!(
            "cuda_memory needs a CUDA device, not \"{s}\""
        )));
    }
    #[cfg(feature = "cuda")]
    {
        let [used, used_peak, reserved, reserved_peak] =
            kernels::cuda::pool_memory(_index, reset_peak)?;
        Ok(CudaMemory {
            used,
            used_peak,
            reserved,
            reserved_peak,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = reset_peak;
        Err(Error::invalid(
            "this build of glm2rs has no CUDA support (build with the `cuda` feature)",
        ))
    }
}

/// Parse a dtype string; `None` means `"auto"`.
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "float32" | "f32" | "fp32" | "float" => Ok(Some(DType::F32)),
        "float16" | "f16" | "fp16" | "half" => Ok(Some(DType::F16)),
        "bfloat16" | "bf16" => Ok(Some(DType::BF16)),
        other => Err(Error::invalid(format!(
            "unknown dtype \"{other}\": use \"auto\", \"float32\", \"float16\" or \"bfloat16\""
        ))),
    }
}

/// The name of a dtype as Python users write it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "other",
    }
}

/// Physical memory of this machine in bytes, if known.
fn total_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What `dtype="auto"` picks:
/// - CUDA: bfloat16 (the range of float32, half the memory);
/// - Metal: float16;
/// - CPU: float32 when the float32 weights take at most 40% of physical memory (exact and, on
///   CPU, fastest per element), else float16 — the official checkpoints' own dtype, and the
///   16-bit type that candle's CPU matmul runs natively.
pub fn auto_dtype(cfg: &Glm2Config, device: &Device) -> DType {
    match device {
        Device::Cuda(_) => DType::BF16,
        Device::Metal(_) => DType::F16,
        Device::Cpu => {
            let f32_bytes = cfg.num_parameters() as u64 * 4;
            match total_memory_bytes() {
                Some(total) if f32_bytes * 10 <= total * 4 => DType::F32,
                _ => DType::F16,
            }
        }
    }
}

/// How to load a model.
pub struct LoadOptions<'a> {
    pub device: Device,
    /// `None`: see [`auto_dtype`].
    pub dtype: Option<DType>,
    /// Called with (tensors done, tensors in all) while loading.
    pub progress: Option<&'a dyn Fn(usize, usize)>,
    /// Force ChatGLM3's tokenizer (role tokens); `None`: decided from the checkpoint.
    pub chatglm3: Option<bool>,
    /// A P-Tuning v2 checkpoint directory whose prefix goes in front of every sequence.
    pub prefix_checkpoint: Option<PathBuf>,
    /// Quantize the linear layers while loading (see [`quantize`]).
    pub quantize: Option<quantize::QuantType>,
    /// Devices to split the layers over (several GPUs); empty: everything on `device`.
    /// The first must be `device`.
    pub layer_devices: Vec<Device>,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            progress: None,
            chatglm3: None,
            prefix_checkpoint: None,
            quantize: None,
            layer_devices: vec![],
        }
    }
}

/// A loaded model with its tokenizer: the shareable entry point of the library.
#[derive(Clone)]
pub struct Model {
    model: Arc<Glm2Model>,
    tokenizer: Arc<Tokenizer>,
    config_json: serde_json::Value,
    dir: PathBuf,
    quantization: Option<String>,
}

/// Whether a checkpoint directory is a ChatGLM3 one (by its recorded names).
fn looks_like_chatglm3(dir: &Path, cfg: &Glm2Config) -> bool {
    let in_name = |s: &str| s.to_ascii_lowercase().contains("chatglm3");
    if cfg.name_or_path.as_deref().is_some_and(in_name) {
        return true;
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v.get("name_or_path")
                .and_then(|x| x.as_str())
                .is_some_and(in_name)
            {
                return true;
            }
        }
    }
    false
}

impl Model {
    /// Load a model directory (config.json, tokenizer.model, weights) or a GGUF file written
    /// by [`Model::save_quantized`].
    pub fn load(path: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            Self::from_gguf(path, opts)
        } else {
            Self::from_dir(path, opts)
        }
    }

    /// Load a Hugging Face style model directory (config.json, tokenizer.model, weights).
    pub fn from_dir(dir: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config = Glm2Config::from_json_str(&cfg_text)
            .map_err(|e| Error::config(format!("{}: {e}", cfg_path.display())))?;
        let chatglm3 = opts
            .chatglm3
            .unwrap_or_else(|| looks_like_chatglm3(dir, &config));
        let tokenizer = Tokenizer::from_spm_file(&dir.join("tokenizer.model"), chatglm3)?;
        let ckpt = checkpoint::Checkpoint::open_dir(dir)?;
        Self::build(&cfg_text, config, tokenizer, &ckpt, dir, opts)
    }

    /// Load a GGUF file written by [`Model::save_quantized`] (config and tokenizer inside).
    pub fn from_gguf(path: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        use candle_core::quantized::gguf_file::Value;
        let (ckpt, meta) = checkpoint::Checkpoint::open_gguf(path)?;
        let text = |k: &str| -> Result<String> {
            meta.get(k)
                .and_then(|v| v.to_string().ok().cloned())
                .ok_or_else(|| {
                    Error::checkpoint(
                        path,
                        format!("GGUF metadata {k} is missing: not written by glm2rs"),
                    )
                })
        };
        let cfg_text = text("glm2rs.config")?;
        let config = Glm2Config::from_json_str(&cfg_text)?;
        let spm: Vec<u8> = match meta.get("glm2rs.tokenizer") {
            Some(Value::Array(v)) => v.iter().filter_map(|x| x.to_u8().ok()).collect(),
            _ => {
                return Err(Error::checkpoint(
                    path,
                    "GGUF metadata glm2rs.tokenizer is missing",
                ))
            }
        };
        let chatglm3 = opts
            .chatglm3
            .unwrap_or_else(|| matches!(meta.get("glm2rs.chatglm3"), Some(Value::Bool(true))));
        let tokenizer = Tokenizer::from_spm_bytes(&spm, chatglm3)?;
        if opts.quantize.is_some() {
            return Err(Error::invalid(
                "this GGUF file is already quantized; load it without quantize=",
            ));
        }
        let mut model = Self::build(&cfg_text, config, tokenizer, &ckpt, path, opts)?;
        model.quantization = text("glm2rs.quantization").ok().filter(|q| q != "none");
        Ok(model)
    }

    fn build(
        cfg_text: &str,
        config: Glm2Config,
        tokenizer: Tokenizer,
        ckpt: &checkpoint::Checkpoint,
        dir: &Path,
        opts: &LoadOptions<'_>,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config_json: serde_json::Value = serde_json::from_str(cfg_text)
            .map_err(|e| Error::config(format!("{}: {e}", cfg_path.display())))?;
        let dtype = opts
            .dtype
            .unwrap_or_else(|| auto_dtype(&config, &opts.device));
        let devices = if opts.layer_devices.is_empty() {
            vec![opts.device.clone()]
        } else {
            opts.layer_devices.clone()
        };
        let mut model =
            Glm2Model::load(&config, ckpt, dtype, &devices, opts.quantize, opts.progress)?;
        let prefix = match (&opts.prefix_checkpoint, config.pre_seq_len) {
            (Some(p), _) => Some(model::prefix::Prefix::load_dir(p, &config, dtype, &opts.device)?),
            (None, Some(pre)) if model::prefix::Prefix::present(ckpt) => Some(model::prefix::Prefix::from_checkpoint(
                ckpt,
                &config,
                pre,
                config.prefix_projection,
                dtype,
                &opts.device,
            )?),
            (None, Some(_)) => {
                return Err(Error::config(format!(
                    "{}: pre_seq_len is set but the checkpoint has no prefix encoder (pass prefix_checkpoint)",
                    cfg_path.display()
                )))
            }
            (None, None) => None,
        };
        model.set_prefix(prefix)?;
        let quantization =
            opts.quantize
                .map(|q| q.name())
                .or_else(|| match config.quantization_bit {
                    8 => Some("int8".to_string()),
                    4 => Some("int4".to_string()),
                    _ => None,
                });
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            config_json,
            dir: dir.to_path_buf(),
            quantization,
        })
    }

    /// How the linear layers are quantized (`"int8"`, `"int4"`, `"q4_0"`, ...), if they are.
    pub fn quantization(&self) -> Option<&str> {
        self.quantization.as_deref()
    }

    /// Write the model (weights as they are held, quantized or not), its config and its
    /// tokenizer to one GGUF file that [`Model::load`] reads back. A P-Tuning prefix is not
    /// written (load it again with `prefix_checkpoint`).
    pub fn save_quantized(&self, path: &Path) -> Result<()> {
        let tokenizer_model = self.tokenizer.spm_bytes();
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        use model::linear::Exported;
        let dense_type = match self.model.dtype() {
            DType::F32 => GgmlDType::F32,
            DType::BF16 => GgmlDType::BF16,
            _ => GgmlDType::F16,
        };
        let mut tensors: Vec<(String, Arc<QTensor>)> = vec![];
        for (name, w) in self.model.export() {
            let qt = match w {
                Exported::Dense(t) => Arc::new(QTensor::quantize(
                    &t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                    dense_type,
                )?),
                Exported::Official { q, scale, bits } => {
                    Arc::new(quantize::official_to_ggml(&q, &scale, bits)?)
                }
                Exported::Ggml(qt) => qt,
            };
            tensors.push((name, qt));
        }
        let mut cfg = self.config_json.clone();
        if let Some(obj) = cfg.as_object_mut() {
            // the GGUF layout replaces the official checkpoint layout
            obj.insert("quantization_bit".into(), serde_json::json!(0));
        }
        let meta: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("chatglm".into()),
            ),
            ("glm2rs.config", gguf_file::Value::String(cfg.to_string())),
            (
                "glm2rs.tokenizer",
                gguf_file::Value::Array(
                    tokenizer_model
                        .iter()
                        .map(|&b| gguf_file::Value::U8(b))
                        .collect(),
                ),
            ),
            (
                "glm2rs.chatglm3",
                gguf_file::Value::Bool(self.tokenizer.has_roles()),
            ),
            (
                "glm2rs.quantization",
                gguf_file::Value::String(
                    self.quantization.clone().unwrap_or_else(|| "none".into()),
                ),
            ),
        ];
        let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        let tmp = path.with_extension("gguf.partial");
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        use std::io::Write;
        f.flush().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    pub fn model(&self) -> &Arc<Glm2Model> {
        &self.model
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn config(&self) -> &Glm2Config {
        self.model.config()
    }

    /// `config.json` as read (every key, also those the engine ignores).
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config_json
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Logits of every position of `ids` in a fresh context: f32 `[len, vocab]`.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::invalid("input_ids is empty"));
        }
        let mut cache = self.model.new_cache();
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&input, &mut cache, Logits::All)?;
        Ok(logits.squeeze(0)?)
    }

    /// Logits of the last position of each prompt, each in its own fresh context, computed in
    /// batches of `batch` prompts (one forward each): f32 `[vocab]` per prompt.
    pub fn last_logits_batch(&self, prompts: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(batch.max(1)) {
            if let Some(i) = chunk.iter().position(|p| p.is_empty()) {
                return Err(Error::invalid(format!("prompt {} is empty", out.len() + i)));
            }
            let mut caches: Vec<Cache> = chunk.iter().map(|_| self.model.new_cache()).collect();
            let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
            let inputs: Vec<&[u32]> = chunk.iter().map(|p| p.as_slice()).collect();
            for l in self.model.forward_many(&inputs, &mut refs, Logits::Last)? {
                out.push(l.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(out)
    }

    /// Generate from several prompts at once: one batched forward per step for all of them
    /// (each sequence gives exactly what it gives alone). Returns each one's new ids.
    pub fn generate_batch_ids(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        let mut gens = prompts
            .iter()
            .map(|p| self.generator(p.clone(), cfg))
            .collect::<Result<Vec<_>>>()?;
        loop {
            let mut refs: Vec<&mut Generator> =
                gens.iter_mut().filter(|g| !g.is_finished()).collect();
            if refs.is_empty() {
                break;
            }
            Generator::step_many(&mut refs)?;
        }
        Ok(gens.iter().map(|g| g.generated_ids().to_vec()).collect())
    }

    /// Generate text from several prompts at once (see [`Model::generate_batch_ids`]); stop
    /// strings cut each text as in [`Model::generate`].
    pub fn generate_batch(
        &self,
        prompts: &[String],
        cfg: &GenerationConfig,
    ) -> Result<Vec<String>> {
        let mut gens = prompts
            .iter()
            .map(|p| self.generator_for_prompt(p, cfg))
            .collect::<Result<Vec<_>>>()?;
        let mut texts = vec![String::new(); gens.len()];
        loop {
            let mut idx = vec![];
            let mut refs: Vec<&mut Generator> = vec![];
            for (i, g) in gens.iter_mut().enumerate() {
                if !g.is_finished() {
                    idx.push(i);
                    refs.push(g);
                }
            }
            if refs.is_empty() {
                break;
            }
            let tokens = Generator::step_many(&mut refs)?;
            // the piece of a generation's last token includes everything still held back
            for (&i, t) in idx.iter().zip(tokens) {
                let piece = gens[i].push_text(t)?;
                texts[i].push_str(&piece);
            }
        }
        Ok(texts)
    }

    /// A generation from prompt ids.
    pub fn generator(&self, prompt: Vec<u32>, cfg: &GenerationConfig) -> Result<Generator> {
        Generator::new(self.model.clone(), self.tokenizer.clone(), prompt, cfg)
    }

    /// A generation from prompt text (encoded with `[gMASK] sop` in front).
    pub fn generator_for_prompt(&self, prompt: &str, cfg: &GenerationConfig) -> Result<Generator> {
        let ids = self.tokenizer.encode(prompt, true)?;
        self.generator(ids, cfg)
    }

    /// Generate from ids to the end; the new ids (ending with eos when eos was produced).
    pub fn generate_ids(&self, prompt: &[u32], cfg: &GenerationConfig) -> Result<Vec<u32>> {
        self.generator(prompt.to_vec(), cfg)?.run_to_end()
    }

    /// Generate text from prompt text.
    pub fn generate(&self, prompt: &str, cfg: &GenerationConfig) -> Result<String> {
        let mut g = self.generator_for_prompt(prompt, cfg)?;
        let mut out = String::new();
        while let Some(piece) = g.next_text()? {
            out.push_str(&piece);
        }
        Ok(out)
    }
}

/// Largest absolute elementwise difference of two tensors of one shape (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
