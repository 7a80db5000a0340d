//! Message size limits, enforced by the server's call layer
//! ([`super::server`]) for every registered service alike:
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
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};

use super::call::{GRPC_STATUS, MessageCounter, status_code};
use crate::metrics::MethodMetrics;

/// How a request body that the transport cut off is marked, for `rewrite`.
const CLIENT_GONE: &str = "the client went away before the request ended";

/// `grpc.max_decoding_message_size` and `grpc.max_encoding_message_size`.
#[derive(Clone, Copy, Debug)]
pub struct SizeLimits {
    decoding: usize,
    encoding: usize,
}

impl SizeLimits {
    pub fn new(decoding: usize, encoding: usize) -> Self {
        Self { decoding, encoding }
    }

    /// Whether a response message of `len` bytes may go out.
    pub fn response_fits(&self, len: u64) -> bool {
        len <= self.encoding as u64
    }

    /// The request body as the service sees it: it fails with
    /// RESOURCE_EXHAUSTED once a message exceeds the decoding limit, with
    /// INTERNAL on a second message of a single-request method, and counts
    /// the messages of a streaming request into `metrics` as they arrive.
    pub fn request_body(
        &self,
        inner: tonic::body::Body,
        single: bool,
        metrics: Option<MethodMetrics>,
    ) -> tonic::body::Body {
        tonic::body::Body::new(RequestBody {
            inner,
            frames: MessageCounter::default(),
            limits: *self,
            single,
            failed: false,
            metrics,
        })
    }

    fn too_large_request(&self) -> Status {
        Status::resource_exhausted(format!(
            "request message larger than grpc.max_decoding_message_size ({} bytes)",
            self.decoding
        ))
    }

    pub fn too_large_response(&self) -> Status {
        Status::resource_exhausted(format!(
            "response message larger than grpc.max_encoding_message_size ({} bytes)",
            self.encoding
        ))
    }

    /// Replaces tonic's own size violation (a service that kept a limit of
    /// its own), and the status of a call whose client went away before its
    /// request ended, if that is what `headers` carry.
    /// Returns the code `headers` end up with, if they carry one.
    pub fn rewrite(&self, headers: &mut HeaderMap) -> Option<Code> {
        let code = status_code(headers)?;
        let (code, message) = match code {
            Code::OutOfRange => {
                let Some(status) = Status::from_header_map(headers) else { return Some(code) };
                let replacement = if status.message().starts_with("Error, decoded message length too large") {
                    self.too_large_request()
                } else if status.message().starts_with("Error, encoded message length too large") {
                    self.too_large_response()
                } else {
                    return Some(code);
                };
                (Code::ResourceExhausted, replacement.message().to_owned())
            }
            Code::Unknown => {
                let Some(status) = Status::from_header_map(headers) else { return Some(code) };
                if !status.message().starts_with(CLIENT_GONE) {
                    return Some(code);
                }
                (Code::Cancelled, status.message().to_owned())
            }
            _ => return Some(code),
        };
        headers.remove(&GRPC_STATUS);
        headers.remove("grpc-message");
        let _ = Status::new(code, message).add_header(headers);
        Some(code)
    }
}

pin_project! {
    /// A request body that fails once a message exceeds the decoding limit.
    struct RequestBody<B> {
        #[pin]
        inner: B,
        frames: MessageCounter,
        limits: SizeLimits,
        // The method takes exactly one request message (unary or server
        // streaming): a second one is a protocol violation.
        single: bool,
        failed: bool,
        // A streaming request's series, counting each message received
        // (a single request is counted when the call starts).
        metrics: Option<MethodMetrics>,
    }
}

impl<B> Body for RequestBody<B>
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
            let before = this.frames.messages;
            if this.frames.feed(data) > this.limits.decoding as u64 {
                *this.failed = true;
                return Poll::Ready(Some(Err(this.limits.too_large_request())));
            }
            if let Some(metrics) = this.metrics {
                metrics.received(this.frames.messages - before);
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
