//! The Python face of glm2rs (`glm2rs._glm2rs`), one file per concept, each a thin wrapper:
//! errors (the exception hierarchy), args (ids and generation keywords), tokenizer, stream
//! (`TextStreamer`), model, chat (streamers, sessions, turns), server. Model work runs with the
//! GIL released; every error becomes a `glm2rs.Glm2Error` subclass in `errors.rs`.

mod args;
mod chat;
mod errors;
mod model;
#[cfg(feature = "server")]
mod server;
mod stream;
mod tokenizer;

use chat::{PyChatSession, PyChatStream, PyChatTurn};
use model::PyModel;
use pyo3::prelude::*;
#[cfg(feature = "server")]
use server::PyServer;
use stream::PyStream;
use tokenizer::PyTokenizer;

/// Allocator-side memory of a GPU in bytes: ``used``, ``used_peak``, ``reserved``,
/// ``reserved_peak`` (PyTorch's ``memory_allocated`` and friends). ``reset_peak`` restarts the
/// peaks after reading them.
#[pyfunction]
#[pyo3(signature = (device = "cuda", reset_peak = false))]
fn cuda_memory(
    device: &str,
    reset_peak: bool,
) -> PyResult<std::collections::HashMap<&'static str, u64>> {
    let m = crate::device::cuda_memory(device, reset_peak)?;
    Ok([
        ("used", m.used),
        ("used_peak", m.used_peak),
        ("reserved", m.reserved),
        ("reserved_peak", m.reserved_peak),
    ]
    .into_iter()
    .collect())
}

#[pymodule]
fn _glm2rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(cuda_memory, m)?)?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyStream>()?;
    m.add_class::<PyChatStream>()?;
    m.add_class::<PyChatSession>()?;
    m.add_class::<PyChatTurn>()?;
    #[cfg(feature = "server")]
    m.add_class::<PyServer>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
