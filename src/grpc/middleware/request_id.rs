//! Request ids: taken from `x-request-id` or generated, echoed in the
//! response metadata (by the gateway always, on gRPC responses unless
//! `grpc.echo_request_id` is off), and carried by the call's [`Caller`]
//! (and its span, when spans are on) so every log line of the call, in
//! every step and in the handler, names it. The [`Caller`] is the call's one task-local: the
//! downstream clients, the log format and the store read it.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

use super::method::MethodInfo;

pub const HEADER: &str = "x-request-id";
/// [`HEADER`] as a name made at compile time, for lookups and inserts that
/// would otherwise parse and check the name each time.
pub const HEADER_NAME: http::HeaderName = http::HeaderName::from_static(HEADER);
const MAX_LEN: usize = 128;

/// The id of the current call. It is kept as the header value it is sent
/// as: a caller's id is the received value itself (no copy), a generated
/// one is made once, and every clone (the response header, the log line,
/// downstream calls) shares its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId {
    value: HeaderValue,
    /// Made here (hex digits and hyphens), so the access line writes it
    /// without checking it for characters JSON must escape.
    generated: bool,
}

impl RequestId {
    /// The caller's id when it is sane, otherwise a fresh one.
    pub fn from_header(value: Option<&HeaderValue>) -> Self {
        let given =
            value.filter(|v| !v.is_empty() && v.len() <= MAX_LEN && v.as_bytes().iter().all(u8::is_ascii_graphic));
        match given {
            Some(id) => Self::sensitive(id.clone(), false),
            None => Self::generate(),
        }
    }

    /// `id` as given, when it is a sane id (tests and callers that already
    /// hold one).
    pub fn new(id: &str) -> Option<Self> {
        let value = HeaderValue::from_str(id).ok()?;
        let sane = Self::from_header(Some(&value));
        (sane.value == value).then_some(sane)
    }

    /// A fresh UUIDv4-shaped id with no syscall and no allocation of its
    /// own: see [`IdBatch`].
    pub fn generate() -> Self {
        thread_local! {
            static BATCH: RefCell<IdBatch> = RefCell::new(IdBatch::new());
        }
        let value = BATCH
            .try_with(|batch| batch.try_borrow_mut().ok().map(|mut batch| batch.next()))
            .ok()
            .flatten()
            // Only while this thread's locals are torn down: a batch of one.
            .unwrap_or_else(|| IdBatch::new().next());
        Self::sensitive(value, true)
    }

    /// Never indexed by HPACK: an id is unique per call, so adding it to a
    /// connection's header table would only evict the entries that do
    /// repeat (grpc-status, content-type) and cost a table update per
    /// response. (A gRPC connection's first response, and one every half
    /// minute, sends its id indexable, so the name keeps a table entry:
    /// see [`crate::grpc::incoming::EchoName`].)
    fn sensitive(mut value: HeaderValue, generated: bool) -> Self {
        value.set_sensitive(true);
        Self { value, generated }
    }

    /// Whether the id was generated here rather than sent by the caller.
    pub fn is_generated(&self) -> bool {
        self.generated
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever kept, so this never fails.
        self.value.to_str().unwrap_or_default()
    }

    /// The id as the header it is sent as, in responses and downstream.
    pub fn header(&self) -> &HeaderValue {
        &self.value
    }
}

/// Ids per batch: one allocation serves this many calls. Small, because a
/// long stream keeps its id, and with it its batch, alive.
const BATCH_IDS: usize = 16;
const ID_LEN: usize = uuid::fmt::Hyphenated::LENGTH;

/// One thread's source of request ids. Ids are formatted [`BATCH_IDS`] at
/// a time into one shared buffer, and each id is a slice of it, so a call
/// pays a reference count rather than an allocation and a free. Each
/// thread draws from its own stream of counter values (a thread number
/// from one shared counter, taken once per thread, in the high bits), so
/// calls on different cores never contend for a cache line, and the
/// values go through SplitMix64, a bijection keyed by one random seed per
/// process (the only getrandom): ids never repeat within the process and
/// do not reveal the call count.
struct IdBatch {
    ids: Bytes,
    used: usize,
    stream: u64,
    next: u64,
}

impl IdBatch {
    fn new() -> Self {
        static THREADS: AtomicU64 = AtomicU64::new(0);
        let thread = THREADS.fetch_add(1, Ordering::Relaxed);
        // 2^40 ids per thread and 2^24 threads before values could repeat.
        Self { ids: Bytes::new(), used: BATCH_IDS, stream: thread << 40, next: 0 }
    }

    fn next(&mut self) -> HeaderValue {
        if self.used == BATCH_IDS {
            self.refill();
        }
        let at = self.used * ID_LEN;
        self.used += 1;
        let id = self.ids.slice(at..at + ID_LEN);
        // Hex digits and hyphens always pass.
        HeaderValue::from_maybe_shared(id)
            .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
    }

    fn refill(&mut self) {
        static SEED: OnceLock<u64> = OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            let random = uuid::Uuid::new_v4().as_u64_pair();
            random.0 ^ random.1.rotate_left(17)
        });
        let mut text = vec![0u8; BATCH_IDS * ID_LEN];
        for slot in text.chunks_exact_mut(ID_LEN) {
            let n = self.stream | self.next;
            self.next += 1;
            let high = splitmix64(seed.wrapping_add(n));
            let low = splitmix64(high ^ seed.rotate_left(29) ^ n);
            let bytes = ((u128::from(high) << 64) | u128::from(low)).to_be_bytes();
            uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().encode_lower(slot);
        }
        self.ids = Bytes::from(text);
        self.used = 0;
    }
}

/// SplitMix64's finaliser: a bijection on u64 with good avalanche.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the handler of a call hands on to the calls it makes downstream
/// (see [`crate::clients`]): its request id, deadline, its caller's trace
/// context and credentials. The JSON log lines written while the call runs
/// name its request id and method from here too.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Sent on as `x-request-id`, so one id follows a request across hops.
    pub request_id: RequestId,
    /// The method being served, when a registered service has it.
    pub method: Option<&'static MethodInfo>,
    /// The call's deadline, which bounds the work done for it (store
    /// queries, downstream calls). `None` outside a gRPC call (the
    /// gateway's own scope).
    pub deadline: Option<Instant>,
    /// The caller's `traceparent`, passed on when no span of ours exports.
    pub traceparent: Option<HeaderValue>,
    /// The caller's `authorization`, for clients that propagate it.
    pub authorization: Option<HeaderValue>,
}

tokio::task_local! {
    /// The call handled on this task, for the clients it calls through.
    static CALLER: Caller;
}

/// The call future with its [`Caller`] in scope.
pub type InCall<F> = tokio::task::futures::TaskLocalFuture<Caller, F>;

/// Runs `future` as part of the call this code runs for, if any: for work
/// a call spawns onto another task (stream producers), so its log lines
/// still name the call.
pub fn in_current_call<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let caller = with_caller(Caller::clone);
    async move {
        match caller {
            Some(caller) => CALLER.scope(caller, future).await,
            None => future.await,
        }
    }
}

/// Runs `future` with `caller` as its call (the server's call layer, and
/// the gateway for the log lines it writes around its in-process call).
pub fn scope<F: Future>(caller: Caller, future: F) -> InCall<F> {
    CALLER.scope(caller, future)
}

/// Runs `f` with `caller` as its call, synchronously.
pub fn sync_scope<R>(caller: Caller, f: impl FnOnce() -> R) -> R {
    CALLER.sync_scope(caller, f)
}

/// Reads the call this code runs for, inside a unary handler.
pub fn with_caller<R>(read: impl FnOnce(&Caller) -> R) -> Option<R> {
    CALLER.try_with(read).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        let given = HeaderValue::from_static("abc-123");
        assert_eq!(RequestId::from_header(Some(&given)).as_str(), "abc-123");
        let spaced = HeaderValue::from_static("has space");
        assert_ne!(RequestId::from_header(Some(&spaced)).as_str(), "has space");
        let long = HeaderValue::from_str(&"x".repeat(200)).unwrap_or(HeaderValue::from_static("x"));
        assert!(RequestId::from_header(Some(&long)).as_str().len() <= MAX_LEN);
        assert_eq!(RequestId::from_header(None).as_str().len(), 36);
    }

    #[test]
    fn ids_are_sent_as_never_indexed_headers() {
        let given = HeaderValue::from_static("abc-123");
        let kept = RequestId::from_header(Some(&given));
        assert!(kept.header().is_sensitive());
        assert_eq!(kept.header().as_bytes(), b"abc-123");
        let generated = RequestId::generate();
        assert!(generated.header().is_sensitive());
        assert_eq!(generated.header().to_str().ok(), Some(generated.as_str()));
        assert_eq!(RequestId::new("rid-7").map(|id| id.as_str().to_owned()).as_deref(), Some("rid-7"));
        assert!(RequestId::new("has space").is_none());
    }

    #[test]
    fn ids_generated_on_many_threads_never_repeat() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..1_000).map(|_| RequestId::generate().as_str().to_owned()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for thread in threads {
            let ids = thread.join().unwrap_or_default();
            assert_eq!(ids.len(), 1_000);
            all.extend(ids);
        }
        assert_eq!(all.len(), 4_000);
    }

    #[test]
    fn generated_ids_are_distinct_uuids() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| RequestId::generate().as_str().to_owned()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(20) {
            let parsed = uuid::Uuid::parse_str(id).map(|u| u.get_version_num()).unwrap_or_default();
            assert_eq!(parsed, 4, "{id}");
        }
    }
}
