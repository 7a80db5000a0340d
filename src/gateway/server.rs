//! Serving the gateway, and draining it without losing requests.
//!
//! When draining begins the listener closes at once, and every response
//! after that carries `Connection: close`, so a busy HTTP/1.1 keep-alive
//! connection ends right after its current response instead of being cut
//! while the client writes its next request. Connections that stay idle
//! are closed after a short linger; HTTP/2 connections get GOAWAY.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use axum::serve::{Listener, ListenerExt};
use http::{HeaderValue, header};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::util::MapResponseLayer;

/// How long keep-alive connections may stay open once draining began: long
/// enough for a busy one to get its next response (marked `Connection:
/// close`), short enough that idle pooled connections barely delay exit.
const IDLE_LINGER: Duration = Duration::from_millis(250);

/// Serves `router` until `stop` resolves, then drains as described above.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let draining = CancellationToken::new();
    let open = Arc::new(OpenConnections::default());
    let listener = DrainingListener { listener: Some(listener), draining: draining.clone(), open: open.clone() }
        .tap_io(|tcp: &mut CountedStream| {
            // Responses are small and latency-bound; Nagle only delays them.
            let _ = tcp.stream.set_nodelay(true);
        });
    let closing = draining.clone();
    let router = router.layer(MapResponseLayer::new(move |mut response: Response| {
        if closing.is_cancelled() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }));
    let graceful = async move {
        stop.await;
        draining.cancel();
        tokio::select! {
            () = tokio::time::sleep(IDLE_LINGER) => {}
            () = open.none() => {}
        }
    };
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(graceful)
        .await
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
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Accepts until draining begins, then drops the socket so the port closes.
struct DrainingListener {
    listener: Option<TcpListener>,
    draining: CancellationToken,
    open: Arc<OpenConnections>,
}

impl Listener for DrainingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(listener) = &self.listener else { return std::future::pending().await };
            tokio::select! {
                () = self.draining.cancelled() => self.listener = None,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        self.open.count.fetch_add(1, Ordering::AcqRel);
                        return (CountedStream { stream, open: self.open.clone() }, addr);
                    }
                    Err(error) => {
                        // Out of descriptors and the like: back off instead of
                        // spinning, as axum's own listener does.
                        tracing::warn!(%error, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "the listener is closed")),
        }
    }
}

/// A connection that counts itself out when dropped.
struct CountedStream {
    stream: TcpStream,
    open: Arc<OpenConnections>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.open.count.fetch_sub(1, Ordering::AcqRel);
        self.open.changed.notify_waiters();
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
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
