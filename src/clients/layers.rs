//! The client layer stack, one concern per layer. The order is set in one
//! place, [`super::stack`]. Every layer answers with a gRPC response (a
//! trailers-only status when it fails the call itself) and never panics,
//! so the layers above always see the call's real code.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use futures_util_lite::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Service, ServiceExt};

use super::methods::ClientMethods;
use crate::grpc::middleware::call::{ObservedFuture, OnCallEnd, status_code};
use crate::grpc::middleware::deadline::{GRPC_TIMEOUT, current_deadline, parse_grpc_timeout};
use crate::grpc::middleware::request_id::{self, with_caller};
use crate::secret_file::Watched;
use crate::telemetry::TRACEPARENT;

pub type Req = http::Request<Body>;
pub type Res = http::Response<Body>;

/// Boxed futures without a `futures` dependency.
mod futures_util_lite {
    pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
}

/// A trailers-only response carrying `status`.
pub fn failed(status: Status) -> Res {
    status.into_http()
}

fn ready_response(status: Status) -> BoxFuture<Result<Res, Status>> {
    Box::pin(std::future::ready(Ok(failed(status))))
}

/// A service whose calls run to their end once started; the clone-and-swap
/// pattern, so an async layer never calls a service it has not readied.
fn take_ready<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}

// ---------------------------------------------------------------- close

/// Outermost: after [`super::Clients::close`] new calls and those still in
/// flight (their bodies too) end with CANCELLED, never a hang.
#[derive(Clone)]
pub struct Close<S> {
    pub inner: S,
    pub closed: CancellationToken,
}

impl<S> Service<Req> for Close<S>
where
    S: Service<Req, Response = Res, Error = Status> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Res;
    type Error = Status;
    type Future = BoxFuture<Result<Res, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if self.closed.is_cancelled() {
            return ready_response(closed_status());
        }
        let call = self.inner.call(request);
        let closed = self.closed.clone();
        Box::pin(async move {
            tokio::select! {
                biased;
                response = call => {
                    let cut = closed.cancelled_owned();
                    response.map(|r| r.map(|body| Body::new(CutBody::new(body, async move { cut.await; closed_status() }))))
                }
                () = closed.cancelled() => Ok(failed(closed_status())),
            }
        })
    }
}

fn closed_status() -> Status {
    Status::cancelled("the client was closed at shutdown")
}

// ---------------------------------------------------------------- logging

/// One log line for each failed call, with the client, the method, the
/// code and how long it took.
#[derive(Clone)]
pub struct FailureLog<S> {
    pub inner: S,
    pub client: Arc<str>,
}

struct LogOnEnd {
    client: Arc<str>,
    method: String,
    start: StdInstant,
    /// The `grpc-message` of a trailers-only failure (every failure this
    /// stack makes itself, and most a server sends), set once the headers
    /// are in, which is before the call can end.
    message: Arc<std::sync::OnceLock<String>>,
}

impl OnCallEnd for LogOnEnd {
    fn call_ended(self, code: Code) {
        if code == Code::Ok {
            return;
        }
        let elapsed_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let code_name = crate::metrics::code_name(code);
        // The downstream's verdict on the request (not found, invalid) is
        // the handler's business; trouble reaching it is the operator's.
        let infrastructure = matches!(
            code,
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Internal
                | Code::Unknown
                | Code::DataLoss
                | Code::ResourceExhausted
                | Code::Unimplemented
        );
        let message = self.message.get().map_or("", String::as_str);
        if infrastructure {
            tracing::warn!(client = %self.client, grpc.method = %self.method, grpc.code = code_name, grpc.message = message, elapsed_ms, "client call failed");
        } else {
            tracing::info!(client = %self.client, grpc.method = %self.method, grpc.code = code_name, grpc.message = message, elapsed_ms, "client call failed");
        }
    }
}

impl<S> Service<Req> for FailureLog<S>
where
    S: Service<Req, Response = Res, Error = Status> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Res;
    type Error = Status;
    type Future = BoxFuture<Result<Res, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let message = Arc::new(std::sync::OnceLock::new());
        let on_end = LogOnEnd {
            client: self.client.clone(),
            method: request.uri().path().to_owned(),
            start: StdInstant::now(),
            message: message.clone(),
        };
        let call = self.inner.call(request);
        let call = async move {
            let response = call.await;
            if let Ok(response) = &response
                && let Some(status) = Status::from_header_map(response.headers())
            {
                let _ = message.set(status.message().to_owned());
            }
            response
        };
        let observed = ObservedFuture::new(call, Some(on_end), Code::Unavailable);
        Box::pin(async move { observed.await.map(|r| r.map(Body::new)) })
    }
}

// ---------------------------------------------------------------- deadline

/// The deadline a call was given, for the retry layer inside.
#[derive(Clone, Copy, Debug)]
pub struct ClientDeadline(pub Instant);

/// The call's deadline: the smallest of the client's timeout, the deadline
/// of the call being handled (the server's task-local), and a timeout the
/// request set itself. Sent as `grpc-timeout`; enforced here on the
/// response and its body. An expired one fails at once, unsent.
#[derive(Clone)]
pub struct Deadline<S> {
    pub inner: S,
    pub timeout: Duration,
}

impl<S> Service<Req> for Deadline<S>
where
    S: Service<Req, Response = Res, Error = Status> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Res;
    type Error = Status;
    type Future = BoxFuture<Result<Res, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let now = Instant::now();
        let mut at = now + self.timeout;
        if let Some(caller) = current_deadline() {
            at = at.min(caller);
        }
        let asked = request.headers().get(&GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        if let Some(asked) = asked {
            at = at.min(now + asked);
        }
        let left = at.saturating_duration_since(now);
        if left.is_zero() {
            return ready_response(Status::deadline_exceeded("the deadline had passed before the call was sent"));
        }
        if let Ok(value) = HeaderValue::from_str(&encode_grpc_timeout(left)) {
            request.headers_mut().insert(GRPC_TIMEOUT, value);
        }
        request.extensions_mut().insert(ClientDeadline(at));
        let call = self.inner.call(request);
        Box::pin(async move {
            // The deadline first: tonic's channel enforces `grpc-timeout`
            // too, and at the same instant this layer's code must win.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(at) => Ok(failed(expired())),
                response = call => response.map(|r| {
                    r.map(|body| {
                        Body::new(CutBody::new(body, async move {
                            tokio::time::sleep_until(at).await;
                            expired()
                        }))
                    })
                }),
            }
        })
    }
}

fn expired() -> Status {
    Status::deadline_exceeded("deadline exceeded waiting for the downstream")
}

/// The gRPC timeout syntax, in the finest unit whose value fits 8 digits.
pub fn encode_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    for (unit, per) in [("n", 1u128), ("u", 1_000), ("m", 1_000_000), ("S", 1_000_000_000), ("M", 60_000_000_000)] {
        let value = nanos.div_ceil(per);
        if value <= MAX {
            return format!("{value}{unit}");
        }
    }
    format!("{}H", (nanos / 3_600_000_000_000).min(MAX))
}

// ---------------------------------------------------------------- propagation

/// Where a client's `authorization` comes from.
#[derive(Clone)]
pub enum Credentials {
    /// Nothing is sent.
    None,
    /// The client's own bearer token (inline, or a watched file).
    Token(Watched<HeaderValue>),
    /// The caller's own `authorization`, passed on.
    Propagate,
}

/// Carries the handled call's context downstream: `x-request-id`, the W3C
/// `traceparent` (a child of our span when spans are exported, else the
/// caller's as it came) and the configured credentials. Headers the
/// request already has are left alone.
#[derive(Clone)]
pub struct Propagate<S> {
    pub inner: S,
    pub credentials: Credentials,
}

impl<S: Service<Req, Response = Res, Error = Status>> Service<Req> for Propagate<S> {
    type Response = Res;
    type Error = Status;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let headers = request.headers_mut();
        if !headers.contains_key(&TRACEPARENT) {
            crate::telemetry::propagate(headers);
        }
        with_caller(|caller| {
            if !headers.contains_key(&request_id::HEADER_NAME) {
                headers.insert(request_id::HEADER_NAME, caller.request_id.header().clone());
            }
            if !headers.contains_key(&TRACEPARENT)
                && let Some(traceparent) = &caller.traceparent
            {
                headers.insert(TRACEPARENT, traceparent.clone());
            }
            if matches!(self.credentials, Credentials::Propagate)
                && !headers.contains_key(http::header::AUTHORIZATION)
                && let Some(authorization) = &caller.authorization
            {
                headers.insert(http::header::AUTHORIZATION, authorization.clone());
            }
        });
        if let Credentials::Token(token) = &self.credentials
            && !headers.contains_key(http::header::AUTHORIZATION)
        {
            headers.insert(http::header::AUTHORIZATION, (*token.get()).clone());
        }
        self.inner.call(request)
    }
}

// ---------------------------------------------------------------- retries

/// How many retries a budget holds in reserve, so an occasional failure
/// of an idle client can still be retried.
pub const BUDGET_RESERVE: f64 = 10.0;

/// A token bucket shared by every clone of one client: each call deposits
/// `budget_percent / 100` of a token, each retry takes a whole one, and
/// the balance is capped at [`BUDGET_RESERVE`]. Under sustained failure
/// retries add at most `budget_percent` to the calls sent.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token, so the bucket is one atomic.
    balance: AtomicU64,
    deposit: u64,
}

impl RetryBudget {
    pub fn new(budget_percent: u32) -> Self {
        Self { balance: AtomicU64::new(Self::CAP), deposit: u64::from(budget_percent) * 10 }
    }

    const CAP: u64 = (BUDGET_RESERVE * 1000.0) as u64;

    fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((b + self.deposit).min(Self::CAP)));
    }

    fn withdraw(&self) -> bool {
        self.balance.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1000)).is_ok()
    }
}

/// A client's retry policy: its settings, its budget and its counters.
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub budget: RetryBudget,
    /// `keel_grpc_client_retries_total{outcome="retried"}`.
    pub retried: IntCounter,
    /// `keel_grpc_client_retries_total{outcome="budget_exhausted"}`.
    pub throttled: IntCounter,
}

impl RetryPolicy {
    /// Full jitter: a random share of `initial * 2^(retry-1)`, capped.
    fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self.initial_backoff.saturating_mul(1u32 << (retry - 1).min(20)).min(self.max_backoff);
        ceiling.mul_f64(random_unit())
    }
}

/// A number in [0, 1): std's per-process random hash keys over a counter,
/// enough for jitter without a `rand` dependency.
fn random_unit() -> f64 {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let bits = std::collections::hash_map::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Retries a call that failed with UNAVAILABLE before any response headers
/// (a trailers-only answer, or no connection), when its method is unary
/// and marked idempotent or side-effect free in its proto. The request is
/// buffered for that; other calls pass straight through.
#[derive(Clone)]
pub struct Retry<S> {
    pub inner: S,
    pub methods: Arc<ClientMethods>,
    pub policy: Arc<RetryPolicy>,
}

impl<S> Service<Req> for Retry<S>
where
    S: Service<Req, Response = Res, Error = Status> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Res;
    type Error = Status;
    type Future = BoxFuture<Result<Res, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.policy.budget.deposit();
        if self.policy.max_attempts <= 1 || !self.methods.retryable(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let mut service = take_ready(&mut self.inner);
        let policy = self.policy.clone();
        Box::pin(async move {
            let deadline = request.extensions().get::<ClientDeadline>().map(|d| d.0);
            let (parts, body) = request.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(status) => return Ok(failed(status)),
            };
            let mut attempt = 1;
            loop {
                let mut request = http::Request::new(Body::new(http_body_util::Full::new(body.clone())));
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = parts.uri.clone();
                *request.version_mut() = parts.version;
                *request.headers_mut() = parts.headers.clone();
                *request.extensions_mut() = parts.extensions.clone();
                if attempt > 1 {
                    request.headers_mut().insert("grpc-previous-rpc-attempts", HeaderValue::from(attempt - 1));
                }
                let response = match service.ready().await {
                    Ok(ready) => ready.call(request).await?,
                    Err(status) => failed(status),
                };
                if status_code(response.headers()) != Some(Code::Unavailable) || attempt >= policy.max_attempts {
                    return Ok(response);
                }
                let pause = policy.backoff(attempt);
                if deadline.is_some_and(|at| Instant::now() + pause >= at) {
                    return Ok(response);
                }
                if !policy.budget.withdraw() {
                    policy.throttled.inc();
                    return Ok(response);
                }
                policy.retried.inc();
                tokio::time::sleep(pause).await;
                attempt += 1;
                service = service.clone();
            }
        })
    }
}

// ---------------------------------------------------------------- transport

/// Innermost: the tonic `Channel`. Its errors (no connection, a reset)
/// become UNAVAILABLE responses, and wake the resolver of a `dns:///`
/// client, which re-resolves at once.
#[derive(Clone)]
pub struct Transport {
    pub channel: tonic::transport::Channel,
    pub lost: Option<Arc<Notify>>,
}

impl Service<Req> for Transport {
    type Response = Res;
    type Error = Status;
    type Future = BoxFuture<Result<Res, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Readiness is awaited per call below, bounded by the deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let mut channel = self.channel.clone();
        let lost = self.lost.clone();
        Box::pin(async move {
            let outcome = match channel.ready().await {
                Ok(ready) => ready.call(request).await,
                Err(error) => Err(error),
            };
            match outcome {
                Ok(response) => Ok(response.map(Body::new)),
                // tonic's own `grpc-timeout` timer: the deadline, not a
                // lost connection.
                Err(error) if timed_out(&error) => Ok(failed(expired())),
                Err(error) => {
                    if let Some(lost) = lost {
                        lost.notify_one();
                    }
                    Ok(failed(Status::unavailable(format!(
                        "downstream unreachable: {}",
                        crate::telemetry::chain(&error)
                    ))))
                }
            }
        })
    }
}

/// Whether a transport error is tonic's client-side timeout.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        current = error.source();
    }
    false
}

// ---------------------------------------------------------------- bodies

pin_project_lite::pin_project! {
    /// A response body cut short when `cut` resolves: it ends with the
    /// status `cut` gives, as trailers, so every reader sees a real code.
    pub struct CutBody<B> {
        #[pin]
        inner: B,
        cut: Option<BoxFuture<Status>>,
    }
}

impl<B> CutBody<B> {
    pub fn new(inner: B, cut: impl std::future::Future<Output = Status> + Send + 'static) -> Self {
        Self { inner, cut: Some(Box::pin(cut)) }
    }
}

impl<B: HttpBody<Data = Bytes, Error = Status>> HttpBody for CutBody<B> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let Some(cut) = this.cut.as_mut() else { return Poll::Ready(None) };
        if let Poll::Ready(status) = cut.as_mut().poll(cx) {
            *this.cut = None;
            return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))));
        }
        let frame = this.inner.poll_frame(cx);
        if matches!(&frame, Poll::Ready(None)) {
            *this.cut = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.cut.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `grpc-status` and `grpc-message` trailers for `status`.
fn status_trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    if let Ok(message) = HeaderValue::from_str(status.message()) {
        trailers.insert("grpc-message", message);
    }
    trailers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_encoded_in_the_finest_unit_that_fits() {
        assert_eq!(encode_grpc_timeout(Duration::from_nanos(1)), "1n");
        assert_eq!(encode_grpc_timeout(Duration::from_millis(50)), "50000000n");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(2)), "2000000u");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        for d in [Duration::from_micros(1234), Duration::from_secs(7), Duration::from_secs(86_400 * 400)] {
            let parsed = parse_grpc_timeout(&encode_grpc_timeout(d)).unwrap_or_default();
            // Rounded up, never down: the callee never gets less time.
            assert!(parsed >= d && parsed - d < d / 1000 + Duration::from_secs(1), "{d:?} -> {parsed:?}");
        }
    }

    #[test]
    fn the_budget_holds_a_reserve_then_a_share_of_calls() {
        let budget = RetryBudget::new(20);
        let mut granted = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.withdraw() {
                granted += 1;
            }
        }
        // 10 in reserve, then one per five calls.
        assert!((28..=31).contains(&granted), "{granted}");
        let none = RetryBudget::new(0);
        let free: usize = (0..100).filter(|_| none.withdraw()).count();
        assert_eq!(free, 10, "only the reserve without a share");
    }

    #[test]
    fn backoff_is_jittered_below_its_capped_ceiling() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            budget: RetryBudget::new(20),
            retried: IntCounter::new("r", "r").unwrap(),
            throttled: IntCounter::new("t", "t").unwrap(),
        };
        for retry in 1..=8 {
            let ceiling = Duration::from_millis(100 * (1 << (retry - 1))).min(Duration::from_millis(300));
            let draws: Vec<Duration> = (0..50).map(|_| policy.backoff(retry)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "retry {retry}: {draws:?}");
            assert!(draws.iter().any(|d| *d != draws[0]), "no jitter at retry {retry}");
        }
    }
}
