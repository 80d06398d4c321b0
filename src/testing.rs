//! Helpers shared by the unit tests, the integration tests and the benches (not API).

use candle_core::Tensor;

/// Largest absolute elementwise difference of two tensors of one shape, as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max_abs_diff: tensors of one shape and device")
}
