//! The gRPC server component: it owns its listener, builds the method table
//! from the service registry, registers the infrastructure services (health,
//! reflection v1 and v1alpha) and serves every registered service behind
//! one call layer ([`middleware::server`]), which runs every step a call
//! passes in a fixed order.
//!
//! The same layer is also handed out as an in-process tower service
//! ([`GrpcServer::in_process`]): the gateway calls it with an
//! `http::Request` and gets an `http::Response` back, with no HTTP/2
//! framing, no pipe and no connection limit between them, while every layer
//! still runs exactly once per call.

pub mod bounded;
pub mod incoming;
pub mod middleware;
pub mod routes;
pub mod stream;

use std::future::Future;
use std::net::SocketAddr;

use tonic::body::Body;
use tonic::transport::Server;
use tower::Layer;
use tower::util::BoxCloneSyncService;

use crate::config::{AuthSettings, GrpcSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::net::{self, BindError};
use crate::registry::{ServicePolicy, ServiceRegistry, Services};
use crate::shutdown::Shutdown;
use incoming::Incoming;
use middleware::auth::Authenticator;
use middleware::deadline::DeadlinePolicy;
use middleware::limits::SizeLimits;
use middleware::method::MethodTable;
use middleware::server::{CallLayer, CallPolicy};
use middleware::shed::Shedder;
use routes::{InsteadOfTonicRoutes, ServiceRoutes};
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
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot load the bearer tokens")]
    Tokens(#[from] crate::secret_file::SecretFileError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Jwt(#[from] crate::auth::JwtError),
}

/// Registers health and, with `grpc.reflection` on, both reflection
/// versions. Reflection lists every service registered before it, itself
/// included, and describes only the files those services need.
pub fn register_infrastructure(
    registry: &mut ServiceRegistry,
    health: &Health,
    streams: &StreamSpawner,
    shutdown: &Shutdown,
    reflection_on: bool,
) -> Result<(), GrpcError> {
    registry.add_with_policy(health.service(streams.clone()), ServicePolicy::INFRASTRUCTURE).shed_exempt();
    if !reflection_on {
        return Ok(());
    }
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
    // Reflection's bidi streams end at their deadline and at drain too.
    registry.add_with_policy(bounded::Bounded::new(v1, shutdown.clone()), ServicePolicy::INFRASTRUCTURE);
    registry.add_with_policy(bounded::Bounded::new(v1alpha, shutdown.clone()), ServicePolicy::INFRASTRUCTURE);
    Ok(())
}

/// Every registered service behind the call layer, callable in process. Cheap to clone; clones share the stack's state (the load
/// shedding count, the method table, the metric series).
pub type InProcess = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, std::convert::Infallible>;

/// The gRPC server: listener, settings, the layer stack and the routes.
pub struct GrpcServer {
    /// TCP connections, accepted until draining begins.
    incoming: Incoming,
    /// The address actually bound; port 0 resolves here.
    addr: SocketAddr,
    settings: GrpcSettings,
    /// The call layer every call passes, shared with [`Self::in_process`].
    layers: CallLayer,
    /// The routes of every registered service.
    routes: ServiceRoutes,
}

impl GrpcServer {
    /// Binds `grpc.addr` and builds the server over `services`.
    pub async fn bind(
        settings: &GrpcSettings,
        auth: &AuthSettings,
        services: &mut Services,
        metrics: &Metrics,
        shutdown: &Shutdown,
    ) -> Result<Self, GrpcError> {
        let (listener, addr) = net::bind("grpc.addr", settings.addr).await?;
        // The TCP listener closes as soon as draining begins.
        let close_tcp = {
            let shutdown = shutdown.clone();
            async move { shutdown.draining().await }
        };
        let tls = crate::tls::server_config(&settings.tls, crate::tls::TlsKeys::GRPC, crate::tls::ALPN_GRPC)?;
        let incoming = Incoming::new(listener, tls, incoming::TcpKeepalive::of(settings), close_tcp);
        // Built once per server and kept for the life of the process (a few
        // kilobytes): every call borrows its method from here, so no call
        // touches a reference count shared by all cores.
        let methods: &'static MethodTable =
            Box::leak(Box::new(MethodTable::build(services.iter(), &metrics.grpc_server)));
        let jwt = if auth.disabled || !auth.jwt.enabled() {
            None
        } else {
            let fetches = (!auth.jwt.jwks_url.is_empty()).then(|| crate::auth::fetches_counter(metrics)).transpose()?;
            let declared =
                crate::auth::JwtAuth::declared_scopes(&services.pool, services.iter().map(|s| s.name.as_str()));
            crate::auth::JwtAuth::new(&auth.jwt, declared, fetches).await?
        };
        let auth = Authenticator::new(auth, jwt)?;
        if !auth.enabled() {
            tracing::warn!(
                "authentication is off: no auth.tokens, auth.tokens_file or auth.jwt configured, or auth.disabled is set"
            );
        }
        let shed = Shedder::new(settings.max_concurrent_requests, metrics.grpc_shed.clone());
        let in_flight = shed.in_flight();
        // Read at scrape time: the request path keeps only its one atomic.
        metrics.export_gauge_fn(
            "keel_grpc_requests_in_flight",
            "Calls holding a slot of grpc.max_concurrent_requests (health checks are never counted).",
            move || in_flight.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )?;
        metrics.export_gauge(
            "keel_grpc_max_concurrent_requests",
            "grpc.max_concurrent_requests: calls in flight past which new calls are shed.",
            settings.max_concurrent_requests as f64,
        )?;
        let layers = CallLayer::new(CallPolicy {
            methods,
            auth,
            shed,
            limits: SizeLimits::new(settings.max_decoding_message_size.0, settings.max_encoding_message_size.0),
            deadlines: DeadlinePolicy::new(settings.default_timeout, settings.max_timeout),
            echo_request_id: settings.echo_request_id,
        });
        Ok(Self { incoming, addr, settings: settings.clone(), layers, routes: services.take_routes() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The routes behind the same layers, as a service the gateway calls
    /// directly. Calls through it are not connections of this server, so
    /// they are not limited by `grpc.max_concurrent_streams` and do not
    /// hold up its GOAWAY; they end with the gateway's drain.
    pub fn in_process(&self) -> InProcess {
        let service = self.layers.layer(self.routes.clone());
        BoxCloneSyncService::new(tower::util::MapResponse::new(service, |response: http::Response<_>| {
            response.map(Body::new)
        }))
    }

    /// Serves until `stop` resolves, then sends GOAWAY and waits for open
    /// calls to finish (the caller bounds that wait).
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<(), GrpcError> {
        let Self { incoming, settings, layers, routes, .. } = self;
        Server::builder()
            // `0s` is off: hyper would otherwise ping without pause.
            .http2_keepalive_interval((!settings.keepalive_interval.is_zero()).then_some(settings.keepalive_interval))
            .http2_keepalive_timeout(Some(settings.keepalive_timeout))
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_connection_age(settings.max_connection_age)
            .max_connection_age_grace(settings.max_connection_age_grace)
            .layer(InsteadOfTonicRoutes { layer: layers, routes })
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming_shutdown(incoming, stop)
            .await?;
        Ok(())
    }
}
