//! Shutdown coordination: one cloneable [`Shutdown`] handle that every server,
//! stream and background task listens to, and the signals that trigger it
//! (plus SIGHUP, which `main` answers by restoring the configured log level).
//!
//! Shutdown has two phases after the readiness flip and the drain delay
//! (sequenced by `app`):
//! 1. *draining*: listeners stop accepting, unary calls finish, endless
//!    streams end with UNAVAILABLE, finite streams finish if they can;
//! 2. *aborted*: the drain bound (`shutdown.timeout`) has passed and whatever
//!    is still running is cancelled.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process-wide shutdown handle. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Cancelled when shutdown is asked for: readiness fails from then on.
    requested: CancellationToken,
    /// Cancelled when the listeners close: endless work should wind down.
    draining: CancellationToken,
    /// Cancelled when the drain bound has passed: all work must stop now.
    aborted: CancellationToken,
    /// Owns every task spawned on behalf of a request, so shutdown can wait
    /// for them and no task outlives the process' orderly exit.
    tracker: TaskTracker,
    /// How far shutdown has got ([`PHASE_REQUESTED`] and on), for the
    /// checks every stream makes per message: reading a cancellation
    /// token's state takes its mutex, one shared by every stream.
    phase: Arc<AtomicU8>,
}

const PHASE_REQUESTED: u8 = 1;
const PHASE_DRAINING: u8 = 2;
const PHASE_ABORTED: u8 = 3;

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves once draining has begun (also after an abort).
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Resolves once the drain bound has passed.
    pub async fn aborted(&self) {
        self.aborted.cancelled().await;
    }

    /// True once draining has begun (also after an abort).
    pub fn is_draining(&self) -> bool {
        self.phase.load(Ordering::Acquire) >= PHASE_DRAINING
    }

    /// True once the drain bound has passed.
    pub fn is_aborted(&self) -> bool {
        self.phase.load(Ordering::Acquire) >= PHASE_ABORTED
    }

    /// True from the moment shutdown was asked for.
    pub fn is_requested(&self) -> bool {
        self.phase.load(Ordering::Acquire) >= PHASE_REQUESTED
    }

    /// Moves the phase on (never back), before the tokens wake anyone.
    fn advance(&self, phase: u8) {
        self.phase.fetch_max(phase, Ordering::AcqRel);
    }

    /// Spawns request-scoped work that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Number of tracked tasks still running.
    pub fn tasks_running(&self) -> usize {
        self.tracker.len()
    }

    pub(crate) fn request(&self) {
        self.advance(PHASE_REQUESTED);
        self.requested.cancel();
    }

    pub(crate) fn begin_draining(&self) {
        self.advance(PHASE_DRAINING);
        self.requested.cancel();
        self.draining.cancel();
    }

    pub(crate) fn abort(&self) {
        self.advance(PHASE_ABORTED);
        self.requested.cancel();
        self.draining.cancel();
        self.aborted.cancel();
    }

    /// Waits for every tracked task; new ones may no longer be expected.
    pub(crate) async fn wait_for_tasks(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The signals keel reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: Kubernetes asking for a graceful stop.
    Terminate,
    /// SIGINT: Ctrl-C; treated like SIGTERM.
    Interrupt,
    /// SIGQUIT: stop now, without draining.
    Quit,
    /// SIGHUP: reread the configuration's log level; no shutdown.
    Hangup,
}

impl Signal {
    /// The conventional exit code of a process ended by this signal.
    pub fn exit_code(self) -> u8 {
        128 + match self {
            Self::Interrupt => 2,
            Self::Quit => 3,
            Self::Terminate => 15,
            Self::Hangup => 1,
        }
    }
}

/// Delivers process signals as a stream of [`Signal`]s.
pub struct SignalListener {
    signals: signal_hook_tokio::Signals,
}

impl SignalListener {
    /// Registers the handlers. Until then the default actions apply, so call
    /// this before the listeners are bound.
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
        Ok(Self { signals: signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP])? })
    }

    /// The next signal; `None` once the listener is closed.
    pub async fn recv(&mut self) -> Option<Signal> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
        use tokio_stream::StreamExt;
        loop {
            match self.signals.next().await? {
                SIGTERM => return Some(Signal::Terminate),
                SIGINT => return Some(Signal::Interrupt),
                SIGQUIT => return Some(Signal::Quit),
                SIGHUP => return Some(Signal::Hangup),
                _ => continue,
            }
        }
    }
}
