//! What every observing layer needs to know about a call: which method it
//! is, and how it ended. The end is the `grpc-status` of a trailers-only
//! response, or of the trailers after the last message, or `CANCELLED` when
//! the client went away before the body finished.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

/// The `/package.Service/Method` path split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodName<'a> {
    pub service: &'a str,
    pub method: &'a str,
}

impl<'a> MethodName<'a> {
    pub fn parse(path: &'a str) -> Option<Self> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some(Self { service, method })
    }
}

/// The code in a `grpc-status` header, if there is one.
pub fn status_code(headers: &HeaderMap) -> Option<Code> {
    headers.get("grpc-status").map(|v| Code::from_bytes(v.as_bytes()))
}

/// The code as grpc-go spells it (`OK`, `Canceled`, `NotFound`, ...), the
/// spelling Prometheus dashboards and log queries built for Go services use.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Receives the final code of a call exactly once.
pub trait OnCallEnd: Send + 'static {
    fn call_ended(self, code: Code);
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
    E: OnCallEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let ended = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|t| status_code(t).unwrap_or(Code::Unknown)),
            Some(Err(_)) => Some(Code::Internal),
            // A body that ends without trailers carries no status: for gRPC
            // that is an error, but it only happens after a trailers-only
            // response whose code was already taken from the headers.
            None => Some(Code::Unknown),
        };
        if let (Some(code), Some(on_end)) = (ended, this.on_end.take()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_method_paths() {
        assert_eq!(
            MethodName::parse("/user.v1.UserService/GetUser"),
            Some(MethodName { service: "user.v1.UserService", method: "GetUser" })
        );
        assert_eq!(MethodName::parse("/nope"), None);
        assert_eq!(MethodName::parse("//x"), None);
        assert_eq!(MethodName::parse("/a/b/c"), None);
    }
}
