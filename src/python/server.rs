//! `glm2rs.Server`: the HTTP server (feature `server`) on a background runtime.

use super::errors::InvalidArgumentError;
use super::model::PyModel;
use crate::error::catch_panic;
use pyo3::prelude::*;
use std::sync::Mutex;

#[pyclass(module = "glm2rs._glm2rs", name = "Server", frozen)]
pub struct PyServer {
    inner: Mutex<Option<crate::server::ServerHandle>>,
    addr: std::net::SocketAddr,
}

#[pymethods]
impl PyServer {
    /// Serve `model` on `host:port` (port 0: a free one) until `stop()`.
    #[new]
    #[pyo3(signature = (model, host = "127.0.0.1", port = 8000, api_key = None, model_name = None, max_batch = 32, max_queue = 256, allow_origins = None, header_timeout = 10.0, max_connections = 1024))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &PyModel,
        host: &str,
        port: i64,
        api_key: Option<String>,
        model_name: Option<String>,
        max_batch: usize,
        max_queue: usize,
        allow_origins: Option<Vec<String>>,
        header_timeout: f64,
        max_connections: usize,
    ) -> PyResult<Self> {
        if !(header_timeout.is_finite() && header_timeout > 0.0 && header_timeout <= 86400.0) {
            return Err(InvalidArgumentError::new_err(format!(
                "header_timeout must be between 0 and 86400 seconds, got {header_timeout}"
            )));
        }
        if max_connections == 0 {
            return Err(InvalidArgumentError::new_err(
                "max_connections must be at least 1",
            ));
        }
        let port = u16::try_from(port).map_err(|_| {
            InvalidArgumentError::new_err(format!("port must be in 0..=65535, got {port}"))
        })?;
        let name = model_name.unwrap_or_else(|| model.default_name());
        let cfg = crate::server::ServerConfig {
            host: host.to_string(),
            port,
            api_key,
            model_name: name,
            engine: crate::engine::EngineConfig {
                max_batch,
                max_queue,
            },
            allow_origins: allow_origins.unwrap_or_default(),
            header_timeout: std::time::Duration::from_secs_f64(header_timeout),
            max_connections,
        };
        let m = model.inner.clone();
        let handle =
            py.detach(move || catch_panic(|| crate::server::ServerHandle::start(m, cfg)))?;
        let addr = handle.addr();
        Ok(Self {
            inner: Mutex::new(Some(handle)),
            addr,
        })
    }

    /// The port actually bound.
    #[getter]
    fn port(&self) -> u16 {
        self.addr.port()
    }

    #[getter]
    fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// `http://host:port`
    #[getter]
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner
            .lock()
            .map(|h| h.as_ref().is_some_and(|h| h.is_running()))
            .unwrap_or(false)
    }

    /// Stop serving (open streams are cut) and wait for the server threads.
    fn stop(&self, py: Python<'_>) {
        let handle = self.inner.lock().ok().and_then(|mut h| h.take());
        if let Some(mut h) = handle {
            py.detach(move || h.stop());
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.stop(py);
    }
}
