//! The gRPC server component: it owns its listener, builds the method table
//! from the service registry, registers the infrastructure services (health,
//! reflection v1 and v1alpha) and serves every registered service behind
//! one ordered layer stack.

pub mod incoming;
pub mod middleware;
pub mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tonic::transport::{Channel, Endpoint, Server};
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;

use crate::config::{AuthSettings, GrpcSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::net::{self, BindError};
use crate::registry::{ServicePolicy, ServiceRegistry, Services};
use crate::shutdown::Shutdown;
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
use stream::StreamSpawner;

/// The standard health service's name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Registers health and both reflection versions. Reflection lists every
/// service registered before it, itself included, and describes only the
/// files those services need.
pub fn register_infrastructure(
    registry: &mut ServiceRegistry,
    health: &Health,
    streams: &StreamSpawner,
) -> Result<(), GrpcError> {
    registry.add_with_policy(health.service(streams.clone()), ServicePolicy::INFRASTRUCTURE).shed_exempt();
    let mut names = registry.names();
    names.extend([REFLECTION_V1.to_owned(), REFLECTION_V1ALPHA.to_owned()]);
    let files = registry.file_descriptor_set_for(&names);
    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(&files);
        names.iter().fold(builder, |builder, name| builder.with_service_name(name))
    };
    let v1 = reflection().build_v1()?;
    let v1alpha = reflection().build_v1alpha()?;
    registry.add_with_policy(v1, ServicePolicy::INFRASTRUCTURE);
    registry.add_with_policy(v1alpha, ServicePolicy::INFRASTRUCTURE);
    Ok(())
}

/// The gRPC server: listener, method table, auth and routes.
pub struct GrpcServer {
    /// TCP connections (accepted until draining begins) and the gateway's
    /// in-process ones (accepted until the gateway has drained).
    incoming: Incoming,
    /// The address actually bound; port 0 resolves here.
    addr: SocketAddr,
    settings: GrpcSettings,
    /// Every served method with its policy and pre-resolved series.
    methods: Arc<MethodTable>,
    auth: Authenticator,
    /// The routes of every registered service.
    routes: tonic::service::Routes,
}

impl GrpcServer {
    /// Binds `grpc.addr` and builds the server over `services`. Also
    /// returns a channel into the server that needs no socket: the
    /// gateway's, connected on first use.
    pub async fn bind(
        settings: &GrpcSettings,
        auth: &AuthSettings,
        services: &mut Services,
        metrics: &Metrics,
        shutdown: &Shutdown,
    ) -> Result<(Self, Channel), GrpcError> {
        let (listener, addr) = net::bind("grpc.addr", settings.addr).await?;
        // The TCP listener closes as soon as draining begins; the gateway's
        // in-process connection lives on until the gateway has drained.
        let close_tcp = {
            let shutdown = shutdown.clone();
            async move { shutdown.draining().await }
        };
        let (incoming, local) = Incoming::new(listener, close_tcp);
        let channel = Endpoint::from_static("http://in-process.invalid").connect_with_connector_lazy(local);
        let methods = Arc::new(MethodTable::build(services.iter(), &metrics.grpc_server));
        let auth = Authenticator::new(auth);
        if !auth.enabled() {
            tracing::warn!("authentication is off: no auth.tokens configured or auth.disabled is set");
        }
        let server = Self { incoming, addr, settings: settings.clone(), methods, auth, routes: services.take_routes() };
        Ok((server, channel))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` resolves, then sends GOAWAY and waits for open
    /// calls to finish (the caller bounds that wait).
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<(), GrpcError> {
        let Self { incoming, settings, methods, auth, routes, .. } = self;
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
            // One place enforces the message size limits for every service,
            // whatever its generated server was configured with.
            .layer(SizeLimitLayer::new(settings.max_decoding_message_size.0, settings.max_encoding_message_size.0))
            // Shed before authenticating: refusing is the cheapest answer.
            .layer(LoadShedLayer::new(settings.max_concurrent_requests))
            .layer(AuthLayer::new(auth))
            // Timers start only for calls that will run.
            .layer(DeadlineLayer::new(settings.default_timeout, settings.max_timeout))
            // Innermost, around the handlers: a panic becomes INTERNAL.
            .layer(RecoverLayer);

        Server::builder()
            .http2_keepalive_interval(Some(settings.keepalive_interval))
            .http2_keepalive_timeout(Some(settings.keepalive_timeout))
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_connection_age(settings.max_connection_age)
            .max_connection_age_grace(settings.max_connection_age_grace)
            .layer(layers)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop)
            .await?;
        Ok(())
    }
}
