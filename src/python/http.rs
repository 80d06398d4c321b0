//! `glm2rs.HttpApp`: the HTTP surface of `glm2rs serve` (routes, request parsing, response and
//! error formatting, API key) without a socket, for a host that owns the connections: a Ray Serve
//! replica hands it each request and forwards the response as it is produced.
//!
//! A request runs on the app's own tokio runtime; its response reaches Python through `sink`, a
//! callable invoked from that runtime's threads (with the GIL) once with `(status, headers)`, then
//! with each body chunk as `bytes`, then with `None`. The Python side (`glm2rs.ray`) passes a sink
//! that hands each item to its event loop (`loop.call_soon_threadsafe`), which makes the
//! response an async iterator without a thread per request. `HttpCall.cancel()` (or the call's
//! end) drops the response: a stream cancelled this way ends its generation as a closed
//! connection does.

use super::errors::InvalidArgumentError;
use super::model::PyModel;
use crate::error::catch_panic;
use axum::body::Body;
use futures_util::StreamExt;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tower::ServiceExt;

/// A tokio runtime that does not wait for its tasks when dropped (it may be dropped on a thread
/// that holds the GIL, which a running task may be waiting for).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[pyclass(module = "glm2rs._glm2rs", name = "HttpApp", frozen)]
pub struct PyHttpApp {
    router: axum::Router,
    rt: Runtime,
    model_name: String,
}

/// One request in flight.
#[pyclass(module = "glm2rs._glm2rs", name = "HttpCall", frozen)]
pub struct PyHttpCall {
    task: tokio::task::AbortHandle,
}

/// Hand one item to the sink; false when the sink raised (its consumer is gone).
fn deliver(
    sink: &Py<PyAny>,
    item: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>>,
) -> bool {
    Python::attach(|py| match item(py).and_then(|v| sink.call1(py, (v,))) {
        Ok(_) => true,
        Err(e) => {
            e.print(py);
            false
        }
    })
}

#[pymethods]
impl PyHttpApp {
    /// The HTTP app of `model` (its continuous-batching engine starts here). The keywords are
    /// `Server`'s; `loopback=True` applies the Host checks of a server bound to a loopback address.
    #[new]
    #[pyo3(signature = (model, api_key = None, model_name = None, max_batch = 32, max_queue = 256, allow_origins = None, loopback = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &PyModel,
        api_key: Option<String>,
        model_name: Option<String>,
        max_batch: usize,
        max_queue: usize,
        allow_origins: Option<Vec<String>>,
        loopback: bool,
    ) -> PyResult<Self> {
        let name = model_name.unwrap_or_else(|| model.default_name());
        let cfg = crate::server::ServerConfig {
            api_key,
            model_name: name.clone(),
            engine: crate::engine::EngineConfig {
                max_batch,
                max_queue,
            },
            allow_origins: allow_origins.unwrap_or_default(),
            ..Default::default()
        };
        let m = model.inner.clone();
        let router = py.detach(move || catch_panic(|| crate::server::app(m, &cfg, loopback)))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("glm2rs-http-app")
            .build()
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "cannot start the HTTP runtime: {e}"
                ))
            })?;
        Ok(Self {
            router,
            rt: Runtime(Some(rt)),
            model_name: name,
        })
    }

    /// The model id shown by `/v1/models` and in responses.
    #[getter]
    fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Start one request: `method` ("GET", "POST"), `path` with its query string, `headers` as
    /// (name, value) pairs, `body` bytes. The response goes to `sink` (see the module).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        sink: Py<PyAny>,
    ) -> PyResult<PyHttpCall> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            InvalidArgumentError::new_err(format!("{what}: {e}"))
        };
        let mut req = axum::http::Request::builder().method(
            axum::http::Method::from_bytes(method.as_bytes()).map_err(|e| bad("method", &e))?,
        );
        req = req.uri(
            path.parse::<axum::http::Uri>()
                .map_err(|e| bad("path", &e))?,
        );
        for (k, v) in &headers {
            let name = axum::http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| bad("header name", &e))?;
            let value =
                axum::http::HeaderValue::from_str(v).map_err(|e| bad("header value", &e))?;
            req = req.header(name, value);
        }
        let req = req.body(Body::from(body)).map_err(|e| bad("request", &e))?;
        let router = self.router.clone();
        let rt = self
            .rt
            .0
            .as_ref()
            .expect("the runtime lives as long as the app");
        let task = rt.spawn(async move {
            let res = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (parts, body) = res.into_parts();
            let status = parts.status.as_u16();
            let head: Vec<(String, String)> = parts
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            if !deliver(&sink, |py| {
                (status, head).into_pyobject(py).map(|t| t.into_any())
            }) {
                return;
            }
            let mut chunks = body.into_data_stream();
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(b) if b.is_empty() => {}
                    Ok(b) => {
                        if !deliver(&sink, |py| Ok(PyBytes::new(py, &b).into_any())) {
                            return;
                        }
                    }
                    // the body failed mid-way: end it (the consumer sees a short body)
                    Err(_) => break,
                }
            }
            deliver(&sink, |py| Ok(py.None().into_bound(py)));
        });
        Ok(PyHttpCall {
            task: task.abort_handle(),
        })
    }
}

#[pymethods]
impl PyHttpCall {
    /// Drop the response (a stream's generation stops as on a closed connection); no more items
    /// reach the sink.
    fn cancel(&self) {
        self.task.abort();
    }

    /// Whether the response has been delivered to the end (or cancelled).
    #[getter]
    fn done(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for PyHttpCall {
    fn drop(&mut self) {
        self.task.abort();
    }
}
