//! Request ids: taken from `x-request-id` or generated, echoed in the
//! response metadata, and carried by a tracing span so every log line of
//! the call, in every layer and in the handler, names it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;
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

    pub fn generate() -> Self {
        Self(Arc::from(uuid::Uuid::new_v4().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
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
        let span = tracing::info_span!(
            "rpc",
            request_id = %id.as_str(),
            grpc.method = %request.uri().path(),
            trace_id = tracing::field::Empty,
        );
        // A call through the gateway continues the gateway's trace.
        crate::telemetry::continue_trace(&span, request.headers());
        let header = HeaderValue::from_str(id.as_str()).ok();
        request.extensions_mut().insert(id);
        request.extensions_mut().insert(CallSpan(span.clone()));
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        RequestIdFuture { inner: tracing::Instrument::instrument(inner, span), header }
    }
}

/// The call's span, for work that outlives the handler's future (response
/// bodies, stream producers).
#[derive(Clone, Debug)]
pub struct CallSpan(pub Span);

pin_project! {
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: Instrumented<F>,
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
}
