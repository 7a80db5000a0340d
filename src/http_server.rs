//! Serving HTTP (the gateway and the admin port) against hostile clients,
//! and draining it without losing requests.
//!
//! Each connection is bounded while it has no request in flight: its first
//! request's headers must arrive within the header timeout of the accept,
//! a later request's headers within the header timeout of its first byte,
//! and an idle connection is closed after the idle timeout. A request body
//! must arrive within the body timeout of its headers (a stalled one ends
//! in an error the gateway answers with 408). Connections over the cap are
//! closed at once. hyper's own `header_read_timeout` is not used: it runs
//! from the moment a kept-alive connection goes idle, so it cannot be told
//! apart from the idle timeout, and it does not cover HTTP/2 or the
//! protocol sniffing before the first request.
//!
//! When draining begins the listener closes at once, and every response
//! after that carries `Connection: close`, so a busy HTTP/1.1 keep-alive
//! connection ends right after its current response instead of being cut
//! while the client writes its next request. Connections that stay idle
//! are closed after a short linger; HTTP/2 connections get GOAWAY.
//!
//! With TLS (`http.tls`, `admin.tls`) the handshake runs in the
//! connection's task within the header timeout, ALPN choosing HTTP/2 or
//! HTTP/1.1; a verified client certificate's identity is put in each
//! request's extensions as `Arc<ClientIdentity>`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{HeaderValue, Request, Response, header};
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::timeout::DeadlineBody;

use crate::config::{AdminSettings, HttpSettings};
use crate::metrics::Metrics;
use crate::net::{ACCEPT_BACKOFF, AcceptError, RateLimit, classify_accept_error};
use crate::tls::{ClientIdentity, MaybeTls};

/// How long keep-alive connections may stay open once draining began: long
/// enough for a busy one to get its next response (marked `Connection:
/// close`), short enough that idle pooled connections barely delay exit.
const IDLE_LINGER: Duration = Duration::from_millis(250);

/// How long a connection closed for a timeout may take to say goodbye
/// (GOAWAY) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The bounds one HTTP server enforces on its clients.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Which server, for logs and metrics (`gateway`, `admin`).
    pub server: &'static str,
    /// See `http.header_read_timeout`.
    pub header_read_timeout: Duration,
    /// See `http.body_read_timeout`; `None` where no route reads a body.
    pub body_read_timeout: Option<Duration>,
    /// See `http.idle_timeout`.
    pub idle_timeout: Duration,
    /// See `http.max_connections`.
    pub max_connections: usize,
    /// Connections closed because the cap was reached.
    pub rejected: IntCounter,
    /// Set when this server speaks TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl HttpLimits {
    /// The gateway's bounds, from `http.*`.
    pub fn gateway(settings: &HttpSettings, metrics: &Metrics) -> Self {
        Self {
            server: "gateway",
            header_read_timeout: settings.header_read_timeout,
            body_read_timeout: Some(settings.body_read_timeout),
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections,
            rejected: metrics.http_connections_rejected.with_label_values(&["gateway"]),
            tls: None,
        }
    }

    /// The admin port's bounds, from `admin.*`.
    pub fn admin(settings: &AdminSettings, metrics: &Metrics) -> Self {
        Self {
            server: "admin",
            header_read_timeout: settings.header_read_timeout,
            body_read_timeout: None,
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections,
            rejected: metrics.http_connections_rejected.with_label_values(&["admin"]),
            tls: None,
        }
    }

    /// The same bounds, serving TLS with `config` when there is one.
    pub fn with_tls(mut self, config: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = config;
        self
    }
}

/// Serves `router` until `stop` resolves, then drains as described above.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let draining = CancellationToken::new();
    // Fired after the linger: every connection is asked to close.
    let closing = CancellationToken::new();
    let open = Arc::new(OpenConnections::default());
    let marked = draining.clone();
    let router = router.layer(tower::util::MapResponseLayer::new(move |mut response: axum::response::Response| {
        if marked.is_cancelled() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The connection watchdog below bounds header reads instead.
    builder.http1().header_read_timeout(None);
    let builder = Arc::new(builder);
    let limits = Arc::new(limits);

    let mut stop = pin!(stop);
    let mut warned = RateLimit::default();
    let mut listener = Some(listener);
    // Once stopping: the same socket, accepted from with accept(2) directly.
    let mut backlog: Option<std::net::TcpListener> = None;
    loop {
        let accepted = if let Some(backlog) = &backlog {
            // Take what the kernel already holds before closing the socket,
            // which would reset those connections; they are served with
            // `Connection: close`. Not through tokio, whose accept answers
            // from cached readiness and could miss connections that arrived
            // since the last poll.
            match backlog.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream)).map(|s| (s, peer))
                }
                // WouldBlock: the backlog is empty.
                Err(_) => break,
            }
        } else if let Some(tcp) = &listener {
            let stopped = tokio::select! {
                () = &mut stop => None,
                accepted = tcp.accept() => Some(accepted),
            };
            match stopped {
                Some(accepted) => accepted,
                None => {
                    draining.cancel();
                    match listener.take().map(TcpListener::into_std) {
                        Some(Ok(std)) => backlog = Some(std),
                        _ => break,
                    }
                    continue;
                }
            }
        } else {
            break;
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if classify_accept_error(&error) == AcceptError::Skip => {
                tracing::debug!(server = limits.server, %error, "accepting an HTTP connection failed");
                continue;
            }
            Err(error) => {
                // Out of descriptors and the like: back off instead of
                // spinning on an error that will repeat.
                if warned.allow() {
                    tracing::warn!(server = limits.server, %error, "accepting an HTTP connection failed; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if open.count.load(Ordering::Acquire) >= limits.max_connections {
            // Closing at once (rather than leaving it in the backlog) tells
            // the client now, and costs nothing but the accept.
            limits.rejected.inc();
            if warned.allow() {
                tracing::warn!(
                    server = limits.server,
                    max_connections = limits.max_connections,
                    "connection cap reached; closing new connections"
                );
            }
            drop(stream);
            continue;
        }
        // Responses are small and latency-bound; Nagle only delays them.
        let _ = stream.set_nodelay(true);
        // Per connection, not per call; off unless the filter asks for it.
        tracing::debug!(server = limits.server, %peer, "connection accepted");
        let connection = Arc::new(ConnectionState::default());
        open.count.fetch_add(1, Ordering::AcqRel);
        let watched = WatchedStream { stream, connection: connection.clone(), _open: OpenGuard(open.clone()) };
        let router = router.clone();
        let builder = builder.clone();
        let limits = limits.clone();
        let closing = closing.clone();
        tokio::spawn(async move {
            let (io, client) = match &limits.tls {
                None => (MaybeTls::Plain(watched), None),
                // The handshake counts against the header timeout: it is
                // what a client must finish before its first request.
                Some(config) => match tokio::time::timeout(
                    limits.header_read_timeout,
                    tokio_rustls::TlsAcceptor::from(config.clone()).accept(watched),
                )
                .await
                {
                    Ok(Ok(tls)) => {
                        let client = ClientIdentity::of(&tls);
                        (MaybeTls::Tls(Box::new(tls)), client)
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(server = limits.server, %peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(server = limits.server, %peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            let io = TokioIo::new(io);
            let service = connection_service(router, peer, client, limits.body_read_timeout, connection.clone());
            let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
            let mut conn = pin!(conn);
            let watchdog = watchdog(&connection, limits.header_read_timeout, limits.idle_timeout);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = closing.cancelled() => {
                    // A request whose head has begun is let in (and answered
                    // with `Connection: close`) rather than cut off.
                    let quiet = connection.until(|c| !c.head_begun.load(Ordering::Acquire));
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = tokio::time::timeout(limits.header_read_timeout, quiet) => {}
                    }
                }
                () = watchdog => {
                    tracing::debug!(server = limits.server, %peer, "closing a connection that sent no request in time");
                }
            }
            conn.as_mut().graceful_shutdown();
            // A draining connection finishes its calls (the app bounds the
            // drain); one closed for a timeout has none, so a short grace.
            if closing.is_cancelled() {
                let _ = conn.await;
            } else {
                let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
            }
        });
    }

    // Draining: close the port, let busy connections get their last
    // response, then ask every connection to close and wait for them.
    drop(backlog);
    drop(listener);
    tokio::select! {
        () = tokio::time::sleep(IDLE_LINGER) => {}
        () = open.none() => {}
    }
    closing.cancel();
    open.none().await;
    Ok(())
}

/// The per-connection service: the router, with the peer address, the body
/// deadline, and the in-flight count the watchdog reads.
fn connection_service(
    router: Router,
    peer: SocketAddr,
    client: Option<Arc<ClientIdentity>>,
    body_read_timeout: Option<Duration>,
    connection: Arc<ConnectionState>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        let client = client.clone();
        let request_guard = connection.request_started();
        async move {
            let mut request = request.map(|body| match body_read_timeout {
                Some(timeout) => Body::new(DeadlineBody::new(timeout, body)),
                None => Body::new(body),
            });
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(client) = client {
                request.extensions_mut().insert(client);
            }
            let response = router.oneshot(request).await?;
            // The request counts as in flight until its response body is
            // done (or dropped), so streams are never idle-closed.
            Ok(response.map(|body| Body::new(GuardedBody { body, _guard: request_guard })))
        }
    })
}

/// Resolves when the connection should be closed: no request in flight
/// and no request head completed in time (see the module docs).
async fn watchdog(connection: &ConnectionState, header: Duration, idle: Duration) {
    let mut seen = 0;
    // The first request's head, from the accept.
    if tokio::time::timeout(header, connection.until(|c| c.requests() > seen)).await.is_err() {
        return;
    }
    loop {
        connection.until(|c| c.in_flight() == 0).await;
        seen = connection.requests();
        // Idle: wait for the next request's first byte (or the request).
        let begun = connection.until(|c| c.requests() > seen || c.head_begun.load(Ordering::Acquire));
        if tokio::time::timeout(idle, begun).await.is_err() {
            return;
        }
        // Its head must be complete within the header timeout.
        if tokio::time::timeout(header, connection.until(|c| c.requests() > seen)).await.is_err() {
            return;
        }
    }
}

/// What the watchdog knows of one connection.
#[derive(Default)]
struct ConnectionState {
    /// Requests whose responses are not finished.
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// A byte arrived while no request was in flight: a head has begun.
    head_begun: AtomicBool,
    changed: Notify,
}

impl ConnectionState {
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        // Its head is complete; a byte read once it is done begins the next.
        self.head_begun.store(false, Ordering::Release);
        self.changed.notify_waiters();
        RequestGuard(self.clone())
    }

    /// Waits until `done` holds; every change notifies.
    async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.changed.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            notified.await;
        }
    }
}

/// Counts its request out of flight when dropped.
struct RequestGuard(Arc<ConnectionState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's guard until it ends.
    struct GuardedBody {
        #[pin]
        body: Body,
        _guard: RequestGuard,
    }
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts open connections and says when there are none.
#[derive(Default)]
struct OpenConnections {
    count: AtomicUsize,
    changed: Notify,
}

impl OpenConnections {
    async fn none(&self) {
        loop {
            let notified = self.changed.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts its connection out when dropped.
struct OpenGuard(Arc<OpenConnections>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A connection that tells the watchdog when a request head begins.
struct WatchedStream {
    stream: TcpStream,
    connection: Arc<ConnectionState>,
    _open: OpenGuard,
}

impl AsyncRead for WatchedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && this.connection.in_flight() == 0
            && !this.connection.head_begun.swap(true, Ordering::AcqRel)
        {
            this.connection.changed.notify_waiters();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
