//! Load shedding: past `grpc.max_concurrent_requests` calls in flight, a
//! new call is answered RESOURCE_EXHAUSTED at once rather than queued
//! without bound. A call is in flight until its response body (for a
//! stream, its last message) is done, or, for a stream, until a short
//! grace after its deadline: the deadline layer arms that timer through the
//! [`ShedSlot`] left in the request extensions. A client that never reads
//! keeps hyper from ever finishing (or dropping) the body, so only a timer
//! can take the slot back. Health checks are never shed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus::IntCounter;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::call::{ObservedBody, OnCallEnd};
use super::method::method_of;

#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    limit: usize,
    in_flight: Arc<AtomicUsize>,
    /// `keel_grpc_requests_shed_total`, touched only when a call is refused.
    shed: IntCounter,
}

impl LoadShedLayer {
    pub fn new(limit: usize, shed: IntCounter) -> Self {
        Self { limit, in_flight: Arc::new(AtomicUsize::new(0)), shed }
    }

    /// The count of calls holding a slot, shared with every service this
    /// layer builds; read at scrape time for `keel_grpc_requests_in_flight`.
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed { inner, limit: self.limit, in_flight: self.in_flight.clone(), shed: self.shed.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct LoadShed<S> {
    inner: S,
    limit: usize,
    in_flight: Arc<AtomicUsize>,
    shed: IntCounter,
}

/// One unit of the concurrency budget, returned when dropped.
pub struct Permit(Option<Held>);

/// How a call holds its unit.
enum Held {
    /// A unary or client-streaming call: only its permit returns the unit,
    /// so the count itself is enough (no allocation per call).
    Count(Arc<AtomicUsize>),
    /// A call that streams its response: a timer may return the unit
    /// first, so the permit and the timer share a slot.
    Slot(ShedSlot),
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.0.take() {
            Some(Held::Count(in_flight)) => {
                in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            Some(Held::Slot(slot)) => slot.release(),
            None => {}
        }
    }
}

/// A streaming call's slot in the budget, returned once: by the permit when
/// the body ends, or earlier by a timer. In the request extensions of shed
/// calls that stream their response.
#[derive(Clone, Debug)]
pub struct ShedSlot(Arc<SlotState>);

#[derive(Debug)]
struct SlotState {
    in_flight: Arc<AtomicUsize>,
    released: AtomicBool,
}

impl ShedSlot {
    fn new(in_flight: Arc<AtomicUsize>) -> Self {
        Self(Arc::new(SlotState { in_flight, released: AtomicBool::new(false) }))
    }

    /// Returns the slot; later calls do nothing.
    pub fn release(&self) {
        if !self.0.released.swap(true, Ordering::AcqRel) {
            self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl OnCallEnd for Permit {
    fn call_ended(self, _: Code) {}
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for LoadShed<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ObservedBody<ResBody, Permit>>;
    type Error = S::Error;
    type Future = LoadShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let method = method_of(&request);
        if method.as_ref().is_some_and(|m| m.shed_exempt) {
            return LoadShedFuture { inner: Some(self.inner.call(request)), permit: Some(Permit(None)) };
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed.inc();
            return LoadShedFuture { inner: None, permit: None };
        }
        // Unknown methods are answered at once, like unary calls.
        let held = if method.is_none_or(|m| m.grpc_type.single_response()) {
            Held::Count(self.in_flight.clone())
        } else {
            let slot = ShedSlot::new(self.in_flight.clone());
            request.extensions_mut().insert(slot.clone());
            Held::Slot(slot)
        };
        LoadShedFuture { inner: Some(self.inner.call(request)), permit: Some(Permit(Some(held))) }
    }
}

pin_project! {
    pub struct LoadShedFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<Permit>,
    }
}

impl<F, ResBody, E> Future for LoadShedFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ObservedBody<ResBody, Permit>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let status = Status::resource_exhausted("server overloaded: too many concurrent requests, retry later");
            return Poll::Ready(Ok(status.into_http::<ResBody>().map(|b| ObservedBody::new(b, None))));
        };
        let response = ready!(inner.poll(cx))?;
        let permit = this.permit.take();
        Poll::Ready(Ok(response.map(|body| ObservedBody::new(body, permit))))
    }
}
