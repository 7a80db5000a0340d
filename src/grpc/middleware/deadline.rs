//! Call deadlines: the `grpc-timeout` header, or `grpc.default_timeout`
//! when a unary call has none, capped at `grpc.max_timeout`, turned into an
//! instant that handlers and stream producers race against. Unary calls are
//! cut off here with DEADLINE_EXCEEDED; streams end themselves at it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tower::{Layer, Service};

use super::method::method_of;
use super::shed::ShedSlot;

#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    /// For unary and client-streaming calls that name no deadline.
    default: Duration,
    /// No call may run longer; also the deadline of a server stream that
    /// names none.
    max: Duration,
}

impl DeadlineLayer {
    pub fn new(default: Duration, max: Duration) -> Self {
        Self { default: default.min(max), max }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService { inner, limits: *self }
    }
}

#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
    limits: DeadlineLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DeadlineService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeadlineFuture<tokio::task::futures::TaskLocalFuture<Instant, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let streams_out = method_of(&request).is_some_and(|m| !m.grpc_type.single_response());
        let asked = request.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let fallback = if streams_out { self.limits.max } else { self.limits.default };
        let at = Instant::now() + asked.unwrap_or(fallback).min(self.limits.max);
        request.extensions_mut().insert(Deadline(at));
        // A stream's response future ends with its headers; the stream
        // itself watches the deadline from the extensions. Its shedding slot
        // comes back shortly after the deadline even if its final status
        // never goes out (a client that does not read).
        if streams_out && let Some(slot) = request.extensions().get::<ShedSlot>().cloned() {
            tokio::spawn(async move {
                tokio::time::sleep_until(at + STREAM_GRACE).await;
                slot.release();
            });
        }
        let timed = (!streams_out).then_some(at);
        DeadlineFuture { inner: CALL_DEADLINE.scope(at, self.inner.call(request)), timed, sleep: None }
    }
}

pin_project! {
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        // The deadline this future enforces (unary and client-streaming
        // calls; a stream's response watches its own).
        timed: Option<Instant>,
        // The timer, made only once the call has to wait: most calls
        // answer on their first poll and never need one.
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F, ResBody, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        if this.sleep.is_none()
            && let Some(at) = *this.timed
        {
            this.sleep.set(Some(tokio::time::sleep_until(at)));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Ok(Status::deadline_exceeded("deadline exceeded").into_http())),
            _ => Poll::Pending,
        }
    }
}

/// How long after its deadline a stream may still hold its shedding slot
/// while its final status waits to be sent.
pub const STREAM_GRACE: Duration = Duration::from_millis(500);

tokio::task_local! {
    /// The deadline of the call being handled on this task, for code far
    /// from the request (a store bounding its queries by it).
    static CALL_DEADLINE: Instant;
}

/// The deadline of the call this code runs for, when it runs inside a
/// unary handler (stream producers run on their own tasks and race their
/// deadline themselves).
pub fn current_deadline() -> Option<Instant> {
    CALL_DEADLINE.try_with(|at| *at).ok()
}

/// The deadline of a call, stored in the request extensions by the deadline
/// layer so handlers need not parse headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// Parses the gRPC timeout syntax: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m` for milliseconds, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // Split as bytes: the last character may be more than one byte long
    // (found by fuzzing; `str::split_at` panics inside a character).
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The deadline of a request: the one the deadline layer stored, or the one
/// its `grpc-timeout` header implies.
pub fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    if let Some(Deadline(at)) = request.extensions().get::<Deadline>() {
        return Some(*at);
    }
    let timeout = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(timeout).map(|t| Instant::now() + t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
    }

    #[test]
    fn rejects_malformed_timeouts() {
        for bad in ["", "S", "10", "123456789S", "1.5S", "-1S", "10s", "1 S", "999H\u{1f7}", "1\u{e9}"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
