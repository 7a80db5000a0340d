//! The gRPC server's middleware: one module per concern, composed in a
//! fixed order by the one call layer in [`server`]. The client side's
//! metrics layer ([`metrics`]) shares the call bookkeeping in [`call`].

pub mod auth;
pub mod call;
pub mod deadline;
pub mod limits;
pub mod logging;
pub mod method;
pub mod metrics;
pub mod recover;
pub mod request_id;
pub mod server;
pub mod shed;
