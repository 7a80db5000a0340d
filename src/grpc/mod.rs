//! The gRPC server: health, reflection (v1 and v1alpha), the application
//! services, and the ordered layer stack they all sit behind.

pub mod incoming;
pub mod middleware;
pub mod stream;

use std::future::Future;

use tonic::transport::Server;

use crate::config::GrpcSettings;
use crate::health::Health;
use crate::proto::user::v1::user_service_server::UserServiceServer;
use crate::users::Users;
use crate::users::store::Store;
use incoming::Incoming;
use middleware::logging::LoggingLayer;

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves every gRPC service on `incoming` until `stop` resolves, then sends
/// GOAWAY and waits for open calls to finish (the caller bounds that wait).
pub async fn serve<S: Store>(
    incoming: Incoming,
    settings: GrpcSettings,
    health: Health,
    users: Users<S>,
    stop: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    // Both reflection versions describe the same set, each other included,
    // so v1 and v1alpha clients see an identical service list.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let users = UserServiceServer::new(users)
        .max_decoding_message_size(settings.max_decoding_message_size.0)
        .max_encoding_message_size(settings.max_encoding_message_size.0);

    Server::builder()
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .max_concurrent_streams(settings.max_concurrent_streams)
        // Outermost first. Logging wraps everything so the line it writes
        // carries the code the client really received.
        .layer(LoggingLayer)
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(users)
        .serve_with_incoming_shutdown(incoming, stop)
        .await?;
    Ok(())
}
