//! One structured log line per call, written when the call ends (for a
//! stream, when its last message and status have gone out), with the method,
//! the gRPC code, the duration, the peer and the request id, inside the
//! call's span.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::Code;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Span;

use super::call::{ObservedBody, OnCallEnd, code_name, status_code};
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
    type Future = LoggingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let log = CallLog::new(&request);
        LoggingFuture { inner: self.inner.call(request), log: Some(log) }
    }
}

pin_project! {
    pub struct LoggingFuture<F> {
        #[pin]
        inner: F,
        log: Option<CallLog>,
    }
}

impl<F, ResBody, E> Future for LoggingFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ObservedBody<ResBody, CallLog>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let log = this.log.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (every error tonic returns from a
                // handler) has ended already.
                let log = match (status_code(response.headers()), log) {
                    (Some(code), Some(log)) => {
                        log.call_ended(code);
                        None
                    }
                    (None, log) => log,
                    (Some(_), None) => None,
                };
                Ok(response.map(|body| ObservedBody::new(body, log)))
            }
            Err(error) => {
                if let Some(log) = log {
                    log.call_ended(Code::Internal);
                }
                Err(error)
            }
        })
    }
}
