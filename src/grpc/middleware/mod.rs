//! Tower layers of the gRPC server, one concern each. The order they run in
//! is set in one place, `grpc::serve`.

pub mod auth;
pub mod call;
pub mod deadline;
pub mod limits;
pub mod logging;
pub mod method;
pub mod metrics;
pub mod recover;
pub mod request_id;
pub mod shed;
