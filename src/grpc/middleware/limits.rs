//! Message size limits. tonic enforces `grpc.max_decoding_message_size` and
//! `grpc.max_encoding_message_size` but reports a violation as OUT_OF_RANGE;
//! gRPC (and grpc-go) use RESOURCE_EXHAUSTED, which clients and dashboards
//! expect, so this layer rewrites those statuses with a message naming the
//! setting.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug)]
pub struct SizeLimitLayer {
    decoding: usize,
    encoding: usize,
}

impl SizeLimitLayer {
    pub fn new(decoding: usize, encoding: usize) -> Self {
        Self { decoding, encoding }
    }

    /// Replaces tonic's size violation, if that is what `headers` carry.
    fn rewrite(&self, headers: &mut HeaderMap) {
        if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
            return;
        }
        let Some(status) = Status::from_header_map(headers) else { return };
        let replacement = if status.message().starts_with("Error, decoded message length too large") {
            format!("request message larger than grpc.max_decoding_message_size ({} bytes)", self.decoding)
        } else if status.message().starts_with("Error, encoded message length too large") {
            format!("response message larger than grpc.max_encoding_message_size ({} bytes)", self.encoding)
        } else {
            return;
        };
        headers.remove("grpc-status");
        headers.remove("grpc-message");
        let _ = Status::new(Code::ResourceExhausted, replacement).add_header(headers);
    }
}

impl<S> Layer<S> for SizeLimitLayer {
    type Service = SizeLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimit { inner, limits: *self }
    }
}

#[derive(Clone, Debug)]
pub struct SizeLimit<S> {
    inner: S,
    limits: SizeLimitLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SizeLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<LimitedBody<ResBody>>;
    type Error = S::Error;
    type Future = SizeLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        SizeLimitFuture { inner: self.inner.call(request), limits: self.limits }
    }
}

pin_project! {
    pub struct SizeLimitFuture<F> {
        #[pin]
        inner: F,
        limits: SizeLimitLayer,
    }
}

impl<F, ResBody, E> Future for SizeLimitFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<LimitedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        this.limits.rewrite(response.headers_mut());
        let limits = *this.limits;
        Poll::Ready(Ok(response.map(|inner| LimitedBody { inner, limits })))
    }
}

pin_project! {
    /// Rewrites the status in the trailers the same way.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        limits: SizeLimitLayer,
    }
}

impl<B: Body> Body for LimitedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    this.limits.rewrite(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
