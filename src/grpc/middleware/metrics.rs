//! Client-side gRPC metrics (`grpc_client_*`, for the gateway's calls and
//! the downstream clients), recorded the way go-grpc-middleware does:
//! `started` when a call is sent, each message sent and received, and
//! `handled` with the final code and the handling time when it ends. A
//! stream the caller drops is `Canceled`. The server's own series are
//! recorded by its call layer ([`super::server`], through
//! [`super::logging`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};

use super::call::{MessageCounter, ObservedBody, ObservedFuture, OnCallEnd};
use super::method::{MethodInfo, MethodLookup};
use crate::metrics::MethodMetrics;

/// The client side's metrics layer.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    /// Resolves the method from the request path; holds its
    /// `grpc_client_*` series.
    methods: Arc<dyn MethodLookup>,
}

impl GrpcMetricsLayer {
    /// For a client channel; `table` holds its `grpc_client_*` series.
    pub fn client<L: MethodLookup>(table: Arc<L>) -> Self {
        Self { methods: table }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, methods: self.methods.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    methods: Arc<dyn MethodLookup>,
}

impl<S, ResBody> Service<Request<tonic::body::Body>> for GrpcMetrics<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
{
    type Response = Response<ObservedBody<ResBody, CallMetrics>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future, CallMetrics>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let info = self.methods.lookup(request.uri().path());
        let (request, call) = start_call(request, &info, Instant::now());
        // A failing inner service is a transport failure on the client side.
        ObservedFuture::new(self.inner.call(request), call, Code::Unavailable)
    }
}

/// Counts a call of `info` as started, and its request messages as they
/// are sent: the request back (its body counted when it streams) and what
/// records the rest when the call ends. `None` for calls of no measured
/// method.
fn start_call(
    request: Request<tonic::body::Body>,
    info: &MethodInfo,
    start: Instant,
) -> (Request<tonic::body::Body>, Option<CallMetrics>) {
    let Some(metrics) = info.metrics.clone() else {
        return (request, None);
    };
    metrics.started();
    let request = if info.grpc_type.single_request() {
        metrics.sent(1);
        request
    } else {
        let metrics = metrics.clone();
        request.map(|body| {
            tonic::body::Body::new(CountedBody { inner: body, metrics, counter: MessageCounter::default() })
        })
    };
    (request, Some(CallMetrics { metrics, start, counter: MessageCounter::default() }))
}

/// The response side of one measured call.
pub struct CallMetrics {
    metrics: MethodMetrics,
    start: Instant,
    counter: MessageCounter,
}

impl OnCallEnd for CallMetrics {
    fn data(&mut self, bytes: &[u8]) {
        self.counter.feed(bytes);
    }

    fn call_ended(self, code: Code) {
        // The response's messages are what the client received.
        self.metrics.received(self.counter.messages);
        self.metrics.handled(code, self.start.elapsed());
    }
}

pin_project! {
    /// A streaming request body whose messages are counted as they are
    /// sent.
    struct CountedBody<B> {
        #[pin]
        inner: B,
        metrics: MethodMetrics,
        counter: MessageCounter,
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body,
    B::Data: AsRef<[u8]>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            let before = this.counter.messages;
            this.counter.feed(data.as_ref());
            this.metrics.sent(this.counter.messages - before);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
