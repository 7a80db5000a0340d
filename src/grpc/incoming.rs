//! Where the gRPC server's connections come from: the TCP listener, which
//! stops accepting (and releases the port) as soon as draining begins, while
//! the connections already open finish their calls.
//!
//! An accept that fails for lack of resources (out of descriptors, socket
//! buffers or memory) is not handed to tonic, which would poll again at
//! once and spin a core on an error that repeats until something closes.
//! The stream stays pending for [`ACCEPT_BACKOFF`] instead, as the HTTP
//! listener does, and warns at most once per interval.
//!
//! With TLS, each accepted connection's handshake runs in its own task
//! (bounded by [`HANDSHAKE_TIMEOUT`]), so a slow or silent client never
//! holds up the accepts; finished handshakes are handed to tonic with the
//! client's verified identity, which tonic puts in every request's
//! extensions as [`GrpcConnectInfo`].
//!
//! Every accepted connection gets the kernel's TCP keepalive
//! ([`TcpKeepalive`], `grpc.tcp_keepalive*`): dead-peer detection that
//! costs nothing per call, where HTTP/2 PINGs cost hyper bookkeeping on
//! every frame.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;

use crate::net::{ACCEPT_BACKOFF, AcceptError, RateLimit, classify_accept_error};
use crate::tls::{ClientIdentity, MaybeTls};

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes finished but not yet taken by the server.
const HANDSHAKE_QUEUE: usize = 64;

/// Handshakes in progress at once; connections beyond are closed at accept,
/// so clients that open connections and never finish a handshake cannot
/// pile up tasks.
const MAX_HANDSHAKES: usize = 1024;

/// The kernel's keepalive for accepted connections, from
/// `grpc.tcp_keepalive`, `grpc.tcp_keepalive_interval` and
/// `grpc.tcp_keepalive_probes` (validated by the config to the kernel's
/// bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes that drop the connection.
    pub probes: u32,
}

impl TcpKeepalive {
    /// The keepalive `settings` ask for; `None` when `grpc.tcp_keepalive`
    /// is `0s`.
    pub fn of(settings: &crate::config::GrpcSettings) -> Option<Self> {
        (!settings.tcp_keepalive.is_zero()).then_some(Self {
            idle: settings.tcp_keepalive,
            interval: settings.tcp_keepalive_interval,
            probes: settings.tcp_keepalive_probes,
        })
    }

    /// How long a peer may stay silent before its connection is dropped.
    /// Also the connection's `TCP_USER_TIMEOUT`: keepalive probes only go
    /// out while nothing is in flight, so without it data sent to a
    /// vanished peer would be retransmitted for about 15 minutes.
    pub fn give_up_after(&self) -> Duration {
        self.idle + self.interval * self.probes
    }

    /// Turns keepalive on for `stream`.
    pub fn apply(&self, stream: &TcpStream) -> io::Result<()> {
        let socket = socket2::SockRef::from(stream);
        let params =
            socket2::TcpKeepalive::new().with_time(self.idle).with_interval(self.interval).with_retries(self.probes);
        socket.set_tcp_keepalive(&params)?;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        socket.set_tcp_user_timeout(Some(self.give_up_after()))?;
        Ok(())
    }
}

/// What tonic leaves in each request's extensions about its connection.
#[derive(Debug, Clone, Default)]
pub struct GrpcConnectInfo {
    /// The TCP peer.
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate's identity (mTLS only).
    pub client: Option<Arc<ClientIdentity>>,
    /// When a response on this connection next sends its `x-request-id`
    /// indexable (see [`EchoName`]).
    pub echo_name: EchoName,
}

/// When this connection's next response sends its `x-request-id`
/// indexable. Request ids are unique, so ids are sent never-indexed (see
/// `request_id`); but with no entry of that name in the connection's HPACK
/// table, each also spells out the 12-byte name, Huffman coded: a quarter
/// of the header's encoding. An indexed id now and then gives the name a
/// table entry, and the ids in between refer to it by index: 9 bytes fewer
/// per response, less to encode here and to decode on the client.
///
/// Now and then, not once: the table evicts its oldest entries as new
/// ones come (hyper's `date` adds one a second, so a 4 KiB table forgets
/// an entry after about a minute), and a never-indexed id never puts the
/// name back. Not often: every indexed id stays in the table until it is
/// evicted, and each later id is compared against all of them.
#[derive(Debug, Clone, Default)]
pub struct EchoName(Arc<AtomicU64>);

/// Seconds between indexable ids on one connection: about half the time a
/// default table keeps an entry, so the name is nearly always there and
/// at most three ids of a connection are in its table.
const ECHO_NAME_PERIOD_SECS: u64 = 30;

impl EchoName {
    /// Whether the call that started at `at` sends the indexable id: true
    /// for a connection's first call, then at most once per period.
    pub fn claim(&self, at: Instant) -> bool {
        static BASE: OnceLock<Instant> = OnceLock::new();
        // Seconds since the first call of the process, plus one, so that 0
        // (a fresh connection's value) is always due.
        let now = at.saturating_duration_since(*BASE.get_or_init(|| at)).as_secs() + 1;
        self.claim_at(now)
    }

    fn claim_at(&self, now: u64) -> bool {
        let due = self.0.load(Ordering::Relaxed);
        now >= due
            && self.0.compare_exchange(due, now + ECHO_NAME_PERIOD_SECS, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// One accepted connection, plaintext or TLS.
pub struct ServerIo {
    io: MaybeTls<TcpStream>,
    info: GrpcConnectInfo,
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = GrpcConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The TLS side: the acceptor, and the queue finished handshakes arrive on.
struct Handshakes {
    acceptor: TlsAcceptor,
    /// Bounds the handshakes in progress ([`MAX_HANDSHAKES`]).
    slots: Arc<tokio::sync::Semaphore>,
    done_tx: mpsc::Sender<ServerIo>,
    done_rx: mpsc::Receiver<ServerIo>,
}

/// The server's stream of connections. Accepting stops when `close`
/// resolves (and the waker the close future registered wakes us).
pub struct Incoming {
    tcp: Option<TcpListener>,
    close: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Set while backing off after a resource error.
    backoff: Option<Pin<Box<Sleep>>>,
    /// Limits the warnings about failed accepts.
    warned: RateLimit,
    /// Set when the listener speaks TLS.
    tls: Option<Handshakes>,
    /// The keepalive every accepted connection gets.
    keepalive: Option<TcpKeepalive>,
}

impl Incoming {
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        keepalive: Option<TcpKeepalive>,
        close: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let tls = tls.map(|config| {
            let (done_tx, done_rx) = mpsc::channel(HANDSHAKE_QUEUE);
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
            Handshakes { acceptor: TlsAcceptor::from(config), slots, done_tx, done_rx }
        });
        Self {
            tcp: Some(listener),
            close: Box::pin(close),
            backoff: None,
            warned: RateLimit::default(),
            tls,
            keepalive,
        }
    }
}

/// Completes one TLS handshake and queues the connection.
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    done: mpsc::Sender<ServerIo>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let client = ClientIdentity::of(&tls);
            let info = GrpcConnectInfo { remote_addr: Some(peer), client, echo_name: EchoName::default() };
            let _ = done.send(ServerIo { io: MaybeTls::Tls(Box::new(tls)), info }).await;
        }
        // A client's failure (no certificate, an untrusted CA, plaintext
        // sent to a TLS port): theirs to see, not a server problem.
        Ok(Err(error)) => tracing::debug!(%peer, %error, "gRPC TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
    }
}

impl Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.tcp.is_some() && this.close.as_mut().poll(cx).is_ready() {
            this.tcp = None;
        }
        // After closing, stay pending: the server's own stop signal, not the
        // end of this stream, starts its graceful shutdown.
        let Some(listener) = &this.tcp else { return Poll::Pending };
        if let Some(tls) = &mut this.tls
            && let Poll::Ready(Some(io)) = tls.done_rx.poll_recv(cx)
        {
            return Poll::Ready(Some(Ok(io)));
        }
        if let Some(backoff) = &mut this.backoff {
            if backoff.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.backoff = None;
        }
        loop {
            return match listener.poll_accept(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok((stream, peer))) => {
                    // Small unary frames must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    // A failure leaves the connection as the kernel made it
                    // (the values were checked at start, so only a socket
                    // that already died can refuse them).
                    if let Some(keepalive) = &this.keepalive
                        && let Err(error) = keepalive.apply(&stream)
                    {
                        tracing::debug!(%peer, %error, "setting TCP keepalive failed");
                    }
                    if let Some(tls) = &this.tls {
                        match tls.slots.clone().try_acquire_owned() {
                            Ok(slot) => {
                                tokio::spawn(handshake(tls.acceptor.clone(), stream, peer, tls.done_tx.clone(), slot));
                            }
                            Err(_) => {
                                if this.warned.allow() {
                                    tracing::warn!(
                                        max = MAX_HANDSHAKES,
                                        "too many TLS handshakes in progress; closing new gRPC connections"
                                    );
                                }
                            }
                        }
                        continue;
                    }
                    let info =
                        GrpcConnectInfo { remote_addr: Some(peer), client: None, echo_name: EchoName::default() };
                    Poll::Ready(Some(Ok(ServerIo { io: MaybeTls::Plain(stream), info })))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_sends_an_indexable_id_first_then_once_per_period() {
        let name = EchoName::default();
        assert!(name.claim_at(1), "a fresh connection's first call");
        assert!(!name.claim_at(1));
        assert!(!name.claim_at(ECHO_NAME_PERIOD_SECS));
        assert!(name.claim_at(1 + ECHO_NAME_PERIOD_SECS), "due again after the period");
        assert!(!name.claim_at(1 + ECHO_NAME_PERIOD_SECS));
        // Connections keep their own schedules; clones (one per request)
        // share their connection's.
        let other = EchoName::default();
        assert!(other.claim_at(5));
        assert!(!other.clone().claim_at(6));
        // Through the clock: the first call of a process is due too.
        let timed = EchoName::default();
        assert!(timed.claim(Instant::now()));
        assert!(!timed.claim(Instant::now()));
    }

    /// Every option lands on a real socket as the kernel reads it back.
    #[tokio::test]
    async fn keepalive_options_reach_the_socket() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let keepalive = TcpKeepalive { idle: Duration::from_secs(45), interval: Duration::from_secs(7), probes: 4 };
        keepalive.apply(&server)?;
        let socket = socket2::SockRef::from(&server);
        assert!(socket.keepalive()?);
        assert_eq!(socket.tcp_keepalive_time()?, Duration::from_secs(45));
        assert_eq!(socket.tcp_keepalive_interval()?, Duration::from_secs(7));
        assert_eq!(socket.tcp_keepalive_retries()?, 4);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(socket.tcp_user_timeout()?, Some(Duration::from_secs(45 + 7 * 4)));
        assert_eq!(keepalive.give_up_after(), Duration::from_secs(73));
        drop(client);
        Ok(())
    }
}
