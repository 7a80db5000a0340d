//! The HTTP/JSON gateway component: REST routes derived at startup from the
//! `google.api.http` annotations of every REST-enabled service in the
//! registry, transcoded to gRPC and forwarded over one shared channel, so
//! auth, metrics and logging run once per call, on the gRPC side. The calls
//! go straight into the gRPC layer stack in process: no HTTP/2, no socket,
//! no connection limit, and nothing to close at shutdown.
//!
//! Building: [`routes`] (bindings, conflicts, OpenAPI via [`openapi`]).
//! Serving: [`handler`] → route match ([`route`]) → JSON to protobuf
//! ([`transcode`]) → the call ([`forward`]) → protobuf to JSON ([`json`]), or a framed
//! stream ([`stream`]). Every failure is a `google.rpc.Status` body
//! ([`error`]). [`crate::http_server`] owns the listener and its drain. gRPC-Web
//! ([`grpc_web`]) and CORS ([`cors`]) share the port.

pub mod cors;
pub mod error;
pub mod forward;
pub mod grpc_web;
pub mod handler;
pub mod json;
pub mod openapi;
pub mod route;
pub mod routes;
pub mod stream;
pub mod transcode;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;

use crate::config::HttpSettings;
use crate::grpc::middleware::method::MethodTable;
use crate::grpc::middleware::metrics::GrpcMetricsLayer;
use crate::grpc::{HEALTH_SERVICE, InProcess};
use crate::http_server::{self, HttpLimits};
use crate::metrics::Metrics;
use crate::net::{self, BindError};
use crate::registry::Services;
pub use forward::Forwarder;
pub use handler::Gateway;
pub use routes::{Binding, BuildError};

/// Why the gateway component could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayStartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot build the HTTP gateway")]
    Build(#[from] BuildError),
}

/// The gateway's listener and router.
pub struct GatewayServer {
    listener: TcpListener,
    /// The address actually bound; port 0 resolves here.
    addr: SocketAddr,
    router: Router,
    /// Timeouts and the connection cap of `http.*`.
    limits: HttpLimits,
}

impl GatewayServer {
    /// Binds `http.addr` and derives the routes of `services`, calling them
    /// through `grpc`, the gRPC layer stack in process (measured as
    /// `grpc_client_*`).
    pub async fn bind(
        settings: &HttpSettings,
        services: &Services,
        grpc: InProcess,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
        metrics: &Metrics,
    ) -> Result<Self, GatewayStartError> {
        let (listener, addr) = net::bind("http.addr", settings.addr).await?;
        // The client series cover what the gateway calls: the REST services
        // and health checks.
        let called = services.iter().filter(|s| s.policy.rest || s.name == HEALTH_SERVICE);
        let client_methods = std::sync::Arc::new(MethodTable::build(called, &metrics.grpc_client));
        let forwarder = Forwarder::new(grpc, GrpcMetricsLayer::client(client_methods));
        let gateway = Gateway::build(services, forwarder, settings, &metrics.http)?;
        let limits = HttpLimits::gateway(settings, metrics).with_tls(tls);
        Ok(Self { listener, addr, router: gateway.into_router(), limits })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` resolves, then drains (see [`crate::http_server`]).
    pub async fn serve(self, stop: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        http_server::serve(self.listener, self.router, self.limits, stop).await
    }
}
