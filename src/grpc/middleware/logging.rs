//! One access line per call, written when the call ends (for a stream,
//! when its last message and status have gone out), with the method, the
//! gRPC code, the duration, the peer and the request id. The line itself is
//! formatted and queued by [`crate::telemetry::access`].
//!
//! The same layer records the server's `grpc_server_*` metrics (through
//! [`super::metrics::start_call`]): one clock reading, one response body
//! wrapper and one end-of-call callback serve both.

use std::task::{Context, Poll};
use std::time::Instant;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use tonic::Code;
use tower::{Layer, Service};
use tracing::Span;

use super::call::{ObservedBody, ObservedFuture, OnCallEnd};
use super::method::{MethodInfo, method_of};
use super::metrics::{CallMetrics, start_call};
use super::request_id::{CallSpan, RequestId};
use crate::grpc::incoming::GrpcConnectInfo;
use crate::telemetry::access;
use crate::tls::ClientIdentity;

#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingLayer;

impl<S> Layer<S> for LoggingLayer {
    type Service = Logging<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Logging { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Logging<S> {
    inner: S,
}

/// The pending log line of one call. It holds what it found on the
/// request as is; formatting waits until the line is written.
pub struct CallLog {
    method: Method,
    start: Instant,
    peer: Peer,
    request_id: Option<RequestId>,
    span: Option<Span>,
    /// The verified client certificate's identity (mTLS only).
    client: Option<Arc<ClientIdentity>>,
    /// The call's metrics; `None` for a method no service has.
    metrics: Option<CallMetrics>,
}

/// The method's path: shared with the method table when it is known.
enum Method {
    Known(Arc<MethodInfo>),
    Unknown(String),
}

/// Who called: the TCP peer, or for gateway calls (which arrive
/// in-process) the HTTP client from `x-forwarded-for`.
enum Peer {
    Tcp(SocketAddr),
    Forwarded(HeaderValue),
    Unknown,
}

impl CallLog {
    fn new<B>(
        request: &mut Request<B>,
        start: Instant,
        info: Option<Arc<MethodInfo>>,
        metrics: Option<CallMetrics>,
    ) -> Self {
        let connection = request.extensions().get::<GrpcConnectInfo>();
        let peer = match connection.and_then(|c| c.remote_addr) {
            Some(addr) => Peer::Tcp(addr),
            None => request.headers().get("x-forwarded-for").cloned().map_or(Peer::Unknown, Peer::Forwarded),
        };
        // The connection's identity, as the one extension type auth and
        // handlers read; gateway calls bring theirs from the HTTP side.
        let client = match connection.and_then(|c| c.client.clone()) {
            Some(client) => {
                request.extensions_mut().insert(client.clone());
                Some(client)
            }
            None => request.extensions().get::<Arc<ClientIdentity>>().cloned(),
        };
        let method = match info.filter(|m| m.metrics.is_some()) {
            Some(known) => Method::Known(known),
            None => Method::Unknown(request.uri().path().to_owned()),
        };
        Self {
            method,
            start,
            metrics,
            peer,
            request_id: request.extensions().get::<RequestId>().cloned(),
            span: request.extensions().get::<CallSpan>().map(|s| s.0.clone()),
            client,
        }
    }
}

impl OnCallEnd for CallLog {
    fn data(&mut self, bytes: &[u8]) {
        if let Some(metrics) = &mut self.metrics {
            metrics.data(bytes);
        }
    }

    fn call_ended(mut self, code: Code) {
        let duration = self.start.elapsed();
        if let Some(metrics) = self.metrics.take() {
            metrics.finish(code, duration);
        }
        let method = match &self.method {
            Method::Known(info) => info.path.as_str(),
            Method::Unknown(path) => path.as_str(),
        };
        access::record(&access::Entry {
            method,
            code,
            duration,
            peer: &self.peer,
            request_id: self.request_id.as_ref().map_or("", RequestId::as_str),
            span: self.span.as_ref(),
            client: self.client.as_deref().map(ClientIdentity::name),
        });
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Forwarded(value) => f.write_str(value.to_str().unwrap_or("invalid")),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

impl<S, ResBody> Service<Request<tonic::body::Body>> for Logging<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
{
    type Response = Response<ObservedBody<ResBody, CallLog>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future, CallLog>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let start = Instant::now();
        let info = method_of(&request);
        let (mut request, metrics) = start_call(request, info.as_deref(), false, start);
        let log = CallLog::new(&mut request, start, info, metrics);
        ObservedFuture::new(self.inner.call(request), Some(log), Code::Internal)
    }
}
