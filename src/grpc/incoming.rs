//! Where the gRPC server's connections come from: the TCP listener, which
//! stops accepting (and releases the port) as soon as draining begins, while
//! the connections already open finish their calls.
//!
//! An accept that fails for lack of resources (out of descriptors, socket
//! buffers or memory) is not handed to tonic, which would poll again at
//! once and spin a core on an error that repeats until something closes.
//! The stream stays pending for [`ACCEPT_BACKOFF`] instead, as the HTTP
//! listener does, and warns at most once per interval.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;

use crate::net::{ACCEPT_BACKOFF, AcceptError, RateLimit, classify_accept_error};

/// The server's stream of connections. Accepting stops when `close`
/// resolves (and the waker the close future registered wakes us).
pub struct Incoming {
    tcp: Option<TcpListener>,
    close: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Set while backing off after a resource error.
    backoff: Option<Pin<Box<Sleep>>>,
    /// Limits the warnings about failed accepts.
    warned: RateLimit,
}

impl Incoming {
    pub fn new(listener: TcpListener, close: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { tcp: Some(listener), close: Box::pin(close), backoff: None, warned: RateLimit::default() }
    }
}

impl Stream for Incoming {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.tcp.is_some() && this.close.as_mut().poll(cx).is_ready() {
            this.tcp = None;
        }
        // After closing, stay pending: the server's own stop signal, not the
        // end of this stream, starts its graceful shutdown.
        let Some(listener) = &this.tcp else { return Poll::Pending };
        if let Some(backoff) = &mut this.backoff {
            if backoff.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.backoff = None;
        }
        loop {
            return match listener.poll_accept(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok((stream, _))) => {
                    // Small unary frames must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    Poll::Ready(Some(Ok(stream)))
                }
                Poll::Ready(Err(error)) => match classify_accept_error(&error) {
                    AcceptError::Skip => Poll::Ready(Some(Err(error))),
                    AcceptError::BackOff => {
                        if this.warned.allow() {
                            tracing::warn!(%error, backoff_ms = ACCEPT_BACKOFF.as_millis() as u64, "accepting a gRPC connection failed; backing off");
                        }
                        let mut sleep = Box::pin(tokio::time::sleep_until((Instant::now() + ACCEPT_BACKOFF).into()));
                        // Registers the waker, so the stream wakes when the
                        // backoff ends.
                        if sleep.as_mut().poll(cx).is_ready() {
                            continue;
                        }
                        this.backoff = Some(sleep);
                        Poll::Pending
                    }
                },
            };
        }
    }
}
