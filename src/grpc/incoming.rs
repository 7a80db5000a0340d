//! Where the gRPC server's connections come from: the TCP listener, which
//! stops accepting (and releases the port) as soon as draining begins, while
//! the connections already open finish their calls.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;

/// The server's stream of connections. Accepting stops when `close`
/// resolves (and the waker the close future registered wakes us).
pub struct Incoming {
    tcp: Option<TcpListener>,
    close: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, close: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { tcp: Some(listener), close: Box::pin(close) }
    }
}

impl Stream for Incoming {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.tcp.is_some() && self.close.as_mut().poll(cx).is_ready() {
            self.tcp = None;
        }
        // After closing, stay pending: the server's own stop signal, not the
        // end of this stream, starts its graceful shutdown.
        let Some(listener) = &self.tcp else { return Poll::Pending };
        listener.poll_accept(cx).map(|accepted| {
            Some(accepted.map(|(stream, _)| {
                // Small unary frames must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                stream
            }))
        })
    }
}
