//! One structured log line per call, written when the call ends (for a
//! stream, when its last message and status have gone out), with the method,
//! the gRPC code, the duration, the peer and the request id, inside the
//! call's span.

use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::Code;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Span;

use super::call::{ObservedBody, ObservedFuture, OnCallEnd, code_name};
use super::request_id::{CallSpan, RequestId};

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

/// The pending log line of one call.
pub struct CallLog {
    path: String,
    start: Instant,
    peer: Option<String>,
    request_id: Option<RequestId>,
    span: Option<Span>,
}

impl CallLog {
    fn new<B>(request: &Request<B>) -> Self {
        // Gateway calls arrive in-process; their peer is the HTTP client.
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map(|addr| addr.to_string())
            .or_else(|| request.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).map(str::to_owned));
        Self {
            path: request.uri().path().to_owned(),
            start: Instant::now(),
            peer,
            request_id: request.extensions().get::<RequestId>().cloned(),
            span: request.extensions().get::<CallSpan>().map(|s| s.0.clone()),
        }
    }
}

impl OnCallEnd for CallLog {
    fn call_ended(self, code: Code) {
        let _entered = self.span.as_ref().map(Span::enter);
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let code_name = code_name(code);
        let peer = self.peer.as_deref().unwrap_or("unknown");
        let request_id = self.request_id.as_ref().map_or("", RequestId::as_str);
        if is_server_fault(code) {
            tracing::warn!(grpc.method = %self.path, grpc.code = code_name, duration_ms, peer, request_id, "rpc finished");
        } else {
            tracing::info!(grpc.method = %self.path, grpc.code = code_name, duration_ms, peer, request_id, "rpc finished");
        }
    }
}

/// Codes that point at the server rather than the caller.
fn is_server_fault(code: Code) -> bool {
    matches!(code, Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Logging<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ObservedBody<ResBody, CallLog>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future, CallLog>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let log = CallLog::new(&request);
        ObservedFuture::new(self.inner.call(request), Some(log), Code::Internal)
    }
}
