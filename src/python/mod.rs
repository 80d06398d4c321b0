//! The Python face of glm2rs (`glm2rs._glm2rs`), one file per concept, each a thin wrapper:
//! errors (the exception hierarchy), args (ids and generation keywords), tokenizer, stream
//! (`TextStreamer`), model, chat (streamers, sessions, turns), server, http (the server's routes
//! without a socket, for Ray Serve). Model work runs with the
//! GIL released; every error becomes a `glm2rs.Glm2Error` subclass in `errors.rs`.

mod args;
mod chat;
mod errors;
#[cfg(feature = "server")]
mod http;
mod model;
#[cfg(feature = "server")]
mod server;
mod stream;
mod tokenizer;

use chat::{PyChatSession, PyChatStream, PyChatTurn};
#[cfg(feature = "server")]
use http::{PyHttpApp, PyHttpCall};
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

/// What this build can use here: ``version``, ``features`` (cuda, metal, server, python),
/// ``cpu`` (vector extensions present), ``gpus`` (index, name, compute capability, memory) and
/// ``cuda_problem`` (why CUDA cannot be used, or None).
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let b = crate::device::build_info();
    let d = pyo3::types::PyDict::new(py);
    d.set_item("version", b.version)?;
    d.set_item("features", b.features)?;
    d.set_item("cpu", b.cpu)?;
    let gpus = pyo3::types::PyList::empty(py);
    for (i, name, (ma, mi), mem) in b.gpus {
        let g = pyo3::types::PyDict::new(py);
        g.set_item("index", i)?;
        g.set_item("name", name)?;
        g.set_item("compute_capability", format!("{ma}.{mi}"))?;
        g.set_item("memory_bytes", mem)?;
        gpus.append(g)?;
    }
    d.set_item("gpus", gpus)?;
    d.set_item("cuda_problem", b.cuda_problem)?;
    Ok(d)
}

#[pymodule]
fn _glm2rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(cuda_memory, m)?)?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyStream>()?;
    m.add_class::<PyChatStream>()?;
    m.add_class::<PyChatSession>()?;
    m.add_class::<PyChatTurn>()?;
    #[cfg(feature = "server")]
    m.add_class::<PyServer>()?;
    #[cfg(feature = "server")]
    m.add_class::<PyHttpApp>()?;
    #[cfg(feature = "server")]
    m.add_class::<PyHttpCall>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
