//! Connections: the accept loop (a cap on open connections that fits the process's file limit,
//! hyper's header read timeout, graceful drain) and the one answer hyper writes by itself.
//!
//! hyper answers a request it cannot parse (headers over its buffer or over 100 fields: 431; a
//! URI too long: 414; a malformed request line or header: 400) before any service runs, with an
//! empty body. [`Shaped`] rewrites exactly those answers into OpenAI's error object, so that a
//! client sees one error shape whatever refused it.

use super::{ApiError, SHUTDOWN_GRACE, STREAM_CUT_MARGIN};
use axum::http::StatusCode;
use axum::Router;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceExt;

/// File descriptors kept free for everything else the process opens (model files, logs, the
/// Python interpreter's own) when the connection cap is fitted to the file limit.
const FD_RESERVE: u64 = 64;

/// The connection cap to use: `wanted`, lowered so that open connections can never exhaust the
/// process's file descriptors (the soft `RLIMIT_NOFILE` is first raised towards the hard limit
/// as far as `wanted` needs). Without the fit, a full descriptor table makes `accept` fail and
/// every new client wait until an idle connection times out.
pub(crate) fn fit_to_file_limit(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let open = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let need = (wanted as u64)
            .saturating_add(open)
            .saturating_add(FD_RESERVE);
        let limit = match rlimit::increase_nofile_limit(need) {
            Ok(l) => l,
            Err(_) => match rlimit::getrlimit(rlimit::Resource::NOFILE) {
                Ok((soft, _)) => soft,
                Err(_) => return wanted.max(1),
            },
        };
        let room = limit.saturating_sub(open).saturating_sub(FD_RESERVE).max(1);
        let cap = (wanted as u64).min(room).max(1) as usize;
        if cap < wanted {
            eprintln!(
                "glm2rs serve: at most {cap} connections (asked {wanted}; the file limit is {limit})"
            );
        }
        cap
    }
    #[cfg(not(unix))]
    {
        wanted.max(1)
    }
}

/// One open connection, as the accept loop sees it.
struct Open {
    /// Requests of this connection whose answer (body included) is not yet finished.
    busy: AtomicUsize,
    /// Told to close if it is idle (a new client needs its place).
    evict: tokio::sync::Notify,
    /// Already told so (not to be picked twice while it closes).
    evicted: std::sync::atomic::AtomicBool,
}

/// Keeps its connection busy while alive: held by a request's answer until its body ends.
struct Busy(Arc<Open>);

impl Busy {
    fn new(open: &Arc<Open>) -> Self {
        open.busy.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body that keeps its connection marked busy until it is finished or dropped.
struct BusyBody<B> {
    inner: B,
    _busy: Busy,
}

impl<B: http_body::Body + Unpin> http_body::Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accept connections until `stop` turns true, each served by hyper's HTTP/1 with a header read
/// timeout (slowloris, idle keep-alive) under a cap on open connections. At the cap, the oldest
/// connection with no request in flight (idle keep-alive, or still sending its headers) is
/// closed to make room, as nginx does; only when every connection is busy is the new one closed.
/// On stop: no new connections; requests in flight get [`SHUTDOWN_GRACE`] to finish, then
/// whatever is still open (a stream, a silent client) is cut.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    cut: tokio::sync::watch::Sender<bool>,
    header_timeout: std::time::Duration,
    max_connections: usize,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("glm2rs serve: {e}");
            return;
        }
    };
    let cap = max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let permits = Arc::new(tokio::sync::Semaphore::new(cap));
    // open connections, oldest first (entries of closed ones are pruned as we go, below)
    let mut opened: VecDeque<std::sync::Weak<Open>> = VecDeque::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (socket, _) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // out of file descriptors and the like: wait a moment instead of spinning
                eprintln!("glm2rs serve: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                opened.retain(|w| w.strong_count() > 0);
                let idle = opened.iter().filter_map(|w| w.upgrade()).find(|o| {
                    o.busy.load(Ordering::SeqCst) == 0 && !o.evicted.load(Ordering::SeqCst)
                });
                let Some(idle) = idle else {
                    drop(socket); // every connection is busy: closed at once
                    continue;
                };
                idle.evicted.store(true, Ordering::SeqCst);
                idle.evict.notify_one();
                let wait = tokio::time::timeout(
                    std::time::Duration::from_millis(500),
                    permits.clone().acquire_owned(),
                );
                match wait.await {
                    Ok(Ok(p)) => p,
                    _ => {
                        drop(socket);
                        continue;
                    }
                }
            }
        };
        let _ = socket.set_nodelay(true);
        let open = Arc::new(Open {
            busy: AtomicUsize::new(0),
            evict: tokio::sync::Notify::new(),
            evicted: std::sync::atomic::AtomicBool::new(false),
        });
        // at most `cap` are open at once: pruning the closed ones whenever the list has grown to
        // twice that keeps it bounded (a Weak holds its connection's allocation) at O(1) per accept
        if opened.len() >= 2 * cap {
            opened.retain(|w| w.strong_count() > 0);
        }
        opened.push_back(Arc::downgrade(&open));
        let svc_open = open.clone();
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                let busy = Busy::new(&svc_open);
                let call = app.clone().oneshot(req.map(axum::body::Body::new));
                async move {
                    let res = call.await?;
                    Ok::<_, std::convert::Infallible>(
                        res.map(|inner| BusyBody { inner, _busy: busy }),
                    )
                }
            });
        let mut stopping = stop.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(Shaped::new(socket)), service);
            let mut conn = std::pin::pin!(conn);
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = open.evict.notified() => {
                        if open.busy.load(Ordering::SeqCst) == 0 {
                            break; // dropped: closed
                        }
                        // a request started meanwhile: it stays, and may be picked again later
                        open.evicted.store(false, Ordering::SeqCst);
                    }
                    _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) } => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                        break;
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // streams still running shortly before the deadline are told to end (an error event and
    // `[DONE]`), so that what is cut at the deadline is only what cannot end by itself
    tokio::spawn(async move {
        tokio::time::sleep(SHUTDOWN_GRACE.saturating_sub(STREAM_CUT_MARGIN)).await;
        let _ = cut.send(true);
    });
    // every connection gives its permit back when it is done
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(cap as u32)).await;
}

/// A socket whose writes pass through unchanged, except hyper's own bodiless answer to a request
/// it could not parse, which goes out with OpenAI's error object as its body.
pub(crate) struct Shaped<T> {
    inner: T,
    /// A rewritten answer still being written (bytes, how far).
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> Shaped<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

/// hyper's automatic answer to a parse error, rewritten with a JSON body; `None` for any other
/// bytes (the service's own answers always carry a body).
fn reshape(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let status: StatusCode = rest.get(..3)?.parse().ok()?;
    let (code, message) = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request's headers are over the server's limit (size or number of fields)",
        ),
        StatusCode::URI_TOO_LONG => (
            "uri_too_long",
            "the request's URI is over the server's limit",
        ),
        StatusCode::BAD_REQUEST => (
            "malformed_request",
            "the request is not valid HTTP/1.1 (request line or headers)",
        ),
        _ => return None,
    };
    if !text.ends_with("\r\n\r\n") {
        return None;
    }
    let lines: Vec<&str> = text[..text.len() - 4].split("\r\n").collect();
    if !lines
        .iter()
        .any(|l| l.eq_ignore_ascii_case("content-length: 0"))
    {
        return None;
    }
    let body = serde_json::to_vec(&ApiError::refused(status, Some(code), message).body()).ok()?;
    let mut out = String::with_capacity(text.len() + 64);
    for l in &lines {
        let name = l.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("connection") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n", body.len()));
    // hyper closes the connection after a parse error; say so
    out.push_str("connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    Some(bytes)
}

impl<T: AsyncWrite + Unpin> Shaped<T> {
    /// Write what is left of a rewritten answer; Ready(Ok) once all of it is out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, at)) = self.pending.as_mut() {
            if *at >= bytes.len() {
                self.pending = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *at += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Shaped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Shaped<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if buf.starts_with(b"HTTP/1.1 4") {
            if let Some(bytes) = reshape(buf) {
                this.pending = Some((bytes, 0));
                return match this.drain(cx) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    // the rewritten bytes stand for all of hyper's; what is left goes out on
                    // the next write or flush
                    _ => Poll::Ready(Ok(buf.len())),
                };
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_parse_error_answers_are_reshaped() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 22:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(reshape(hyper_431).expect("reshaped")).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains("date: Wed, 02 Dec 2026"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("content-type: application/json"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        // the service's own answers (with a body), other statuses and partial heads pass through
        assert!(reshape(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n").is_none());
        assert!(reshape(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(reshape(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n").is_none());
        assert!(reshape(b"data: HTTP/1.1 431\r\ncontent-length: 0\r\n\r\n").is_none());
    }

    #[test]
    fn the_connection_cap_fits_the_file_limit() {
        assert_eq!(fit_to_file_limit(1), 1);
        let cap = fit_to_file_limit(usize::MAX / 2);
        assert!((1..usize::MAX / 2).contains(&cap));
    }
}
