//! GGUF files: glm2rs writes llama.cpp's `chatglm` layout (its tensor names, hyperparameters and
//! tokenizer fields; see [`llama`]) with the weights as a model holds them (dense, official
//! int8/int4 rows as GGML blocks, or candle's block types), plus `config.json` and the
//! SentencePiece model under `glm2rs.*` keys so that glm2rs reads its own files back exactly
//! ([`crate::pipeline::Model::save_quantized`], [`crate::pipeline::Model::load`]). Files written
//! by llama.cpp's converter (no `glm2rs.*` keys) are read through [`llama::read_foreign`].

/// llama.cpp's names and metadata for the `chatglm` architecture.
pub mod llama;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::Glm2Model;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::Arc;

/// What a glm2rs GGUF file holds besides the tensors.
pub struct GgufModel {
    pub checkpoint: Checkpoint,
    /// `config.json` text.
    pub config_json: String,
    /// `tokenizer.model` bytes.
    pub tokenizer_model: Vec<u8>,
    /// Written from a ChatGLM3 tokenizer.
    pub chatglm3: bool,
    /// `"int8"`, `"q4_0"`, ... or `None` for dense weights.
    pub quantization: Option<String>,
}

/// Open a GGUF file written by [`write`] or by llama.cpp's converter for ChatGLM2/3.
pub fn read(path: &Path) -> Result<GgufModel> {
    use candle_core::quantized::gguf_file::Value;
    // llama.cpp's tensor names (its `chatglm` layout) read as the checkpoint's
    let (checkpoint, meta) = Checkpoint::open_gguf(path, &llama::from_llama)?;
    if !meta.contains_key("glm2rs.config") {
        let shape = |n: &str| {
            let name = llama::from_llama(n).unwrap_or_else(|| n.to_string());
            checkpoint.shape(&name)
        };
        let (config, tokenizer_model, chatglm3) = llama::read_foreign(&meta, &shape)
            .map_err(|e| Error::checkpoint(path, format!("not a ChatGLM2/3 GGUF file: {e}")))?;
        return Ok(GgufModel {
            checkpoint,
            config_json: config.to_string(),
            tokenizer_model,
            chatglm3,
            quantization: None,
        });
    }
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
    let config_json = text("glm2rs.config")?;
    let tokenizer_model: Vec<u8> = match meta.get("glm2rs.tokenizer") {
        Some(Value::Array(v)) => v.iter().filter_map(|x| x.to_u8().ok()).collect(),
        _ => {
            return Err(Error::checkpoint(
                path,
                "GGUF metadata glm2rs.tokenizer is missing",
            ))
        }
    };
    let chatglm3 = matches!(meta.get("glm2rs.chatglm3"), Some(Value::Bool(true)));
    let quantization = text("glm2rs.quantization").ok().filter(|q| q != "none");
    Ok(GgufModel {
        checkpoint,
        config_json,
        tokenizer_model,
        chatglm3,
        quantization,
    })
}

/// Write `model`'s weights (as held), `config_json` (with `quantization_bit` 0: the GGUF
/// layout replaces the official one) and the tokenizer to `path`, through a `.partial` file
/// renamed at the end.
pub fn write(
    path: &Path,
    model: &Glm2Model,
    tokenizer: &Tokenizer,
    config_json: &serde_json::Value,
    quantization: Option<&str>,
) -> Result<()> {
    let tokenizer_model = tokenizer.spm_bytes();
    use crate::model::linear::Exported;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let dense_type = match model.dtype() {
        DType::F32 => GgmlDType::F32,
        DType::BF16 => GgmlDType::BF16,
        _ => GgmlDType::F16,
    };
    let mut tensors: Vec<(String, Arc<QTensor>)> = vec![];
    for (name, w) in model.export() {
        let qt = match w {
            // vectors (norms, biases) in float32, as llama.cpp's converter writes them
            Exported::Dense(t) if t.rank() == 1 => Arc::new(QTensor::quantize(
                &t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                GgmlDType::F32,
            )?),
            Exported::Dense(t) => Arc::new(QTensor::quantize(
                &t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                dense_type,
            )?),
            Exported::Official { q, scale, bits } => {
                Arc::new(crate::quantize::official_to_ggml(&q, &scale, bits)?)
            }
            Exported::Ggml(qt) => qt,
        };
        tensors.push((llama::to_llama(&name).unwrap_or(name), qt));
    }
    let mut cfg = config_json.clone();
    if let Some(obj) = cfg.as_object_mut() {
        // the GGUF layout replaces the official checkpoint layout
        obj.insert("quantization_bit".into(), serde_json::json!(0));
    }
    let llama_meta = llama::metadata(model.config(), config_json, tokenizer)?;
    let mut meta: Vec<(&str, gguf_file::Value)> = llama_meta
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    meta.extend([
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
            gguf_file::Value::Bool(tokenizer.has_roles()),
        ),
        (
            "glm2rs.quantization",
            gguf_file::Value::String(quantization.unwrap_or("none").into()),
        ),
    ]);
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
