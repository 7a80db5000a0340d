//! Request ids: taken from `x-request-id` or generated, echoed in the
//! response metadata, and carried by the call's [`Caller`] (and its span,
//! when spans are on) so every log line of the call, in every layer and in
//! the handler, names it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;

use super::method::{MethodInfo, method_of};
use tracing::instrument::Instrumented;

pub const HEADER: &str = "x-request-id";
const MAX_LEN: usize = 128;

/// The id of the current call, in the request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    /// The caller's id when it is sane, otherwise a fresh one.
    pub fn from_header(value: Option<&HeaderValue>) -> Self {
        let given = value
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_LEN && v.bytes().all(|b| b.is_ascii_graphic()));
        match given {
            Some(id) => Self(Arc::from(id)),
            None => Self::generate(),
        }
    }

    /// A fresh UUIDv4-shaped id with no syscall: one random seed per
    /// process (the only getrandom), then a counter mixed through
    /// SplitMix64, a bijection, so ids never repeat within the process and
    /// do not reveal the call count.
    pub fn generate() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| {
            let random = uuid::Uuid::new_v4().as_u64_pair();
            random.0 ^ random.1.rotate_left(17)
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let high = splitmix64(seed.wrapping_add(n));
        let low = splitmix64(high ^ seed.rotate_left(29) ^ n);
        let uuid =
            uuid::Builder::from_random_bytes(((u128::from(high) << 64) | u128::from(low)).to_be_bytes()).into_uuid();
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        Self(Arc::from(&*uuid.hyphenated().encode_lower(&mut text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// SplitMix64's finaliser: a bijection on u64 with good avalanche.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestIdService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let id = RequestId::from_header(request.headers().get(HEADER));
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
            request.extensions_mut().insert(CallSpan(span.clone()));
            span
        } else {
            Span::none()
        };
        // Never indexed by HPACK: an id is unique per call, so adding it to
        // the connection's header table would only evict the entries that
        // do repeat (grpc-status, content-type) and cost a table update
        // per response.
        let header = HeaderValue::from_str(id.as_str()).ok().map(|mut value| {
            value.set_sensitive(true);
            value
        });
        let caller = Caller {
            request_id: id.clone(),
            method: method_of(&request),
            traceparent: request.headers().get("traceparent").cloned(),
            authorization: request.headers().get(http::header::AUTHORIZATION).cloned(),
        };
        request.extensions_mut().insert(id);
        // The layers' own `call` code logs within the call too.
        let inner = CALLER.sync_scope(caller.clone(), || {
            let _entered = span.enter();
            self.inner.call(request)
        });
        RequestIdFuture { inner: tracing::Instrument::instrument(CALLER.scope(caller, inner), span), header }
    }
}

/// What the handler of a call hands on to the calls it makes downstream
/// (see [`crate::clients`]): its request id, its caller's trace context and
/// credentials. The JSON log lines written while the call runs name its
/// request id and method from here too.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Sent on as `x-request-id`, so one id follows a request across hops.
    pub request_id: RequestId,
    /// The method being served, when a registered service has it.
    pub method: Option<Arc<MethodInfo>>,
    /// The caller's `traceparent`, passed on when no span of ours exports.
    pub traceparent: Option<HeaderValue>,
    /// The caller's `authorization`, for clients that propagate it.
    pub authorization: Option<HeaderValue>,
}

tokio::task_local! {
    /// The call handled on this task, for the clients it calls through.
    static CALLER: Caller;
}

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

/// Runs `future` with `caller` as its call (the gateway, for the log lines
/// it writes before and after its in-process call).
pub fn scope<F: Future>(caller: Caller, future: F) -> impl Future<Output = F::Output> {
    CALLER.scope(caller, future)
}

/// Reads the call this code runs for, inside a unary handler.
pub fn with_caller<R>(read: impl FnOnce(&Caller) -> R) -> Option<R> {
    CALLER.try_with(read).ok()
}

/// The call's span, for work that outlives the handler's future (response
/// bodies, stream producers).
#[derive(Clone, Debug)]
pub struct CallSpan(pub Span);

pin_project! {
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: Instrumented<tokio::task::futures::TaskLocalFuture<Caller, F>>,
        header: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(header)) = (&mut result, this.header.take()) {
            response.headers_mut().insert(HEADER, header);
        }
        Poll::Ready(result)
    }
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
