//! The loaded pipeline: a [`Model`] is the shared weights ([`Glm2Model`]), the tokenizer and the
//! chat format of one checkpoint, loaded from a directory or a GGUF file, with the one-sequence
//! and batched generation helpers every face uses. Chat sessions and the serving engine take a
//! `&Model` from here; nothing here knows about them.

use crate::chat_format::{chat_prompt_ids, chatglm3_stop_ids, ChatFormat, Message};
use crate::checkpoint::Checkpoint;
use crate::config::Glm2Config;
use crate::device::auto_dtype;
use crate::error::{Error, Result};
use crate::generate::{GenerationConfig, Generator};
use crate::model::prefix::Prefix;
use crate::model::{Cache, Glm2Model, KvMemory, Logits, PoolOptions};
use crate::quantize;
use crate::tokenizer::Tokenizer;
use crate::tuning::Tuning;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Kernel and path choices (default: [`Tuning::env`]).
    pub tuning: Tuning,
    /// How much memory the KV cache's block pool may take (default: 0.9 of what is free once
    /// the weights are loaded); it grows as sequences need blocks, up to that.
    pub kv_cache_memory: KvMemory,
    /// Positions per KV block (a power of two from 16 to 1024).
    pub kv_block_size: usize,
    /// Reuse the keys and values of prompt prefixes already computed (the prefix cache).
    pub prefix_cache: bool,
    /// A peft LoRA adapter directory merged into the weights at load (before `quantize`).
    pub adapter: Option<PathBuf>,
    /// peft LoRA adapters kept beside the weights, by name: each request picks one (or none)
    /// with [`GenerationConfig::adapter`]; sequences of different adapters batch together.
    pub adapters: Vec<(String, PathBuf)>,
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
            tuning: Tuning::env(),
            kv_cache_memory: KvMemory::default(),
            kv_block_size: crate::model::kv_pool::DEFAULT_BLOCK_SIZE,
            prefix_cache: true,
            adapter: None,
            adapters: vec![],
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
        let ckpt = Checkpoint::open_dir(dir)?;
        let ckpt = match &opts.adapter {
            Some(a) => ckpt.with_adapter(crate::checkpoint::LoraAdapter::open(a)?),
            None => ckpt,
        };
        let model = Self::build(&cfg_text, config, tokenizer, &ckpt, dir, opts)?;
        ckpt.check_adapter_merged()?;
        Ok(model)
    }

    /// Load a GGUF file written by [`Model::save_quantized`] (config and tokenizer inside).
    pub fn from_gguf(path: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        if opts.quantize.is_some() {
            return Err(Error::invalid(
                "this GGUF file is already quantized; load it without quantize=",
            ));
        }
        if opts.adapter.is_some() {
            return Err(Error::invalid(
                "a LoRA adapter merges into a float checkpoint directory, not a quantized GGUF file",
            ));
        }
        let g = crate::gguf::read(path)?;
        let config = Glm2Config::from_json_str(&g.config_json)?;
        let chatglm3 = opts.chatglm3.unwrap_or(g.chatglm3);
        let tokenizer = Tokenizer::from_spm_bytes(&g.tokenizer_model, chatglm3)?;
        let mut model = Self::build(&g.config_json, config, tokenizer, &g.checkpoint, path, opts)?;
        model.quantization = g.quantization;
        Ok(model)
    }

    fn build(
        cfg_text: &str,
        config: Glm2Config,
        tokenizer: Tokenizer,
        ckpt: &Checkpoint,
        dir: &Path,
        opts: &LoadOptions<'_>,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config_json: serde_json::Value = serde_json::from_str(cfg_text)
            .map_err(|e| Error::config(format!("{}: {e}", cfg_path.display())))?;
        let dtype = opts
            .dtype
            .unwrap_or_else(|| auto_dtype(&config, &opts.device));
        if dtype == candle_core::DType::BF16 && !crate::device::has_bf16(&opts.device) {
            return Err(Error::invalid(
                "dtype bfloat16: this GPU has no bfloat16 arithmetic (compute capability below 8.0): \
                 use dtype=\"float16\" (or \"auto\", which picks it)",
            ));
        }
        let devices = if opts.layer_devices.is_empty() {
            vec![opts.device.clone()]
        } else {
            opts.layer_devices.clone()
        };
        // ChatGLM3's code applies rope_ratio to the rotary base, ChatGLM2's to the positions
        let mut config = config;
        config.rope_scales_base = tokenizer.has_roles();
        let mut model = Glm2Model::load(
            &config,
            ckpt,
            dtype,
            &devices,
            opts.quantize,
            opts.tuning,
            opts.progress,
        )?;
        for (name, dir) in &opts.adapters {
            model.add_adapter(name, &crate::checkpoint::LoraAdapter::open(dir)?)?;
        }
        let prefix = match (&opts.prefix_checkpoint, config.pre_seq_len) {
            (Some(p), _) => Some(Prefix::load_dir(p, &config, dtype, &opts.device)?),
            (None, Some(pre)) if Prefix::present(ckpt) => Some(Prefix::from_checkpoint(
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
        // the KV pool's limit from the memory left once the weights are in (every device of a
        // split holds its layers' share)
        let free = devices
            .iter()
            .map(crate::device::free_memory)
            .collect::<Option<Vec<u64>>>()
            .map(|f| f.iter().min().copied().unwrap_or(0) * f.len() as u64);
        model.set_kv_pool(PoolOptions {
            block_size: opts.kv_block_size,
            max_bytes: opts.kv_cache_memory.bytes(free),
            prefix_cache: opts.prefix_cache,
        })?;
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
    /// tokenizer to one GGUF file that [`Model::load`] reads back (see [`crate::gguf`]). A
    /// P-Tuning prefix is not written (load it again with `prefix_checkpoint`).
    pub fn save_quantized(&self, path: &Path) -> Result<()> {
        crate::gguf::write(
            path,
            &self.model,
            &self.tokenizer,
            &self.config_json,
            self.quantization.as_deref(),
        )
    }

    /// This model (weights shared, not copied) with other step-time tuning switches; see
    /// [`Glm2Model::with_tuning`].
    pub fn with_tuning(&self, tuning: Tuning) -> Self {
        Self {
            model: Arc::new(self.model.with_tuning(tuning)),
            ..self.clone()
        }
    }

    /// This model (everything shared) running with the adapter `name` loaded beside the weights
    /// ([`LoadOptions::adapters`]); `None`: the base model.
    pub fn with_adapter(&self, name: Option<&str>) -> Result<Self> {
        Ok(Self {
            model: Arc::new(self.model.with_adapter(name)?),
            ..self.clone()
        })
    }

    /// The names of the adapters loaded beside the weights.
    pub fn adapter_names(&self) -> Vec<String> {
        self.model.adapter_names()
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

    /// The conversation format of this model (ChatGLM3 when its tokenizer has role tokens).
    pub fn chat_format(&self) -> ChatFormat {
        if self.tokenizer().has_roles() {
            ChatFormat::ChatGlm3
        } else {
            ChatFormat::ChatGlm2
        }
    }

    /// Prompt ids of a whole conversation plus a new query (the official `chat` re-encodes so).
    pub fn chat_prompt_ids(&self, query: &Message, history: &[Message]) -> Result<Vec<u32>> {
        chat_prompt_ids(&self.tokenizer, query, history)
    }

    /// `cfg` with the stop ids of this model's chat format added.
    pub fn chat_config(&self, cfg: &GenerationConfig) -> GenerationConfig {
        let mut cfg = cfg.clone();
        if self.chat_format() == ChatFormat::ChatGlm3 {
            cfg.stop_token_ids
                .extend(chatglm3_stop_ids(self.tokenizer()));
        }
        cfg
    }
}
