//! What every observing layer needs to know about a call: which method it
//! is, and how it ended. The end is the `grpc-status` of a trailers-only
//! response, or of the trailers after the last message, or `CANCELLED` when
//! the client went away before the body finished.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::HeaderMap;
use http::header::HeaderName;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

/// `grpc-status`, as a constant: a lookup by `&str` parses the name first.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Header maps up to this size are searched by walking them.
const WALKED: usize = 8;

/// The code in a `grpc-status` header, if there is one. Read twice per
/// call (the response headers, then the trailers), each holding a handful
/// of entries: walking them and comparing names costs a fraction of
/// hashing the name for a lookup. The first value counts, as with `get`.
pub fn status_code(headers: &HeaderMap) -> Option<Code> {
    let value = if headers.len() <= WALKED {
        headers.iter().find_map(|(name, value)| (*name == GRPC_STATUS).then_some(value))
    } else {
        headers.get(&GRPC_STATUS)
    };
    value.map(|v| Code::from_bytes(v.as_bytes()))
}

/// Receives the final code of a call exactly once, and optionally sees the
/// response bytes on the way.
pub trait OnCallEnd: Send + 'static {
    fn call_ended(self, code: Code);

    fn data(&mut self, _bytes: &[u8]) {}
}

/// Follows the 5-byte gRPC length prefixes of a byte stream across
/// arbitrary chunk boundaries: counts the messages, and reports the largest
/// length announced in each chunk (for the size limits).
#[derive(Debug, Default)]
pub struct MessageCounter {
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message's payload still to skip.
    remaining: u64,
    /// Messages whose prefix has been seen so far.
    pub messages: u64,
}

impl MessageCounter {
    /// Feeds one chunk; returns the largest message length announced in it.
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut largest = 0;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(bytes.len());
                bytes = &bytes[skip..];
                self.remaining -= skip as u64;
                continue;
            }
            let take = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == 5 {
                self.messages += 1;
                self.header_len = 0;
                self.remaining =
                    u64::from(u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]));
                largest = largest.max(self.remaining);
            }
        }
        largest
    }
}

pin_project! {
    /// A response body that reports how the call ended.
    pub struct ObservedBody<B, E: OnCallEnd> {
        #[pin]
        inner: B,
        on_end: Option<E>,
    }

    impl<B, E: OnCallEnd> PinnedDrop for ObservedBody<B, E> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the trailers: the client cancelled or vanished.
            if let Some(on_end) = this.project().on_end.take() {
                on_end.call_ended(Code::Cancelled);
            }
        }
    }
}

impl<B, E: OnCallEnd> ObservedBody<B, E> {
    /// `on_end` is `None` when the call already ended with the headers.
    pub fn new(inner: B, on_end: Option<E>) -> Self {
        Self { inner, on_end }
    }
}

impl<B, E> Body for ObservedBody<B, E>
where
    B: Body,
    B::Data: AsRef<[u8]>,
    E: OnCallEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let (Some(Ok(frame)), Some(on_end)) = (&frame, this.on_end.as_mut())
            && let Some(data) = frame.data_ref()
        {
            on_end.data(data.as_ref());
        }
        let ended = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|t| status_code(t).unwrap_or(Code::Unknown)),
            Some(Err(_)) => Some(Code::Internal),
            // A body that ends without trailers carries no status: for gRPC
            // that is an error, but it only happens after a trailers-only
            // response whose code was already taken from the headers.
            None => Some(Code::Unknown),
        };
        // Take the callback only once the call has ended: a data frame
        // must leave it in place.
        if let Some(code) = ended
            && let Some(on_end) = this.on_end.take()
        {
            on_end.call_ended(code);
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

pin_project! {
    /// Resolves to the response with its body observed: the callback gets
    /// the code at once for a trailers-only response (every error tonic
    /// returns from a handler), else when the body ends, or `on_error` if
    /// the inner service fails.
    pub struct ObservedFuture<F, E: OnCallEnd> {
        #[pin]
        inner: F,
        on_end: Option<E>,
        on_error: Code,
    }

    impl<F, E: OnCallEnd> PinnedDrop for ObservedFuture<F, E> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the handler answered: the client reset the
            // stream or went away. That is the client's doing, not a
            // server error.
            if let Some(on_end) = this.project().on_end.take() {
                on_end.call_ended(Code::Cancelled);
            }
        }
    }
}

impl<F, E: OnCallEnd> ObservedFuture<F, E> {
    pub fn new(inner: F, on_end: Option<E>, on_error: Code) -> Self {
        Self { inner, on_end, on_error }
    }
}

impl<F, B, Err, E> Future for ObservedFuture<F, E>
where
    F: Future<Output = Result<http::Response<B>, Err>>,
    E: OnCallEnd,
{
    type Output = Result<http::Response<ObservedBody<B, E>>, Err>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let on_end = this.on_end.take();
        Poll::Ready(match result {
            Ok(response) => {
                let on_end = match (status_code(response.headers()), on_end) {
                    (Some(code), Some(on_end)) => {
                        on_end.call_ended(code);
                        None
                    }
                    (_, on_end) => on_end,
                };
                Ok(response.map(|body| ObservedBody::new(body, on_end)))
            }
            Err(error) => {
                if let Some(on_end) = on_end {
                    on_end.call_ended(*this.on_error);
                }
                Err(error)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_code_reads_the_first_grpc_status_in_small_and_large_maps() {
        for padding in [0, 3, 6, 7, 8, 20] {
            let mut headers = HeaderMap::new();
            for i in 0..padding {
                headers.insert(HeaderName::try_from(format!("x-pad-{i}")).unwrap(), "v".parse().unwrap());
            }
            assert_eq!(status_code(&headers), None, "{padding} other headers");
            headers.append(GRPC_STATUS, "5".parse().unwrap());
            headers.append(GRPC_STATUS, "13".parse().unwrap());
            assert_eq!(status_code(&headers), Some(Code::NotFound), "{padding} other headers");
        }
    }

    #[test]
    fn counts_messages_across_chunk_boundaries() {
        let mut frames = Vec::new();
        for payload in [&b"abc"[..], b"", b"0123456789"] {
            frames.push(0u8);
            frames.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            frames.extend_from_slice(payload);
        }
        for chunk in 1..frames.len() {
            let mut counter = MessageCounter::default();
            for piece in frames.chunks(chunk) {
                counter.feed(piece);
            }
            assert_eq!(counter.messages, 3, "chunk size {chunk}");
        }
    }
}
