//! Server streams over HTTP: newline-delimited JSON by default
//! (`{"result": …}` per message, `{"error": …}` if the stream fails, as
//! grpc-gateway writes them), or Server-Sent Events when the client accepts
//! `text/event-stream`. Frames go out as messages arrive; dropping the body
//! (the HTTP client left) drops the upstream call, which cancels it.
//!
//! A stream of `google.api.HttpBody` is one raw body instead: each
//! message's `data` is the next chunk. It has no in-band error form, so a
//! failure after the first chunk aborts the body, which the client sees as
//! a truncated response rather than a complete one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use prost_reflect::DynamicMessage;
use tokio::time::{Instant, Interval, Sleep};
use tokio_stream::Stream;
use tonic::{Code, Status, Streaming};

use super::error::GatewayError;
use super::transcode::Transcoding;

/// How a stream is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    NdJson,
    Sse,
    /// `google.api.HttpBody` chunks, unframed.
    Raw,
}

impl Framing {
    pub fn negotiate(headers: &HeaderMap) -> Self {
        let wants_sse = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().starts_with("text/event-stream"));
        if wants_sse { Self::Sse } else { Self::NdJson }
    }

    /// The Content-Type of the framing; a raw body's comes from its
    /// messages.
    pub fn content_type(self) -> Option<HeaderValue> {
        match self {
            Self::NdJson => Some(HeaderValue::from_static("application/x-ndjson")),
            Self::Sse => Some(HeaderValue::from_static("text/event-stream")),
            Self::Raw => None,
        }
    }
}

/// The HTTP body of one server stream.
pub struct FramedStream {
    upstream: Option<Streaming<DynamicMessage>>,
    transcoding: Arc<Transcoding>,
    framing: Framing,
    /// SSE comments that keep proxies from timing the connection out.
    keepalive: Option<Interval>,
    /// The call's deadline, enforced here too in case the server does not.
    deadline: Pin<Box<Sleep>>,
    /// A message read before the headers were sent, to go out first.
    first: Option<DynamicMessage>,
}

/// Why a raw body was cut short.
#[derive(Debug, thiserror::Error)]
#[error("the HttpBody stream failed: {0}")]
pub struct RawStreamError(String);

impl FramedStream {
    pub fn new(
        upstream: Streaming<DynamicMessage>,
        transcoding: Arc<Transcoding>,
        framing: Framing,
        deadline: Instant,
        keepalive: Duration,
    ) -> Self {
        let keepalive = (framing == Framing::Sse && !keepalive.is_zero()).then(|| {
            let mut interval = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        Self {
            upstream: Some(upstream),
            transcoding,
            framing,
            keepalive,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            first: None,
        }
    }

    /// Sends `first` before anything read from upstream.
    #[must_use]
    pub fn starting_with(mut self, first: Option<DynamicMessage>) -> Self {
        self.first = first;
        self
    }

    fn message_frame(&self, message: &DynamicMessage) -> Result<Bytes, GatewayError> {
        if self.framing == Framing::Raw {
            return self.transcoding.raw_response(message).map(|(_, data)| data);
        }
        let json = self.transcoding.response(message)?;
        let mut frame = BytesMut::with_capacity(json.len() + 16);
        match self.framing {
            Framing::NdJson => {
                frame.put_slice(b"{\"result\":");
                frame.put_slice(&json);
                frame.put_slice(b"}\n");
            }
            Framing::Sse | Framing::Raw => {
                frame.put_slice(b"data: ");
                frame.put_slice(&json);
                frame.put_slice(b"\n\n");
            }
        }
        Ok(frame.freeze())
    }

    fn error_frame(&self, error: &GatewayError) -> Result<Bytes, RawStreamError> {
        let body = error.to_json(self.transcoding.output.parent_pool());
        match self.framing {
            Framing::NdJson => Ok(Bytes::from(format!("{}\n", serde_json::json!({ "error": body })))),
            Framing::Sse => Ok(Bytes::from(format!("event: error\ndata: {body}\n\n"))),
            Framing::Raw => Err(RawStreamError(error.to_string())),
        }
    }
}

impl Stream for FramedStream {
    type Item = Result<Bytes, RawStreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(match self.message_frame(&first) {
                Ok(frame) => Ok(frame),
                Err(error) => {
                    self.upstream = None;
                    self.error_frame(&error)
                }
            }));
        }
        let Some(upstream) = self.upstream.as_mut() else { return Poll::Ready(None) };
        match Pin::new(upstream).poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => {
                let frame = self.message_frame(&message);
                return Poll::Ready(Some(match frame {
                    Ok(frame) => Ok(frame),
                    Err(error) => {
                        self.upstream = None;
                        self.error_frame(&error)
                    }
                }));
            }
            Poll::Ready(Some(Err(status))) => {
                self.upstream = None;
                return Poll::Ready(Some(self.error_frame(&GatewayError::Upstream(status))));
            }
            Poll::Ready(None) => {
                self.upstream = None;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            // Dropping the upstream cancels the call.
            self.upstream = None;
            let status = Status::new(Code::DeadlineExceeded, "deadline exceeded");
            return Poll::Ready(Some(self.error_frame(&GatewayError::Upstream(status))));
        }
        if let Some(keepalive) = self.keepalive.as_mut()
            && keepalive.poll_tick(cx).is_ready()
        {
            return Poll::Ready(Some(Ok(Bytes::from_static(b": keep-alive\n\n"))));
        }
        Poll::Pending
    }
}
