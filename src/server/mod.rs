//! The HTTP faces of the engine (feature `server`), one process, loopback by default:
//! - `POST /`: the official `api.py` contract (`{prompt, history, max_length, top_p, temperature}`
//!   -> `{response, history, status, time}`);
//! - `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`: what the `openai`
//!   client expects, streamed as server-sent events or not, errors in OpenAI's shape;
//! - `GET /` (also `/chat`): a web chat page (plain HTML/JS, no CDN);
//! - `GET /health`: engine counters.
//!
//! Every request goes through one [`Engine`], which batches the decode steps of all running
//! requests. A request body is parsed by hand from JSON so that every bad field gets a 400 that
//! names it; nothing a client sends can stop the server.

mod api;
mod conn;
mod logprobs;
mod messages;
mod openai;
mod sse;
mod tools;

use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::pipeline::Model;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// How long a stopping server lets requests in flight finish before cutting them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long before that deadline running streams are ended with an error event.
const STREAM_CUT_MARGIN: std::time::Duration = std::time::Duration::from_millis(400);
use std::net::SocketAddr;
use std::sync::Arc;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (see [`ServerHandle::addr`]).
    pub port: u16,
    /// When set, every API request needs `Authorization: Bearer <key>` (the web page itself does not).
    pub api_key: Option<String>,
    /// The model id shown by `/v1/models` and in responses.
    pub model_name: String,
    pub engine: EngineConfig,
    /// Web origins (`http://host:port`) besides the server's own whose pages may call a server
    /// without an API key (see [`guard`]).
    pub allow_origins: Vec<String>,
    /// A connection must send a request's headers within this time, and an idle keep-alive
    /// connection is closed after it (slow or silent clients cannot hold sockets).
    pub header_timeout: std::time::Duration,
    /// Most connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            model_name: "chatglm2-6b".into(),
            engine: EngineConfig::default(),
            allow_origins: vec![],
            header_timeout: std::time::Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Engine,
    pub model_name: String,
    pub api_key: Option<String>,
    pub created: i64,
    /// Turns true just before a stopping server cuts what is still open: streams then end with
    /// an error event and `[DONE]` instead of a bare end of stream.
    pub cut: Option<tokio::sync::watch::Receiver<bool>>,
}

pub(crate) type Shared = Arc<AppState>;

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: impl Into<Option<&'static str>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into().map(str::to_string),
            code: None,
        }
    }

    /// A refusal that names no field: the type follows the status (`server_error` for 5xx,
    /// `invalid_request_error` otherwise).
    pub fn refused(
        status: StatusCode,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind: if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            },
            param: None,
            code,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// An engine error: bad arguments are the client's (400), a full queue is 503, the rest 500.
    pub fn from_engine(e: Error, param: Option<&'static str>) -> Self {
        match e {
            Error::InvalidArgument(m) => {
                let code = (m.contains("context") || m.contains("max_length"))
                    .then_some("context_length_exceeded");
                Self {
                    code,
                    ..Self::bad(param, m)
                }
            }
            Error::Tokenizer(m) => Self::bad(param, m),
            Error::Overloaded(m) => {
                Self::refused(StatusCode::SERVICE_UNAVAILABLE, Some("overloaded"), m)
            }
            other => Self::refused(StatusCode::INTERNAL_SERVER_ERROR, None, other.to_string()),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Run CPU work of a request (tokenizing a long prompt) on tokio's blocking pool, so the async
/// workers go on answering other requests (`/health`, streams) meanwhile.
pub(crate) async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || crate::error::catch_panic(f))
        .await
        .map_err(|e| Error::Internal(format!("request task: {e}")))?
}

/// Parse a request body as a JSON object.
pub(crate) fn parse_object(
    body: &[u8],
) -> std::result::Result<serde_json::Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(None, format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad(
            None,
            "the request body must be a JSON object",
        )),
    }
}

const INDEX_HTML: &str = include_str!("web/index.html");

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn health(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.model_name,
        "running": s.engine.running(),
        "queued": s.engine.queued(),
        "completed": s.engine.completed(),
        "steps": s.engine.steps(),
    }))
}

/// Prometheus' text exposition of the engine's metrics (requests, KV blocks, prefix cache,
/// tokens, latency histograms; see `engine::Metrics`).
async fn metrics(State(s): State<Shared>) -> Response {
    let engine = s.engine.clone();
    let text = tokio::task::spawn_blocking(move || engine.metrics())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::refused(StatusCode::NOT_FOUND, Some("not_found"), "no such route")
}

/// The key of an `Authorization` header value: scheme `Bearer` in any case (RFC 9110: schemes
/// are case-insensitive), then the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// With an API key set, every request except the web page needs `Authorization: Bearer KEY`;
/// the key is compared in constant time.
async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        use subtle::ConstantTimeEq;
        let page = req.method() == Method::GET
            && matches!(req.uri().path(), "/" | "/chat" | "/health" | "/metrics");
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())));
        if !page && !ok {
            return ApiError::refused(
                StatusCode::UNAUTHORIZED,
                Some("invalid_api_key"),
                "missing or wrong API key (Authorization: Bearer ...)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Errors made below the handlers (a body over the size limit: 413, a method a route does not
/// take: 405, a body that cannot be read: 400) come as plain text or empty; answer them in
/// OpenAI's error shape like every other error.
async fn error_shape(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let text = match axum::body::to_bytes(res.into_body(), 4096).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
    };
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Some("request_too_large"),
        StatusCode::METHOD_NOT_ALLOWED => Some("method_not_allowed"),
        _ => None,
    };
    ApiError::refused(status, code, text).into_response()
}

/// Who may reach a server (what [`guard`] checks).
#[derive(Debug, Clone)]
pub struct Guard {
    /// Bound to a loopback address: only loopback host names are served (DNS rebinding).
    pub loopback: bool,
    /// No API key: a page of another web origin must not drive the server.
    pub keyless: bool,
    /// Origins allowed besides the server's own, lower case, no trailing slash.
    pub allow_origins: Vec<String>,
}

/// The web-origin rules of a server, before anything else runs:
/// - a POST must carry `Content-Type: application/json` (415 otherwise): a page can send
///   `text/plain` to any address without asking, never JSON to another origin;
/// - on a loopback address, the `Host` must be a loopback name (`localhost`, `127.0.0.1`,
///   `[::1]`) or one of the allowed origins' hosts (403 otherwise): a page whose own name was made
///   to resolve to 127.0.0.1 (DNS rebinding) is refused;
/// - without an API key, a request from a web page (`Origin` header) must come from the server's
///   own origin or an allowed one (403 otherwise). Clients that are not browsers send no Origin.
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    if req.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return ApiError::refused(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Some("unsupported_media_type"),
                "the request body must be sent as Content-Type: application/json",
            )
            .into_response();
        }
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if g.loopback {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6
                .split(']')
                .next()
                .map(|h| format!("[{h}]"))
                .unwrap_or_default(),
            None => host.split(':').next().unwrap_or("").to_string(),
        };
        let allowed_name = |o: &String| {
            o.split("://")
                .nth(1)
                .is_some_and(|rest| rest.split(':').next() == Some(name.as_str()))
        };
        if !matches!(name.as_str(), "localhost" | "127.0.0.1" | "[::1]")
            && !g.allow_origins.iter().any(allowed_name)
        {
            return ApiError::refused(
                StatusCode::FORBIDDEN,
                Some("host_not_allowed"),
                format!(
                    "host {host:?} is not served here (a loopback server answers loopback names)"
                ),
            )
            .into_response();
        }
    }
    if g.keyless {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            let own = origin == format!("http://{host}") || origin == format!("https://{host}");
            if !own && !g.allow_origins.contains(&origin) {
                return ApiError::refused(
                    StatusCode::FORBIDDEN,
                    Some("origin_not_allowed"),
                    format!(
                        "origin {origin:?} may not use this server: give it an API key, or allow the origin (--allow-origin)"
                    ),
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// The router over an engine (for embedding in a Rust service).
pub fn router(engine: Engine, model_name: &str, api_key: Option<String>) -> Router {
    build_router(engine, model_name, api_key, None)
}

fn build_router(
    engine: Engine,
    model_name: &str,
    api_key: Option<String>,
    cut: Option<tokio::sync::watch::Receiver<bool>>,
) -> Router {
    let state: Shared = Arc::new(AppState {
        engine,
        model_name: model_name.to_string(),
        api_key,
        created: chrono::Utc::now().timestamp(),
        cut,
    });
    Router::new()
        .route("/", get(index).post(api::official))
        .route("/chat", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route(
            "/v1/chat/completions",
            axum::routing::post(openai::chat_completions),
        )
        .route("/v1/completions", axum::routing::post(openai::completions))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::middleware::from_fn(error_shape))
        .with_state(state)
}

/// The whole HTTP surface of `glm2rs serve` over `model` (its engine, routes, API key and web-origin
/// rules) as a router, for a host that owns the socket itself: the bindings' `HttpApp`, which a Ray
/// Serve replica drives. `loopback`: apply the Host checks of a server bound to a loopback address.
pub fn app(model: Model, cfg: &ServerConfig, loopback: bool) -> Result<Router> {
    build_app(model, cfg, loopback, None)
}

fn build_app(
    model: Model,
    cfg: &ServerConfig,
    loopback: bool,
    cut: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<Router> {
    if cfg.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(Error::invalid(
            "api_key is empty: give a key, or no api_key at all for a server without one",
        ));
    }
    let engine = Engine::new(model, cfg.engine)?;
    let guard_state = Arc::new(Guard {
        loopback,
        keyless: cfg.api_key.is_none(),
        allow_origins: cfg
            .allow_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .collect(),
    });
    Ok(
        build_router(engine, &cfg.model_name, cfg.api_key.clone(), cut)
            .layer(axum::middleware::from_fn_with_state(guard_state, guard)),
    )
}

/// A server running on its own threads; [`ServerHandle::stop`] ends it.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// Bind `host:port` (errors come back here) and serve `model` until stopped.
    pub fn start(model: Model, cfg: ServerConfig) -> Result<Self> {
        let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).map_err(|e| {
            Error::invalid(format!("cannot listen on {}:{}: {e}", cfg.host, cfg.port))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let app = build_app(model, &cfg, addr.ip().is_loopback(), Some(cut_rx))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("glm2rs-http")
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the HTTP runtime: {e}")))?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("glm2rs-server".into())
            .spawn(move || {
                rt.block_on(conn::serve(
                    listener,
                    app,
                    rx,
                    cut_tx,
                    cfg.header_timeout,
                    conn::fit_to_file_limit(cfg.max_connections),
                ));
                // Streams still open are not waited for.
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .map_err(|e| Error::Internal(format!("cannot start the server thread: {e}")))?;
        Ok(Self {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address actually bound (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop accepting, finish, and wait for the server thread.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
