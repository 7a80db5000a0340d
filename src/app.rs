//! The application: [`App::build`] binds every listener and assembles the
//! services; [`App::run`] serves until a shutdown future resolves and then
//! walks the shutdown sequence within its bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use crate::admin::{self, Readiness};
use crate::config::Settings;
use crate::gateway::forward::Forwarder;
use crate::gateway::{self, BuildError, Gateway};
use crate::grpc::incoming::Incoming;
use crate::grpc::middleware::auth::Authenticator;
use crate::grpc::middleware::method::{MethodTable, ServiceEntry};
use crate::grpc::middleware::metrics::GrpcMetricsLayer;
use crate::grpc::stream::{LiveStreams, StreamSpawner};
use crate::grpc::{self, GrpcError, INFRASTRUCTURE_SERVICES};
use crate::health::Health;
use crate::metrics::{Metrics, MetricsError};
use crate::proto::user::v1::user_service_server::SERVICE_NAME as USER_SERVICE;
use crate::shutdown::Shutdown;
use crate::users::Users;
use crate::users::store::MemoryStore;

/// How long streams get to deliver their final status once the drain bound
/// has passed, before their connections are dropped.
const ABORT_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} (the {listener} address): {source}")]
    Bind { listener: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot build the HTTP gateway: {0}")]
    Gateway(#[from] BuildError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot read the service descriptors: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error("the HTTP gateway failed: {0}")]
    Http(std::io::Error),
    #[error("the admin server failed: {0}")]
    Admin(std::io::Error),
    #[error("the {0} server stopped unexpectedly: {1}")]
    Crashed(&'static str, String),
}

/// A built, not yet running, keel.
pub struct App {
    settings: Settings,
    grpc_incoming: Incoming,
    grpc_addr: SocketAddr,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    gateway: Gateway,
    methods: Arc<MethodTable>,
    auth: Authenticator,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: Shutdown,
    health: Health,
    live_streams: LiveStreams,
    store: Arc<MemoryStore>,
    /// Services added with [`App::add_grpc_service`].
    extra_routes: Option<tonic::service::Routes>,
}

impl App {
    /// Binds every listener, so port 0 works and the real addresses can be
    /// read before anything is served.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let shutdown = Shutdown::new();
        let grpc_listener = bind("grpc.addr", settings.grpc.addr).await?;
        let grpc_addr = local_addr("grpc.addr", settings.grpc.addr, &grpc_listener)?;
        let http_listener = bind("http.addr", settings.http.addr).await?;
        let http_addr = local_addr("http.addr", settings.http.addr, &http_listener)?;
        let admin_listener = bind("admin.addr", settings.admin.addr).await?;
        let admin_addr = local_addr("admin.addr", settings.admin.addr, &admin_listener)?;

        let metrics = Metrics::new()?;
        metrics.export_shutdown_budget(settings.shutdown.max_duration())?;
        let descriptor_sets = grpc::descriptor_sets();
        let services: Vec<ServiceEntry<'_>> =
            std::iter::once(ServiceEntry { name: USER_SERVICE, auth_exempt: false, shed_exempt: false })
                .chain(INFRASTRUCTURE_SERVICES.iter().map(|name| ServiceEntry {
                    name,
                    auth_exempt: true,
                    shed_exempt: *name == "grpc.health.v1.Health",
                }))
                .collect();
        let methods = Arc::new(MethodTable::build(&descriptor_sets, &services, &metrics.grpc_server)?);
        // The gateway calls the user service and health checks.
        let client_methods = Arc::new(MethodTable::build(&descriptor_sets, &services[..2], &metrics.grpc_client)?);
        let auth = Authenticator::new(&settings.auth);
        if !auth.enabled() {
            warn!("authentication is off: no auth.tokens configured or auth.disabled is set");
        }

        // The TCP listener closes as soon as draining begins; the gateway's
        // in-process connection lives on until the gateway has drained.
        let close_tcp = {
            let shutdown = shutdown.clone();
            async move { shutdown.draining().await }
        };
        let (grpc_incoming, local) = Incoming::new(grpc_listener, close_tcp);
        // One channel for the whole gateway, connected on first use.
        let channel = Endpoint::from_static("http://keel.internal").connect_with_connector_lazy(local);
        let gateway = Gateway::build(
            crate::proto::FILE_DESCRIPTOR_SET,
            &[USER_SERVICE],
            Forwarder::new(channel, GrpcMetricsLayer::client(client_methods)),
            &settings.http,
            &metrics.http,
        )?;

        let health = Health::new(vec![USER_SERVICE.to_owned()]).await;
        let readiness = Readiness::new(health.clone(), shutdown.clone());
        let store = Arc::new(MemoryStore::new(settings.streams.watch_buffer));
        Ok(Self {
            settings,
            grpc_incoming,
            grpc_addr,
            http_listener,
            http_addr,
            admin_listener,
            admin_addr,
            gateway,
            methods,
            auth,
            live_streams: LiveStreams::new(metrics.live_streams.clone()),
            metrics,
            readiness,
            shutdown,
            health,
            store,
            extra_routes: None,
        })
    }

    /// Serves one more gRPC service behind the same layer stack. Add its
    /// descriptors to `grpc::descriptor_sets` to have it measured,
    /// reflected and routed by the gateway.
    pub fn add_grpc_service<S>(&mut self, service: S)
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let routes = self.extra_routes.take().unwrap_or_default();
        self.extra_routes = Some(routes.add_service(service));
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The number of stream producers still running.
    pub fn live_streams(&self) -> LiveStreams {
        self.live_streams.clone()
    }

    /// Serves until `signal` resolves, then shuts down: NOT_SERVING, the
    /// drain delay (still serving), listeners closed and streams told to
    /// finish, and at most `shutdown.timeout` of draining before the rest is
    /// cancelled.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), AppError> {
        let App {
            settings,
            grpc_incoming,
            grpc_addr,
            http_listener,
            http_addr,
            admin_listener,
            admin_addr,
            gateway,
            methods,
            auth,
            metrics,
            readiness,
            shutdown,
            health,
            live_streams,
            store,
            extra_routes,
        } = self;
        let streams = StreamSpawner::new(shutdown.clone(), settings.streams.buffer, live_streams);
        let users = Users::new(store, streams.clone(), settings.streams.watch_buffer);

        // The gRPC server says GOAWAY only once the gateway, its in-process
        // client, has drained (or the drain bound has passed).
        let gateway_drained = CancellationToken::new();
        let grpc_stop = {
            let drained = gateway_drained.clone();
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    () = drained.cancelled() => {}
                    () = shutdown.aborted() => {}
                }
            }
        };
        let stack = grpc::Stack { methods, auth, extra_routes, streams };
        let mut grpc_server: JoinHandle<Result<(), GrpcError>> =
            tokio::spawn(grpc::serve(grpc_incoming, settings.grpc.clone(), stack, health.clone(), users, grpc_stop));
        let draining = || {
            let shutdown = shutdown.clone();
            async move { shutdown.draining().await }
        };
        let mut http_server = tokio::spawn(gateway::serve(http_listener, gateway.into_router(), draining()));
        let mut admin_server =
            tokio::spawn(admin::serve(admin_listener, admin::router(metrics, readiness.clone()), draining()));

        health.set_serving().await;
        readiness.mark_started();
        info!(grpc.addr = %grpc_addr, http.addr = %http_addr, admin.addr = %admin_addr, "keel serving");

        tokio::select! {
            () = signal => {}
            error = first_failure(&mut grpc_server, &mut http_server, &mut admin_server) => return Err(error),
        }

        let begun = Instant::now();
        shutdown.request();
        health.set_not_serving().await;
        info!("shutdown 1/4: reporting NOT_SERVING");

        let delay = settings.shutdown.drain_delay;
        if !delay.is_zero() {
            info!(drain_delay = %humantime::format_duration(delay), "shutdown 2/4: serving through the drain delay");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                error = first_failure(&mut grpc_server, &mut http_server, &mut admin_server) => return Err(error),
            }
        }

        info!(elapsed_ms = elapsed_ms(begun), "shutdown 3/4: closing listeners, draining calls and streams");
        shutdown.begin_draining();
        let abort_servers = [http_server.abort_handle(), grpc_server.abort_handle(), admin_server.abort_handle()];
        let drained = async {
            let http = (&mut http_server).await;
            gateway_drained.cancel();
            let grpc = (&mut grpc_server).await;
            let admin = (&mut admin_server).await;
            shutdown.wait_for_tasks().await;
            (http, grpc, admin)
        };
        tokio::pin!(drained);
        let outcome = match tokio::time::timeout(settings.shutdown.timeout, &mut drained).await {
            Ok(joined) => Some(joined),
            Err(_) => {
                warn!(
                    timeout = %humantime::format_duration(settings.shutdown.timeout),
                    tasks = shutdown.tasks_running(),
                    "shutdown: drain bound passed; cancelling what remains"
                );
                shutdown.abort();
                // Abandon handlers that ignore cancellation; their tasks end
                // with the runtime.
                tokio::time::timeout(ABORT_GRACE, &mut drained).await.ok()
            }
        };
        info!(elapsed_ms = elapsed_ms(begun), "shutdown 4/4: complete");
        match outcome {
            Some((http, grpc, admin)) => {
                http.map_err(|e| AppError::Crashed("HTTP", e.to_string()))?.map_err(AppError::Http)?;
                grpc.map_err(|e| AppError::Crashed("gRPC", e.to_string()))??;
                admin.map_err(|e| AppError::Crashed("admin", e.to_string()))?.map_err(AppError::Admin)?;
                Ok(())
            }
            None => {
                abort_servers.iter().for_each(tokio::task::AbortHandle::abort);
                Ok(())
            }
        }
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Resolves if any server stops before shutdown asked it to.
async fn first_failure(
    grpc: &mut JoinHandle<Result<(), GrpcError>>,
    http: &mut JoinHandle<std::io::Result<()>>,
    admin: &mut JoinHandle<std::io::Result<()>>,
) -> AppError {
    tokio::select! {
        joined = grpc => grpc_crashed(joined),
        joined = http => io_crashed("HTTP", joined),
        joined = admin => io_crashed("admin", joined),
    }
}

fn grpc_crashed(joined: Result<Result<(), GrpcError>, tokio::task::JoinError>) -> AppError {
    match joined {
        Ok(Err(error)) => AppError::from(error),
        Ok(Ok(())) => AppError::Crashed("gRPC", "it returned before shutdown".to_owned()),
        Err(join) => AppError::Crashed("gRPC", join.to_string()),
    }
}

fn io_crashed(server: &'static str, joined: Result<std::io::Result<()>, tokio::task::JoinError>) -> AppError {
    match joined {
        Ok(Err(error)) => AppError::Crashed(server, error.to_string()),
        Ok(Ok(())) => AppError::Crashed(server, "it returned before shutdown".to_owned()),
        Err(join) => AppError::Crashed(server, join.to_string()),
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { listener, addr, source })
}

fn local_addr(listener: &'static str, addr: SocketAddr, bound: &TcpListener) -> Result<SocketAddr, AppError> {
    bound.local_addr().map_err(|source| AppError::Bind { listener, addr, source })
}
