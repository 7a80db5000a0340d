//! Streams of services that do not run on the stream plumbing (tonic's
//! reflection, whose bidi streams grpcui and Evans keep open) end like
//! every other stream: at their deadline with DEADLINE_EXCEEDED, and with
//! UNAVAILABLE as soon as draining begins, instead of holding shutdown to
//! its bound. The response body is wrapped; ending it drops the inner
//! stream, which stops the service's task.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use super::middleware::deadline::current_deadline;
use crate::shutdown::Shutdown;

/// Wraps a service so its response streams end at their deadline or when
/// draining begins.
#[derive(Clone)]
pub struct Bounded<S> {
    inner: S,
    shutdown: Shutdown,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, shutdown: Shutdown) -> Self {
        Self { inner, shutdown }
    }
}

impl<S: NamedService> NamedService for Bounded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<Body>> for Bounded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shutdown = self.shutdown.clone();
        // Ending the response alone leaves the HTTP/2 stream half open while
        // the service waits for the client's next message, and an open
        // stream holds the connection's graceful close. So the request side
        // ends too, which ends the service's task and resets the stream.
        let stop = CancellationToken::new();
        let request = {
            let stop = stop.clone();
            request.map(move |inner| Body::new(StoppableRequest { inner, stop: Box::pin(stop.cancelled_owned()) }))
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            // Read here, not in `call`: the call's deadline is in scope
            // while its future runs.
            let deadline = current_deadline();
            let response = response.await?;
            let ends: Pin<Box<dyn Future<Output = Status> + Send>> = Box::pin(async move {
                let deadline = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let status = tokio::select! {
                    () = shutdown.draining() => Status::unavailable("server shutting down"),
                    () = deadline => Status::deadline_exceeded("deadline exceeded"),
                };
                stop.cancel();
                status
            });
            Ok(response.map(|inner| Body::new(BoundedBody { inner: Some(Box::pin(inner)), ends })))
        })
    }
}

/// A request body that ends early (as if the client had finished) once
/// `stop` fires.
struct StoppableRequest {
    inner: Body,
    stop: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl http_body::Body for StoppableRequest {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

/// A response body that ends with the status `ends` yields, if that comes
/// first.
struct BoundedBody<B> {
    inner: Option<Pin<Box<B>>>,
    ends: Pin<Box<dyn Future<Output = Status> + Send>>,
}

impl<B> http_body::Body for BoundedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        if let Poll::Ready(frame) = inner.as_mut().poll_frame(cx) {
            if frame.is_none() {
                self.inner = None;
            }
            return Poll::Ready(frame.map(|f| f.map_err(|e| Status::from_error(e.into()))));
        }
        match self.ends.as_mut().poll(cx) {
            Poll::Ready(status) => {
                // Dropping the inner body ends the service's stream.
                self.inner = None;
                let mut trailers = HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), |inner| inner.size_hint())
    }
}
