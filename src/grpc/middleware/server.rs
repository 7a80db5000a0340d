//! The gRPC server's call layer: the one tower layer every call passes,
//! from the network and from the gateway's in-process path alike. It runs
//! the steps below in this order, each owned by its own module:
//!
//! 1. the method, looked up once from the path ([`super::method`]);
//! 2. the request id, and the call's span when spans are on
//!    ([`super::request_id`]);
//! 3. the call's metrics and access line ([`super::logging`]), started
//!    before any step that can refuse the call, so refused calls are
//!    counted and logged with their code;
//! 4. the message size limits on the request body ([`super::limits`]);
//! 5. load shedding ([`super::shed`]), before authentication: refusing is
//!    the cheapest answer;
//! 6. authentication ([`super::auth`]);
//! 7. the deadline ([`super::deadline`]), enforced here for unary calls;
//! 8. the handler, polled under panic recovery ([`super::recover`]).
//!
//! On the way out, the size limits rewrite the status, the request id is
//! added to the headers (unless `grpc.echo_request_id` is off), and the
//! response body (one wrapper) enforces the encoding limit, counts the
//! messages sent and, once the trailers pass, ends the call: its metrics,
//! its access line and its shedding slot.
//!
//! Why one layer rather than one per step: as eight tower layers, each step
//! had its own future, its own body wrapper and its own lookups in the
//! request extensions, and the gRPC path cost 1.36× bare tonic's CPU per
//! call. The steps themselves are cheap; what they cost was the nesting:
//! futures moved through every level, eight polls per poll, and three
//! extension boxes per call. One layer keeps one future, one body wrapper
//! and one task-local, and the per-step logic stays in its own module.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status};
use tower::{Layer, Service};
use tracing::Span;

use super::auth::{Authenticator, Verdict, verify_jwt};
use super::call::MessageCounter;
use super::deadline::{DeadlinePolicy, GRPC_TIMEOUT, release_after_deadline};
use super::limits::SizeLimits;
use super::logging::CallLog;
use super::method::MethodTable;
use super::recover::{panic_message, panic_status};
use super::request_id::{self, Caller, InCall, RequestId};
use super::shed::{Permit, Shedder};
use crate::telemetry::TRACEPARENT;

const X_REQUEST_ID: HeaderName = request_id::HEADER_NAME;

/// The request headers the call layer reads, found in one walk over the
/// header map. Looked up by name, each hashed its name and probed the map,
/// five times a call (the authorization twice); a gRPC request carries a
/// handful of headers, and comparing names while walking them costs less.
/// The first value of a repeated header counts, as with `HeaderMap::get`.
#[derive(Default)]
struct CallHeaders<'a> {
    request_id: Option<&'a HeaderValue>,
    authorization: Option<&'a HeaderValue>,
    grpc_timeout: Option<&'a HeaderValue>,
    traceparent: Option<&'a HeaderValue>,
}

impl<'a> CallHeaders<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut found = Self::default();
        for (name, value) in headers {
            let slot = if name == http::header::AUTHORIZATION {
                &mut found.authorization
            } else if name == X_REQUEST_ID {
                &mut found.request_id
            } else if name == GRPC_TIMEOUT {
                &mut found.grpc_timeout
            } else if name == TRACEPARENT {
                &mut found.traceparent
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        found
    }
}

/// What the call layer decides with, built once at start and shared by
/// every clone of the layer.
#[derive(Debug)]
pub struct CallPolicy {
    /// Every served method, with its series and its auth and shedding
    /// policy.
    pub methods: &'static MethodTable,
    /// Static tokens and JWTs; off when no credential is configured.
    pub auth: Authenticator,
    /// `grpc.max_concurrent_requests`.
    pub shed: Shedder,
    /// `grpc.max_decoding_message_size` and `grpc.max_encoding_message_size`.
    pub limits: SizeLimits,
    /// `grpc.default_timeout` and `grpc.max_timeout`.
    pub deadlines: DeadlinePolicy,
    /// `grpc.echo_request_id`: whether responses carry `x-request-id`
    /// (gateway calls too: grpc-gateway clients read it as
    /// `Grpc-Metadata-X-Request-Id`).
    pub echo_request_id: bool,
}

/// The call layer; see the module doc.
#[derive(Clone, Debug)]
pub struct CallLayer {
    policy: Arc<CallPolicy>,
}

impl CallLayer {
    pub fn new(policy: CallPolicy) -> Self {
        Self { policy: Arc::new(policy) }
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Calls { inner, policy: self.policy.clone() }
    }
}

/// The routes (or any service) behind the call layer.
#[derive(Clone, Debug)]
pub struct Calls<S> {
    inner: S,
    policy: Arc<CallPolicy>,
}

/// A call that waits for its JWT to be verified before the handler runs.
type Verifying<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, B> Service<Request<tonic::body::Body>> for Calls<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = Response<CallBody<B>>;
    type Error = S::Error;
    /// Boxed here, once: the call's state and the handler's future move
    /// through tonic's own layers before tonic boxes them anyway, and at
    /// close to a kilobyte those moves cost more than the allocation.
    type Future = Pin<Box<CallFuture<S::Future, B, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        let start = std::time::Instant::now();
        let policy = &*self.policy;
        let method = policy.methods.get(request.uri().path());
        let headers = CallHeaders::of(request.headers());
        let id = RequestId::from_header(headers.request_id);
        let (authorization, traceparent) = (headers.authorization.cloned(), headers.traceparent.cloned());
        // Read while the headers are borrowed, so `grpc-timeout` is parsed
        // in place rather than copied out.
        let streams_out = !method.grpc_type.single_response();
        let at = policy.deadlines.deadline(headers.grpc_timeout, streams_out, Instant::from_std(start));
        // A span per call only when something reads spans: the OTLP
        // exporter, or the pretty format, which prints span fields. JSON
        // lines take the id and method from the call's `Caller` instead
        // (see `telemetry`), so the common production setup pays for no
        // span: creating, entering and closing one was about a tenth of a
        // call's CPU.
        let span = if crate::telemetry::call_spans() {
            let span = tracing::info_span!(
                "rpc",
                request_id = %id.as_str(),
                grpc.method = %request.uri().path(),
                trace_id = tracing::field::Empty,
            );
            // A call through the gateway continues the gateway's trace.
            crate::telemetry::continue_trace(&span, request.headers());
            Some(span)
        } else {
            None
        };
        let log = CallLog::start(&mut request, start, method, id.clone(), span, policy.echo_request_id);
        // Boxed: it moves from the future to the response body, and the
        // body moves through tonic's layers before tonic boxes it.
        let mut call = Box::new(CallState { log, permit: None, limits: policy.limits });

        let single = method.grpc_type.single_request();
        let streamed_in = (!single).then(|| method.metrics.clone()).flatten();
        let mut request = request.map(|body| policy.limits.request_body(body, single, streamed_in));

        let permit = match policy.shed.admit(method) {
            Ok(permit) => permit,
            Err(status) => return Box::pin(CallFuture::answered(status, call)),
        };
        let jwt = match policy.auth.check(method, authorization.as_ref()) {
            Verdict::Pass => None,
            Verdict::Refuse(status) => {
                call.permit = Some(permit);
                return Box::pin(CallFuture::answered(status, call));
            }
            Verdict::VerifyJwt(jwt, token) => Some((jwt, token)),
        };

        let slot = if streams_out { permit.slot().cloned() } else { None };
        call.permit = Some(permit);
        let caller = Caller {
            request_id: id,
            method: method.served.then_some(method),
            deadline: Some(at),
            traceparent,
            authorization,
        };
        let inner = match jwt {
            Some((jwt, token)) => {
                // The ready clone serves this call; a fresh clone takes its
                // place (the usual tower pattern for calls that await first).
                let fresh = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, fresh);
                let verifying: Verifying<B, S::Error> = Box::pin(async move {
                    let path = request.uri().path().to_owned();
                    match verify_jwt(&jwt, &token, &path).await {
                        Ok(claims) => {
                            request.extensions_mut().insert(Arc::new(claims));
                            if let Some(slot) = slot {
                                release_after_deadline(slot, at);
                            }
                            inner.call(request).await
                        }
                        Err(status) => Ok(status.into_http()),
                    }
                });
                Inner::Verifying { future: request_id::scope(caller, verifying) }
            }
            None => {
                if let Some(slot) = slot {
                    release_after_deadline(slot, at);
                }
                // A panic while the call is being set up is caught too.
                match catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
                    Ok(future) => Inner::Handler { future: request_id::scope(caller, future) },
                    Err(payload) => {
                        let message = panic_message(payload.as_ref());
                        request_id::sync_scope(caller, || tracing::error!(panic = %message, "handler panicked"));
                        Inner::Answered { response: Some(panic_status().into_http()) }
                    }
                }
            }
        };
        Box::pin(CallFuture { inner, timed: (!streams_out).then_some(at), sleep: None, call: Some(call) })
    }
}

/// What ends a call: its record (metrics and access line) and its
/// shedding slot, carried by the future and then by the response body.
struct CallState {
    log: CallLog,
    /// `None` until the call is admitted.
    permit: Option<Permit>,
    limits: SizeLimits,
}

impl CallState {
    fn end(self, code: Code, sent: u64) {
        // The slot goes back with the call's record, whatever ends it.
        drop(self.permit);
        self.log.finish(code, sent);
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<F, B, E> {
        Handler { #[pin] future: InCall<F> },
        Verifying { #[pin] future: InCall<Verifying<B, E>> },
        Answered { response: Option<Response<B>> },
    }
}

pin_project! {
    /// One call: the handler's future (with the call's `Caller` in scope),
    /// raced against the deadline of a unary call, under panic recovery.
    pub struct CallFuture<F, B, E> {
        #[pin]
        inner: Inner<F, B, E>,
        // The deadline this future enforces (unary and client-streaming
        // calls; a stream's response watches its own).
        timed: Option<Instant>,
        // The timer, made only once the call has to wait: most calls
        // answer on their first poll and never need one.
        #[pin]
        sleep: Option<Sleep>,
        // The call's record (its request id and span among it), until the
        // response carries it on.
        call: Option<Box<CallState>>,
    }

    impl<F, B, E> PinnedDrop for CallFuture<F, B, E> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the handler answered: the client reset the
            // stream or went away. That is the client's doing, not a
            // server error.
            if let Some(call) = this.project().call.take() {
                call.end(Code::Cancelled, 0);
            }
        }
    }
}

impl<F, B, E> CallFuture<F, B, E> {
    /// A call answered before its handler runs (shed or refused).
    fn answered(status: Status, call: Box<CallState>) -> Self
    where
        B: Default,
    {
        Self {
            inner: Inner::Answered { response: Some(status.into_http()) },
            timed: None,
            sleep: None,
            call: Some(call),
        }
    }
}

/// Polls a handler's future, turning a panic into `None` (logged as part
/// of the call).
fn poll_guarded<G: Future>(mut future: Pin<&mut InCall<G>>, cx: &mut Context<'_>) -> Poll<Option<G::Output>> {
    match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
        Ok(polled) => polled.map(Some),
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            let log = || tracing::error!(panic = %message, "handler panicked");
            match future.take_value() {
                Some(caller) => request_id::sync_scope(caller, log),
                None => log(),
            }
            Poll::Ready(None)
        }
    }
}

impl<F, B, E> Future for CallFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<CallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let polled = {
            // The handler runs inside the call's span, when there is one.
            let _entered = this.call.as_ref().and_then(|call| call.log.span()).map(Span::enter);
            match this.inner.as_mut().project() {
                InnerProj::Handler { future } => poll_guarded(future, cx),
                InnerProj::Verifying { future } => poll_guarded(future, cx),
                InnerProj::Answered { response } => Poll::Ready(Some(Ok(response.take().unwrap_or_default()))),
            }
        };
        let result = match polled {
            Poll::Ready(Some(result)) => result,
            Poll::Ready(None) => Ok(panic_status().into_http()),
            Poll::Pending => {
                if this.sleep.is_none()
                    && let Some(at) = *this.timed
                {
                    this.sleep.set(Some(tokio::time::sleep_until(at)));
                }
                match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        // The handler is dropped now, not when the
                        // response is.
                        this.inner.set(Inner::Answered { response: None });
                        Ok(Status::deadline_exceeded("deadline exceeded").into_http())
                    }
                    _ => return Poll::Pending,
                }
            }
        };
        let Some(call) = this.call.take() else {
            // Polled again after it answered.
            return Poll::Ready(result.map(|response| response.map(|body| CallBody::new(body, None))));
        };
        match result {
            Ok(mut response) => {
                let code = call.limits.rewrite(response.headers_mut());
                if let Some(id) = call.log.echo_value() {
                    response.headers_mut().insert(X_REQUEST_ID, id);
                }
                // A trailers-only response (every error tonic returns from a
                // handler) ends the call with its headers.
                let call = match code {
                    Some(code) => {
                        call.end(code, 0);
                        None
                    }
                    None => Some(call),
                };
                Poll::Ready(Ok(response.map(|body| CallBody::new(body, call))))
            }
            Err(error) => {
                call.end(Code::Internal, 0);
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project! {
    /// The response body: it ends with RESOURCE_EXHAUSTED trailers instead
    /// of a message over the encoding limit, rewrites tonic's own size
    /// statuses in the trailers, counts the messages sent, and ends the
    /// call with the trailers' code, or `CANCELLED` when the client went
    /// away first.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        call: Option<Box<CallState>>,
        frames: MessageCounter,
        done: bool,
    }

    impl<B> PinnedDrop for CallBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped before the trailers: the client cancelled or vanished.
            if let Some(call) = this.call.take() {
                call.end(Code::Cancelled, this.frames.messages);
            }
        }
    }
}

impl<B> CallBody<B> {
    /// `call` is `None` when the call already ended with the headers.
    fn new(inner: B, call: Option<Box<CallState>>) -> Self {
        Self { inner, call, frames: MessageCounter::default(), done: false }
    }
}

impl<B> Body for CallBody<B>
where
    B: Body,
    B::Data: AsRef<[u8]>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.poll_frame(cx));
        let Some(limits) = this.call.as_ref().map(|call| call.limits) else {
            return Poll::Ready(frame);
        };
        let (frame, ended) = match frame {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    let code = limits.rewrite(&mut trailers).unwrap_or(Code::Unknown);
                    (Some(Ok(Frame::trailers(trailers))), Some((code, this.frames.messages)))
                }
                Err(frame) => {
                    let sent = this.frames.messages;
                    let largest = frame.data_ref().map_or(0, |data| this.frames.feed(data.as_ref()));
                    if limits.response_fits(largest) {
                        (Some(Ok(frame)), None)
                    } else {
                        // tonic writes whole messages per chunk, so what
                        // went before this one is complete; end the call.
                        *this.done = true;
                        let mut trailers = HeaderMap::new();
                        let _ = limits.too_large_response().add_header(&mut trailers);
                        (Some(Ok(Frame::trailers(trailers))), Some((Code::ResourceExhausted, sent)))
                    }
                }
            },
            Some(Err(error)) => (Some(Err(error)), Some((Code::Internal, this.frames.messages))),
            // A body that ends without trailers carries no status: for gRPC
            // that is an error.
            None => (None, Some((Code::Unknown, this.frames.messages))),
        };
        // A data frame leaves the call open.
        if let Some((code, sent)) = ended
            && let Some(call) = this.call.take()
        {
            call.end(code, sent);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_walk_finds_what_lookups_by_name_find() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.append(X_REQUEST_ID, HeaderValue::from_static("first"));
        headers.append(X_REQUEST_ID, HeaderValue::from_static("second"));
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        headers.insert(HeaderName::from_static("x-other"), HeaderValue::from_static("no"));
        let found = CallHeaders::of(&headers);
        assert_eq!(found.request_id, headers.get(&X_REQUEST_ID), "the first value, as get() gives");
        assert_eq!(found.request_id.map(HeaderValue::as_bytes), Some(&b"first"[..]));
        assert_eq!(found.authorization, headers.get(http::header::AUTHORIZATION));
        assert_eq!(found.grpc_timeout.map(HeaderValue::as_bytes), Some(&b"5S"[..]));
        assert_eq!(found.traceparent, None);

        headers
            .insert(TRACEPARENT, HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(CallHeaders::of(&headers).traceparent, headers.get(&TRACEPARENT));
        assert!(CallHeaders::of(&HeaderMap::new()).authorization.is_none());
    }
}
