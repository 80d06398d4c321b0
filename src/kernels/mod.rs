//! Hand-written kernels where candle's own ops are too slow for this model's shapes.

pub mod cpu_attention;
pub mod cpu_gemv;
pub mod cpu_quant;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod split_plan;
