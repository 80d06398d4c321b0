//! glm2rs: a fast inference engine for the ChatGLM2-6B family on candle.
//!
//! The crate is a house of floors; each module imports only from floors below it
//! (`docs/architecture.md` draws the map):
//!
//! | floor | modules | owns |
//! | --- | --- | --- |
//! | 0 | [`error`], [`tuning`] | the one error enum; the tuning switches |
//! | 1 | [`config`], [`pth`], [`quantize`], [`tokenizer`], [`sampling`] | `config.json`; the torch zip reader; quantized layouts (`Bits`) and types; SentencePiece; token choice |
//! | 2 | [`checkpoint`], [`chat_format`], [`kernels`] | weight files; prompt formats; CPU/CUDA kernels |
//! | 3 | [`device`], [`model`] | devices, dtypes, the CUDA pool; the GLM2 layers, KV cache, P-Tuning prefix (reference forward, CUDA decode beside it) |
//! | 4 | [`generate`], [`gguf`] | one sequence (cache + sampler + stop rules); glm2rs's GGUF file |
//! | 5 | [`pipeline`] | [`Model`]: weights + tokenizer + chat format, loading, batched helpers |
//! | 6 | [`session`], [`engine`] | chat and chat sessions; the continuous-batching scheduler |
//! | 7 | `server` (feature `server`) | the HTTP face |
//! | 8 | `python` (feature `python`) | the Python face (its `Server` wraps the HTTP one) |
//!
//! `tests/architecture.rs` holds the same table and fails when an arrow points up.
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
