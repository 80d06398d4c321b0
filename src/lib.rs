//! glm2rs: a fast inference engine for the ChatGLM2-6B family on candle.
//!
//! The crate is a house of floors; each module imports only from floors below it
//! (`docs/architecture.md` draws the map):
//!
//! | floor | modules | owns |
//! | --- | --- | --- |
//! | 0 | [`error`], [`tuning`] | the one error enum; the tuning switches |
//! | 1 | [`config`], [`device`], [`pth`], [`quantize`] | `config.json`; devices, dtypes, the CUDA pool; the torch zip reader; quantized layouts (`Bits`) and types |
//! | 2 | [`checkpoint`], [`tokenizer`], [`chat_format`], [`kernels`] | weight files; SentencePiece; prompt formats; CPU/CUDA kernels |
//! | 3 | [`model`] | the GLM2 layers, KV cache, P-Tuning prefix; the reference forward and the CUDA decode beside it |
//! | 4 | [`sampling`], [`generate`] | token choice; one sequence (cache + sampler + stop rules) |
//! | 5 | [`pipeline`], [`gguf`] | [`Model`]: weights + tokenizer + chat format, loading, batched helpers; glm2rs's GGUF file |
//! | 6 | [`session`], [`engine`] | chat and chat sessions; the continuous-batching scheduler |
//! | 7 | `server` (feature `server`), `python` (feature `python`) | the faces: HTTP and Python |
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
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod pth;
pub mod quantize;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod tuning;

#[cfg(feature = "python")]
mod python;

pub use chat_format::{build_prompt, process_response, ChatFormat, Message};
pub use config::Glm2Config;
pub use device::{
    auto_dtype, cuda_memory, dtype_name, parse_device, parse_devices, parse_dtype, CudaMemory,
};
pub use engine::{Engine, EngineConfig, Event};
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerationConfig, GenerationDefaults, Generator};
pub use model::{Cache, Glm2Model, Logits};
pub use pipeline::{LoadOptions, Model};
pub use sampling::SamplingConfig;
pub use session::{chat, ChatSession, ChatStream, ChatTurn};
pub use tokenizer::{TextStream, Tokenizer};
pub use tuning::Tuning;
