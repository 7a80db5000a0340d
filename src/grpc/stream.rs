//! Server-streaming plumbing shared by every streaming RPC.
//!
//! Each stream gets one producer task, owned by the shutdown tracker, that
//! feeds a bounded channel. The bound is the backpressure: a slow client
//! stalls its producer instead of growing a buffer. The producer checks on
//! every message whether the client is gone, the deadline has passed or
//! shutdown wants it to stop, and ends with a clean status when it must.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::Status;
use tracing::Instrument;

use crate::grpc::middleware::recover::{CatchUnwind, panic_status};
use crate::shutdown::Shutdown;

/// Whether a stream ends by itself or only when something stops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Ends by itself (a listing): it may finish while the server drains, and
    /// is cut off only when the drain bound passes.
    Finite,
    /// Never ends by itself (a watch): told to finish as soon as draining
    /// begins, so clients reconnect to another replica.
    Endless,
}

/// Why a producer has to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    ClientGone,
    DeadlineExceeded,
    ShuttingDown,
}

impl From<StreamEnd> for Status {
    fn from(end: StreamEnd) -> Self {
        match end {
            // Nobody is left to read it; the status only ends the producer.
            StreamEnd::ClientGone => Status::cancelled("client cancelled the stream"),
            StreamEnd::DeadlineExceeded => Status::deadline_exceeded("deadline exceeded"),
            StreamEnd::ShuttingDown => Status::unavailable("server shutting down"),
        }
    }
}

/// Counts producers that are still running (`keel_grpc_live_streams`). A
/// stream whose client went away must drop out of this count promptly.
#[derive(Clone, Debug)]
pub struct LiveStreams(IntGauge);

impl LiveStreams {
    pub fn new(gauge: IntGauge) -> Self {
        Self(gauge)
    }

    pub fn get(&self) -> usize {
        usize::try_from(self.0.get()).unwrap_or(0)
    }

    fn enter(&self) -> LiveGuard {
        self.0.inc();
        LiveGuard(self.0.clone())
    }
}

struct LiveGuard(IntGauge);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Starts producer tasks for streaming responses.
#[derive(Clone, Debug)]
pub struct StreamSpawner {
    shutdown: Shutdown,
    buffer: usize,
    live: LiveStreams,
}

impl StreamSpawner {
    pub fn new(shutdown: Shutdown, buffer: usize, live: LiveStreams) -> Self {
        Self { shutdown, buffer: buffer.max(1), live }
    }

    /// Runs `produce` in a tracked task and returns the response stream it
    /// feeds. An `Err` from the producer becomes the stream's final status,
    /// delivered after the messages already queued.
    pub fn spawn<T, F, Fut>(&self, kind: StreamKind, deadline: Option<Instant>, produce: F) -> ResponseStream<T>
    where
        T: Send + 'static,
        F: FnOnce(StreamSink<T>) -> Fut,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(self.buffer);
        let (status_tx, status_rx) = oneshot::channel();
        let sink = StreamSink {
            tx,
            deadline,
            kind,
            shutdown: self.shutdown.clone(),
            stop: Mutex::new(Stop::Idle),
            _live: self.live.enter(),
        };
        let producer = CatchUnwind::new(produce(sink));
        let task = async move {
            // The sink, and with it the sender, is gone once the producer
            // returns, so the reader sees the queued messages, then this.
            let status = match producer.await {
                Ok(Ok(())) => return,
                Ok(Err(status)) => status,
                Err(panic) => {
                    tracing::error!(%panic, "stream producer panicked");
                    panic_status()
                }
            };
            let _ = status_tx.send(status);
        };
        // The producer logs as part of the call (its span, or its `Caller`),
        // request id included.
        let task = crate::grpc::middleware::request_id::in_current_call(task);
        self.shutdown.spawn(task.instrument(tracing::Span::current()));
        ResponseStream { messages: rx, status: Some(status_rx) }
    }
}

/// The producer's end of a stream.
pub struct StreamSink<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    deadline: Option<Instant>,
    kind: StreamKind,
    shutdown: Shutdown,
    /// The wait for the deadline or shutdown, made the first time the
    /// producer has to wait and kept for the stream's life: remaking it
    /// for every wait armed a timer and registered with the shutdown
    /// tokens each time, for every message once the client fell behind.
    /// A mutex because the sink is shared by reference; only its producer
    /// ever locks it.
    stop: Mutex<Stop>,
    _live: LiveGuard,
}

/// The stream's wait for a reason to stop outside itself.
enum Stop {
    Idle,
    Waiting(Pin<Box<dyn Future<Output = StreamEnd> + Send>>),
    Ended(StreamEnd),
}

/// A reserved slot in the stream's buffer.
pub type Slot<'a, T> = mpsc::Permit<'a, Result<T, Status>>;

impl<T: Send> StreamSink<T> {
    /// Resolves when the producer must stop for a reason outside itself.
    pub async fn stopped(&self) -> StreamEnd {
        let mut closed = std::pin::pin!(self.tx.closed());
        std::future::poll_fn(|cx| {
            if closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(StreamEnd::ClientGone);
            }
            self.poll_stop(cx)
        })
        .await
    }

    /// Polls the stream's lasting wait for its deadline or shutdown.
    fn poll_stop(&self, cx: &mut Context<'_>) -> Poll<StreamEnd> {
        let mut stop = self.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if matches!(*stop, Stop::Idle) {
            let (deadline, kind, shutdown) = (self.deadline, self.kind, self.shutdown.clone());
            *stop = Stop::Waiting(Box::pin(async move {
                let deadline = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let drain = async {
                    match kind {
                        StreamKind::Endless => shutdown.draining().await,
                        StreamKind::Finite => shutdown.aborted().await,
                    }
                };
                tokio::select! {
                    _ = deadline => StreamEnd::DeadlineExceeded,
                    _ = drain => StreamEnd::ShuttingDown,
                }
            }));
        }
        let ended = match &mut *stop {
            Stop::Idle => return Poll::Pending,
            Stop::Waiting(wait) => ready!(wait.as_mut().poll(cx)),
            Stop::Ended(end) => return Poll::Ready(*end),
        };
        // A finished wait may not be polled again: its answer is kept.
        *stop = Stop::Ended(ended);
        Poll::Ready(ended)
    }

    /// The reason to stop that holds right now, if any: the same checks as
    /// [`Self::stopped`], without registering a waiter anywhere.
    fn stop_now(&self) -> Option<StreamEnd> {
        if self.tx.is_closed() {
            return Some(StreamEnd::ClientGone);
        }
        if self.deadline.is_some_and(|at| Instant::now() >= at) {
            return Some(StreamEnd::DeadlineExceeded);
        }
        let stopping = match self.kind {
            StreamKind::Endless => self.shutdown.is_draining(),
            StreamKind::Finite => self.shutdown.is_aborted(),
        };
        stopping.then_some(StreamEnd::ShuttingDown)
    }

    /// Waits for buffer space, or for a reason to stop.
    pub async fn reserve(&self) -> Result<Slot<'_, T>, StreamEnd> {
        // The fast path, for a client that keeps up: free space and no
        // reason to stop take a few atomic loads and a clock read. Waiting
        // in `stopped` instead would arm a timer and register with two
        // cancellation tokens (a mutex each) for every message, only to
        // undo it at once: that cost more than encoding the message.
        if let Some(end) = self.stop_now() {
            return Err(end);
        }
        match self.tx.try_reserve() {
            Ok(slot) => return Ok(slot),
            Err(mpsc::error::TrySendError::Closed(())) => return Err(StreamEnd::ClientGone),
            Err(mpsc::error::TrySendError::Full(())) => {}
        }
        // The channel's reserve fails once the client is gone; the lasting
        // wait covers the deadline and shutdown, and is checked first.
        let mut reserve = std::pin::pin!(self.tx.reserve());
        std::future::poll_fn(|cx| {
            if let Poll::Ready(end) = self.poll_stop(cx) {
                return Poll::Ready(Err(end));
            }
            reserve.as_mut().poll(cx).map(|slot| slot.map_err(|_| StreamEnd::ClientGone))
        })
        .await
    }

    /// Sends one message, waiting while the client is slow.
    pub async fn send(&self, message: T) -> Result<(), StreamEnd> {
        self.reserve().await?.send(Ok(message));
        Ok(())
    }
}

/// The response side handed to tonic: queued messages, then the final status.
pub struct ResponseStream<T> {
    messages: mpsc::Receiver<Result<T, Status>>,
    status: Option<oneshot::Receiver<Status>>,
}

impl<T> Stream for ResponseStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(item) = ready!(self.messages.poll_recv(cx)) {
            return Poll::Ready(Some(item));
        }
        let Some(status) = self.status.as_mut() else {
            return Poll::Ready(None);
        };
        let outcome = ready!(Pin::new(status).poll(cx));
        self.status = None;
        Poll::Ready(outcome.ok().map(Err))
    }
}
