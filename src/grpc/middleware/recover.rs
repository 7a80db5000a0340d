//! Panic recovery: a handler that panics answers INTERNAL, the panic is
//! logged, and the server keeps serving. Stream producers run under the
//! same guard (see `grpc::stream`).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::Status;
use tower::{Layer, Service};

/// The status a panicking handler answers with. Details stay in the log.
pub fn panic_status() -> Status {
    Status::internal("internal error")
}

/// The panic's message, for the log line.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

pin_project! {
    /// Polls a future, turning a panic into `Err(message)`.
    pub struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RecoverLayer;

impl<S> Layer<S> for RecoverLayer {
    type Service = Recover<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recover { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Recover<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Recover<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecoverFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // A panic while the call is being set up is caught here too. The
        // request-id span around this layer names the method in the log.
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(inner) => RecoverFuture { inner: Some(CatchUnwind::new(inner)) },
            Err(payload) => {
                tracing::error!(panic = %panic_message(payload.as_ref()), "handler panicked");
                RecoverFuture { inner: None }
            }
        }
    }
}

pin_project! {
    pub struct RecoverFuture<F> {
        #[pin]
        inner: Option<CatchUnwind<F>>,
    }
}

impl<F, ResBody, E> Future for RecoverFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Ok(panic_status().into_http()));
        };
        match inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(message)) => {
                tracing::error!(panic = %message, "handler panicked");
                Poll::Ready(Ok(panic_status().into_http()))
            }
        }
    }
}
