//! Where the gRPC server's connections come from: the TCP listener, and
//! in-process connections from the HTTP gateway.
//!
//! The gateway talks to the gRPC server over an in-memory pipe rather than
//! loopback TCP: every call still passes through the whole server stack
//! (auth, metrics, logging), without the syscalls. It also lets shutdown
//! close the TCP listener while the gateway's connection stays usable until
//! the gateway has drained.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes buffered in each direction of an in-process connection.
const PIPE_CAPACITY: usize = 256 * 1024;

/// One accepted connection.
pub enum ServerIo {
    Tcp(TcpStream),
    Local(DuplexStream),
}

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Self::Tcp(stream) => stream.connect_info(),
            Self::Local(_) => TcpConnectInfo { local_addr: None, remote_addr: None },
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Local(s) => s.is_write_vectored(),
        }
    }
}

/// The server's stream of connections. TCP accepting stops (and the port is
/// released) when `close_tcp` resolves; in-process connections are accepted
/// until every [`LocalConnector`] is gone.
pub struct Incoming {
    tcp: Option<TcpListener>,
    close_tcp: Pin<Box<dyn Future<Output = ()> + Send>>,
    local: mpsc::UnboundedReceiver<DuplexStream>,
}

impl Incoming {
    pub fn new(listener: TcpListener, close_tcp: impl Future<Output = ()> + Send + 'static) -> (Self, LocalConnector) {
        let (tx, local) = mpsc::unbounded_channel();
        (Self { tcp: Some(listener), close_tcp: Box::pin(close_tcp), local }, LocalConnector { tx })
    }
}

impl Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.tcp.is_some() && self.close_tcp.as_mut().poll(cx).is_ready() {
            self.tcp = None;
        }
        if let Some(listener) = &self.tcp
            && let Poll::Ready(accepted) = listener.poll_accept(cx)
        {
            return Poll::Ready(Some(accepted.map(|(stream, _)| {
                // Small unary frames must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                ServerIo::Tcp(stream)
            })));
        }
        match self.local.poll_recv(cx) {
            Poll::Ready(Some(pipe)) => Poll::Ready(Some(Ok(ServerIo::Local(pipe)))),
            Poll::Ready(None) if self.tcp.is_none() => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// Opens in-process connections to the gRPC server, for a tonic `Channel`.
#[derive(Clone, Debug)]
pub struct LocalConnector {
    tx: mpsc::UnboundedSender<DuplexStream>,
}

impl tower::Service<http::Uri> for LocalConnector {
    type Response = TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (client, server) = tokio::io::duplex(PIPE_CAPACITY);
        std::future::ready(
            self.tx
                .send(server)
                .map(|()| TokioIo::new(client))
                .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "the gRPC server has stopped")),
        )
    }
}
