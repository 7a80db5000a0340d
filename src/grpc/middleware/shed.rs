//! Load shedding: past `grpc.max_concurrent_requests` calls in flight, a
//! new call is answered RESOURCE_EXHAUSTED at once rather than queued
//! without bound. A call is in flight until its response body (for a
//! stream, its last message) is done, or, for a stream, until a short
//! grace after its deadline: the call layer arms that timer with the
//! stream's [`ShedSlot`]. A client that never reads keeps hyper from ever
//! finishing (or dropping) the body, so only a timer can take the slot
//! back. Health checks are never shed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prometheus::IntCounter;
use tonic::Status;

use super::method::MethodInfo;

/// The shared budget of calls in flight.
#[derive(Clone, Debug)]
pub struct Shedder {
    limit: usize,
    in_flight: &'static AtomicUsize,
    /// `keel_grpc_requests_shed_total`, touched only when a call is refused.
    shed: IntCounter,
}

impl Shedder {
    pub fn new(limit: usize, shed: IntCounter) -> Self {
        // One count per server, for the life of the process: a call's
        // permit holds a plain reference to it, not a share of a reference
        // count that every call on every core would touch.
        Self { limit, in_flight: Box::leak(Box::new(AtomicUsize::new(0))), shed }
    }

    /// The count of calls holding a slot; read at scrape time for
    /// `keel_grpc_requests_in_flight`.
    pub fn in_flight(&self) -> &'static AtomicUsize {
        self.in_flight
    }

    /// A unit of the budget for a call of `method`, or the status to refuse
    /// it with. Exempt methods hold nothing.
    pub fn admit(&self, method: &MethodInfo) -> Result<Permit, Status> {
        if method.shed_exempt {
            return Ok(Permit(None));
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed.inc();
            return Err(Status::resource_exhausted("server overloaded: too many concurrent requests, retry later"));
        }
        // Unknown methods are answered at once, like unary calls.
        let held = if method.grpc_type.single_response() {
            Held::Count(self.in_flight)
        } else {
            Held::Slot(ShedSlot::new(self.in_flight))
        };
        Ok(Permit(Some(held)))
    }
}

/// One unit of the concurrency budget, returned when dropped.
pub struct Permit(Option<Held>);

impl Permit {
    /// The slot a timer may return early, for a call that streams its
    /// response.
    pub fn slot(&self) -> Option<&ShedSlot> {
        match &self.0 {
            Some(Held::Slot(slot)) => Some(slot),
            _ => None,
        }
    }
}

/// How a call holds its unit.
enum Held {
    /// A unary or client-streaming call: only its permit returns the unit,
    /// so the count itself is enough (no allocation per call).
    Count(&'static AtomicUsize),
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
/// the body ends, or earlier by a timer.
#[derive(Clone, Debug)]
pub struct ShedSlot(Arc<SlotState>);

#[derive(Debug)]
struct SlotState {
    in_flight: &'static AtomicUsize,
    released: AtomicBool,
}

impl ShedSlot {
    fn new(in_flight: &'static AtomicUsize) -> Self {
        Self(Arc::new(SlotState { in_flight, released: AtomicBool::new(false) }))
    }

    /// Returns the slot; later calls do nothing.
    pub fn release(&self) {
        if !self.0.released.swap(true, Ordering::AcqRel) {
            self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
