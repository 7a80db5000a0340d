//! The gRPC server: health, reflection (v1 and v1alpha), the application
//! services, and the ordered layer stack they all sit behind.

pub mod incoming;
pub mod middleware;
pub mod stream;

use std::future::Future;
use std::sync::Arc;

use tonic::transport::Server;
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;

use crate::config::GrpcSettings;
use crate::health::Health;
use crate::proto::user::v1::user_service_server::UserServiceServer;
use crate::users::Users;
use crate::users::store::Store;
use incoming::Incoming;
use middleware::auth::{AuthLayer, Authenticator};
use middleware::deadline::DeadlineLayer;
use middleware::limits::SizeLimitLayer;
use middleware::logging::LoggingLayer;
use middleware::method::MethodTable;
use middleware::metrics::GrpcMetricsLayer;
use middleware::recover::RecoverLayer;
use middleware::request_id::RequestIdLayer;
use middleware::shed::LoadShedLayer;

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Services other than the application's that the server registers.
pub const INFRASTRUCTURE_SERVICES: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// The descriptor sets of every service the server registers.
pub fn descriptor_sets() -> [&'static [u8]; 4] {
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
}

/// What the layer stack needs besides the settings.
pub struct Stack {
    pub methods: Arc<MethodTable>,
    pub auth: Authenticator,
    /// Services besides the built-in ones.
    pub extra_routes: Option<tonic::service::Routes>,
    /// Runs the health service's `Watch` streams.
    pub streams: stream::StreamSpawner,
}

/// Serves every gRPC service on `incoming` until `stop` resolves, then sends
/// GOAWAY and waits for open calls to finish (the caller bounds that wait).
pub async fn serve<S: Store>(
    incoming: Incoming,
    settings: GrpcSettings,
    stack: Stack,
    health: Health,
    users: Users<S>,
    stop: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    // Both reflection versions describe the same set, each other included,
    // so v1 and v1alpha clients see an identical service list.
    let reflection = || {
        let [own, health, v1, v1alpha] = descriptor_sets();
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(own)
            .register_encoded_file_descriptor_set(health)
            .register_encoded_file_descriptor_set(v1)
            .register_encoded_file_descriptor_set(v1alpha)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let users = UserServiceServer::new(users)
        .max_decoding_message_size(settings.max_decoding_message_size.0)
        .max_encoding_message_size(settings.max_encoding_message_size.0);

    let methods = stack.methods;
    // Outermost first; each layer sees what the ones below it produce.
    let layers = ServiceBuilder::new()
        // Look the method up once; every layer below reads the result.
        .layer(MapRequestLayer::new(move |mut request: http::Request<tonic::body::Body>| {
            let method = methods.resolve(request.uri().path());
            request.extensions_mut().insert(method);
            request
        }))
        // The request id's span wraps everything else, so every log line
        // of the call, rejections included, carries the id.
        .layer(RequestIdLayer)
        // Metrics and logging sit outside every layer that can reject a
        // call, so rejected calls are counted and logged with their code.
        .layer(GrpcMetricsLayer::server())
        .layer(LoggingLayer)
        // Inside the observers, so they see RESOURCE_EXHAUSTED rather than
        // tonic's OUT_OF_RANGE for an oversized message.
        .layer(SizeLimitLayer::new(settings.max_decoding_message_size.0, settings.max_encoding_message_size.0))
        // Shed before authenticating: refusing is the cheapest answer.
        .layer(LoadShedLayer::new(settings.max_concurrent_requests))
        .layer(AuthLayer::new(stack.auth))
        // Timers start only for calls that will run.
        .layer(DeadlineLayer::new(settings.default_timeout, settings.max_timeout))
        // Innermost, around the handlers: a panic becomes INTERNAL.
        .layer(RecoverLayer);

    let mut server = Server::builder()
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_connection_age(settings.max_connection_age)
        .max_connection_age_grace(settings.max_connection_age_grace)
        .layer(layers);
    let router = match stack.extra_routes {
        Some(routes) => server.add_routes(routes),
        None => server.add_routes(tonic::service::Routes::default()),
    };
    router
        .add_service(health.service(stack.streams))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(users)
        .serve_with_incoming_shutdown(incoming, stop)
        .await?;
    Ok(())
}
