//! The ChatGLM2 network and its per-sequence state.

pub mod glm2;
pub mod kv_cache;
pub mod kv_pool;
pub mod linear;
pub mod lora;
pub mod prefix;

pub use glm2::{Glm2Model, Logits};
pub use kv_cache::Cache;
pub use kv_pool::{KvMemory, KvPool, PoolOptions};
pub use lora::UnmergedLora;
