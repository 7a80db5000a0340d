//! The log writer: every line (access lines and tracing's events) is
//! appended to one bounded in-memory buffer, and one thread writes the
//! buffer out in batches. A caller never waits on stdout: when the buffer
//! is full, new lines are dropped and counted. Every line that got into the
//! buffer is written before a clean exit ([`SinkGuard`]).
//!
//! Written here instead of using tracing-appender's non-blocking writer,
//! which sends every line as its own heap buffer through a channel, and
//! whose thread writes and flushes whenever the channel is momentarily
//! empty. At 100k calls a second that is nearly one allocation freed on
//! another thread, one thread wake-up and one `write` per line; in the
//! gRPC benchmark it cost about as much CPU as all of keel's layers
//! together. Here a line costs a lock and a copy; the writer wakes at most
//! once per [`LATENCY`] or per [`BATCH`] bytes, whichever comes first.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes the buffer holds before new lines are dropped: about 13,000
/// access lines, several seconds of a stalled stdout at full load. The
/// batch being written is apart, so a stalled writer holds at most twice
/// this.
pub const CAPACITY: usize = 4 << 20;
/// Queued bytes that wake the writer at once.
pub const BATCH: usize = 64 << 10;
/// The capacity each of the two buffers (the queue and the batch being
/// written) keeps: room for the line that fills a batch and for what
/// arrives while the writer wakes up. With the queue sized at exactly a
/// batch, the line that took it past a batch (the one that wakes the
/// writer) grew it: a 128 KiB allocation and a 64 KiB copy under the
/// lock, once per batch.
const ROOM: usize = 2 * BATCH;
/// The longest a line waits in the buffer before it is written.
pub const LATENCY: Duration = Duration::from_millis(20);
/// How long [`SinkGuard`]'s drop waits for the last write.
const FLUSH_BOUND: Duration = Duration::from_secs(1);

struct State {
    /// Whole lines, in the order they were written.
    queued: Vec<u8>,
    /// The writer is blocked on the condition variable (so a notify is
    /// worth its syscall).
    writer_waiting: bool,
    /// No more batches: write what is queued and stop.
    closing: bool,
    /// The writer has written everything and stopped.
    finished: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer; also tells the closing side the writer finished.
    wake: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while appending bytes; the buffer
        // holds whole lines up to that point, so carry on with it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The writing end, cheap to clone. Also a `MakeWriter` for tracing's
/// formatter, which hands over each event as one whole line.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it wrote every queued line
/// (bounded by a second, so a stuck stdout cannot hold the exit).
pub struct SinkGuard {
    shared: Arc<Shared>,
}

impl LogSink {
    /// Starts the writer thread over `out`.
    pub fn start<W: Write + Send + 'static>(out: W) -> std::io::Result<(Self, SinkGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queued: Vec::with_capacity(ROOM),
                writer_waiting: false,
                closing: false,
                finished: false,
            }),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let writer = shared.clone();
        std::thread::Builder::new().name("keel-log-writer".into()).spawn(move || write_batches(&writer, out))?;
        Ok((Self { shared: shared.clone() }, SinkGuard { shared }))
    }

    /// Queues one whole line (ending in `\n`). Returns false when it was
    /// dropped: the buffer is full, or the writer has stopped.
    pub fn write_line(&self, line: &[u8]) -> bool {
        let mut state = self.shared.lock();
        if state.closing || state.queued.len() + line.len() > CAPACITY {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let was_empty = state.queued.is_empty();
        state.queued.extend_from_slice(line);
        // The writer waits for the first line, then for a full batch.
        let wake = state.writer_waiting && (was_empty || state.queued.len() >= BATCH);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        true
    }

    /// Lines dropped since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: sleeps until a line arrives, gives the buffer up to
/// [`LATENCY`] to fill a batch, then writes it all with one call.
fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(ROOM);
    loop {
        let closing = {
            let mut state = shared.lock();
            while state.queued.is_empty() && !state.closing {
                state = wait(shared, state, None);
            }
            let deadline = Instant::now() + LATENCY;
            while state.queued.len() < BATCH && !state.closing {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = wait(shared, state, Some(deadline - now));
            }
            std::mem::swap(&mut state.queued, &mut batch);
            state.closing
        };
        // A failed write (stdout closed) loses this batch; there is nowhere
        // left to report it.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        // Keep the usual room, not a burst's.
        batch.clear();
        batch.shrink_to(ROOM);
        if closing {
            shared.lock().finished = true;
            shared.wake.notify_all();
            return;
        }
    }
}

fn wait<'a>(shared: &'a Shared, mut state: MutexGuard<'a, State>, timeout: Option<Duration>) -> MutexGuard<'a, State> {
    state.writer_waiting = true;
    let mut state = match timeout {
        None => shared.wake.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner),
        Some(timeout) => shared.wake.wait_timeout(state, timeout).unwrap_or_else(std::sync::PoisonError::into_inner).0,
    };
    state.writer_waiting = false;
    state
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_BOUND;
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.wake.notify_all();
        while !state.finished {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .shared
                .wake
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// One event's line, handed over whole by tracing's formatter.
pub struct SinkWriter<'a>(&'a LogSink);

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Lossy by design: a dropped line is counted, not an error.
        self.0.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that keeps everything, and can be told to block.
    #[derive(Clone, Default)]
    struct Kept {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_queued_line_is_written_in_order_before_the_guard_returns() {
        let out = Kept::default();
        let (sink, guard) = LogSink::start(out.clone()).unwrap();
        let lines: Vec<String> = (0..20_000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        for line in &lines {
            assert!(sink.write_line(line.as_bytes()));
        }
        drop(guard);
        assert_eq!(String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap(), lines.concat());
        // Batched: far fewer writes than lines.
        let writes = out.writes.load(Ordering::Relaxed);
        assert!(writes < 1_000, "{writes} writes for 20,000 lines");
        // After the guard, lines are refused (and counted), never lost silently.
        assert!(!sink.write_line(b"late\n"));
        assert_eq!(sink.dropped(), 1);
    }

    #[test]
    fn a_stalled_writer_drops_new_lines_instead_of_blocking_callers() {
        let out = Kept::default();
        let stall = out.gate.lock().unwrap();
        let (sink, guard) = LogSink::start(out.clone()).unwrap();
        let line = vec![b'x'; 1023].into_iter().chain([b'\n']).collect::<Vec<u8>>();
        // The writer takes the first batch and blocks in `write`; the rest
        // fills the buffer up to its capacity, then lines are dropped.
        let mut accepted = 0u64;
        for _ in 0..(2 * CAPACITY / line.len() + 2 * BATCH / line.len()) {
            if sink.write_line(&line) {
                accepted += 1;
            }
        }
        assert!(sink.dropped() > 0, "nothing dropped");
        assert_eq!(accepted + sink.dropped(), (2 * CAPACITY / line.len() + 2 * BATCH / line.len()) as u64);
        drop(stall);
        drop(guard);
        // Every accepted line came out whole.
        let written = out.bytes.lock().unwrap().clone();
        assert_eq!(written.len() as u64, accepted * line.len() as u64);
    }

    #[test]
    fn a_single_line_is_written_without_waiting_for_a_batch() {
        let out = Kept::default();
        let (sink, _guard) = LogSink::start(out.clone()).unwrap();
        assert!(sink.write_line(b"one\n"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.bytes.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the line was never written");
            std::thread::yield_now();
        }
        assert_eq!(&*out.bytes.lock().unwrap(), b"one\n");
    }
}
