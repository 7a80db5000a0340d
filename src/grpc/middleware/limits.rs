//! Message size limits, enforced here for every registered service alike:
//! `grpc.max_decoding_message_size` on each request message and
//! `grpc.max_encoding_message_size` on each response message, read from the
//! gRPC length prefixes as the bytes pass. Generated tonic servers only get
//! limits when each one is configured by hand, and report a violation as
//! OUT_OF_RANGE; gRPC (and grpc-go) use RESOURCE_EXHAUSTED, which clients and
//! dashboards expect, with a message naming the setting. A method that takes
//! one request message and receives a second fails as grpc-go fails it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::call::MessageCounter;
use super::method::method_of;

/// How a request body that the transport cut off is marked, for `rewrite`.
const CLIENT_GONE: &str = "the client went away before the request ended";

#[derive(Clone, Copy, Debug)]
pub struct SizeLimitLayer {
    decoding: usize,
    encoding: usize,
}

impl SizeLimitLayer {
    pub fn new(decoding: usize, encoding: usize) -> Self {
        Self { decoding, encoding }
    }

    fn too_large_request(&self) -> Status {
        Status::resource_exhausted(format!(
            "request message larger than grpc.max_decoding_message_size ({} bytes)",
            self.decoding
        ))
    }

    fn too_large_response(&self) -> Status {
        Status::resource_exhausted(format!(
            "response message larger than grpc.max_encoding_message_size ({} bytes)",
            self.encoding
        ))
    }

    /// Replaces tonic's own size violation (a service that kept a limit of
    /// its own), and the status of a call whose client went away before its
    /// request ended, if that is what `headers` carry.
    fn rewrite(&self, headers: &mut HeaderMap) {
        match headers.get("grpc-status").map(|v| v.as_bytes()) {
            Some(b"11") => {}
            Some(b"2") => {
                let Some(status) = Status::from_header_map(headers) else { return };
                if status.message().starts_with(CLIENT_GONE) {
                    headers.remove("grpc-status");
                    headers.remove("grpc-message");
                    let _ = Status::new(Code::Cancelled, status.message()).add_header(headers);
                }
                return;
            }
            _ => return,
        }
        let Some(status) = Status::from_header_map(headers) else { return };
        let replacement = if status.message().starts_with("Error, decoded message length too large") {
            self.too_large_request()
        } else if status.message().starts_with("Error, encoded message length too large") {
            self.too_large_response()
        } else {
            return;
        };
        headers.remove("grpc-status");
        headers.remove("grpc-message");
        let _ = Status::new(Code::ResourceExhausted, replacement.message()).add_header(headers);
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

impl<S, ResBody> Service<Request<tonic::body::Body>> for SizeLimit<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
{
    type Response = Response<LimitedBody<ResBody>>;
    type Error = S::Error;
    type Future = SizeLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let limits = self.limits;
        let single = method_of(&request).is_some_and(|m| m.grpc_type.single_request());
        // An oversized request message fails the body before the service's
        // decoder sees its prefix; tonic turns that error into the status.
        let request = request.map(|inner| {
            tonic::body::Body::new(LimitedRequest {
                inner,
                frames: MessageCounter::default(),
                limits,
                single,
                failed: false,
            })
        });
        SizeLimitFuture { inner: self.inner.call(request), limits }
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
        Poll::Ready(Ok(response.map(|inner| LimitedBody {
            inner,
            limits,
            frames: MessageCounter::default(),
            done: false,
        })))
    }
}

pin_project! {
    /// A request body that fails once a message exceeds the decoding limit.
    struct LimitedRequest<B> {
        #[pin]
        inner: B,
        frames: MessageCounter,
        limits: SizeLimitLayer,
        // The method takes exactly one request message (unary or server
        // streaming): a second one is a protocol violation.
        single: bool,
        failed: bool,
    }
}

impl<B> Body for LimitedRequest<B>
where
    B: Body<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Err(status)) = &frame {
            // The transport failed while the request was still arriving: the
            // client reset the stream or closed the connection. That is the
            // client going away, CANCELLED as in grpc-go, not the UNKNOWN
            // tonic would report, which counts against the error budget
            // (load tools end every run this way). tonic reads a CANCELLED
            // body error as a clean end (and then fails the call INTERNAL),
            // so the error is marked here and its status rewritten on the
            // way out, in `rewrite`.
            *this.failed = true;
            let message = format!("{CLIENT_GONE}: {}", status.message());
            return Poll::Ready(Some(Err(Status::unknown(message))));
        }
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            if this.frames.feed(data) > this.limits.decoding as u64 {
                *this.failed = true;
                return Poll::Ready(Some(Err(this.limits.too_large_request())));
            }
            if *this.single && this.frames.messages > 1 {
                // grpc-go answers the same, with the same code.
                *this.failed = true;
                return Poll::Ready(Some(Err(Status::internal(
                    "cardinality violation: expected one request message, received more",
                ))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A response body that ends with RESOURCE_EXHAUSTED trailers instead of
    /// a message over the encoding limit, and rewrites tonic's own size
    /// statuses in the trailers.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        limits: SizeLimitLayer,
        frames: MessageCounter,
        done: bool,
    }
}

impl<B: Body> Body for LimitedBody<B>
where
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
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    this.limits.rewrite(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => {
                    let too_large = frame
                        .data_ref()
                        .is_some_and(|data| this.frames.feed(data.as_ref()) > this.limits.encoding as u64);
                    if !too_large {
                        return frame;
                    }
                    // tonic writes whole messages per chunk, so what went
                    // before this one is complete; end the call here.
                    *this.done = true;
                    let mut trailers = HeaderMap::new();
                    let _ = this.limits.too_large_response().add_header(&mut trailers);
                    Frame::trailers(trailers)
                }
            })
        }))
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
    fn finds_the_largest_prefix_across_chunks() {
        let mut bytes = Vec::new();
        for len in [3u32, 70_000, 10] {
            bytes.push(0);
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for chunk in [1, 2, 5, 7, 1000, bytes.len()] {
            let mut frames = MessageCounter::default();
            let largest = bytes.chunks(chunk).map(|piece| frames.feed(piece)).max();
            assert_eq!(largest, Some(70_000), "chunk size {chunk}");
        }
    }
}
