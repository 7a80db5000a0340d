//! Tower layers of the gRPC server, one concern each. The order they run in
//! is set in one place, `grpc::serve`.

pub mod call;
pub mod deadline;
pub mod logging;
