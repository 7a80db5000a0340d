//! The application as a few components: [`App::build`] registers the
//! services and binds each server (gRPC, gateway, admin); [`App::run`]
//! serves until a shutdown future resolves and then walks the shutdown
//! sequence within its bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::AdminServer;
use crate::clients::Clients;
use crate::config::{ABORT_GRACE, Settings};
use crate::database::{Database, DatabaseError};
use crate::gateway::{GatewayServer, GatewayStartError};
use crate::grpc::stream::{LiveStreams, StreamSpawner};
use crate::grpc::{self, GrpcError, GrpcServer};
use crate::health::{Health, Readiness, follow_dependencies};
use crate::metrics::{Metrics, MetricsError};
use crate::net::BindError;
use crate::registry::{Dependencies, RegistryError, ServiceContext, ServiceRegistry, SetupError};
use crate::shutdown::Shutdown;
use crate::tls::{self, TlsError, TlsKeys};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot set up the services")]
    Setup(#[source] SetupError),
    #[error("invalid service registry")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Gateway(#[from] GatewayStartError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("cannot set up the clients")]
    Clients(#[from] crate::clients::ClientError),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error("the HTTP gateway failed")]
    Http(#[source] std::io::Error),
    #[error("the admin server failed")]
    Admin(#[source] std::io::Error),
    #[error("the {0} server panicked")]
    Panicked(&'static str, #[source] tokio::task::JoinError),
    #[error("the {0} server returned before shutdown")]
    Stopped(&'static str),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Jwt(#[from] crate::auth::JwtError),
}

impl AppError {
    /// A listener could not be bound (the port is taken, or not ours).
    pub fn is_bind(&self) -> bool {
        matches!(self, Self::Bind(_) | Self::Grpc(GrpcError::Bind(_)) | Self::Gateway(GatewayStartError::Bind(_)))
    }

    /// A configured file (a certificate, a key, a JWKS) is unusable: a
    /// config error, exit 78.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Tls(_) | Self::Jwt(_) | Self::Grpc(GrpcError::Tls(_) | GrpcError::Jwt(_)))
    }
}

/// A built, not yet running, app.
pub struct App {
    /// Shutdown timings.
    settings: Settings,
    /// Serves every registered service behind the layer stack.
    grpc: GrpcServer,
    /// The HTTP/JSON gateway, calling `grpc` in-process.
    gateway: GatewayServer,
    /// `/metrics`, `/livez`, `/readyz`.
    admin: AdminServer,
    /// Statuses flipped at start and shutdown.
    health: Health,
    /// Marked started once every server runs.
    readiness: Readiness,
    /// Which services' gRPC health follows which readiness checks.
    dependencies: Dependencies,
    /// The PostgreSQL pool, closed after the servers have drained.
    database: Option<Database>,
    /// The downstream channels, closed after the servers have drained.
    clients: Clients,
    /// The handle every server, stream and task obeys.
    shutdown: Shutdown,
    /// Stream producers still running, for tests and the drain.
    live_streams: LiveStreams,
    /// Run once every server runs, just before the app reports ready (the
    /// binary hands back its start-up pages there).
    when_serving: Option<Box<dyn FnOnce() + Send>>,
}

impl App {
    /// Builds the app with the services of [`crate::services::register`].
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        Self::build_with(settings, crate::services::register).await
    }

    /// Builds the app with the services `register` adds: the registry is
    /// filled, then every server binds its listener, so port 0 works and
    /// the real addresses can be read before anything is served.
    pub async fn build_with<F>(settings: Settings, register: F) -> Result<Self, AppError>
    where
        F: FnOnce(&mut ServiceRegistry, &ServiceContext<'_>) -> Result<(), SetupError>,
    {
        let shutdown = Shutdown::new();
        let metrics = Metrics::new()?;
        metrics.export_shutdown_budget(settings.shutdown.max_duration())?;
        metrics.export_counter_fn(
            "keel_log_lines_dropped_total",
            "Log lines dropped because the log writer fell behind; calls never wait for it.",
            crate::telemetry::dropped_lines,
        )?;
        if let Some(reloads) = crate::secret_file::reloads_collector() {
            metrics.register(Box::new(reloads))?;
        }
        let live_streams = LiveStreams::new(metrics.live_streams.clone());
        let streams = StreamSpawner::new(shutdown.clone(), settings.streams.buffer, live_streams.clone());

        let database = Database::connect(&settings.database, &metrics).await?;
        let mut registry = ServiceRegistry::new()?;
        if let Some(database) = &database {
            registry.require_ready("database", Arc::new(database.clone()));
        }
        let clients = Clients::build(&settings.clients, registry.pool(), &metrics)?;
        for (name, check) in clients.readiness_checks() {
            registry.require_ready(name, check);
        }
        let context = ServiceContext {
            settings: &settings,
            streams: streams.clone(),
            database: database.as_ref(),
            clients: &clients,
        };
        register(&mut registry, &context).map_err(AppError::Setup)?;
        let health = Health::new(registry.health_names()).await;
        grpc::register_infrastructure(&mut registry, &health, &streams, &shutdown, settings.grpc.reflection)?;
        let mut services = registry.finish()?;

        let grpc = GrpcServer::bind(&settings.grpc, &settings.auth, &mut services, &metrics, &shutdown).await?;
        let http_tls = tls::server_config(&settings.http.tls, TlsKeys::HTTP, tls::ALPN_HTTP)?;
        let gateway = GatewayServer::bind(&settings.http, &services, grpc.in_process(), http_tls, &metrics).await?;
        let readiness = Readiness::new(health.clone(), shutdown.clone(), services.take_readiness());
        let dependencies = std::mem::take(&mut services.dependencies);
        let ready = readiness.clone();
        metrics.export_gauge_fn(
            "keel_ready",
            "1 while /readyz would answer 200 (started, SERVING, not shutting down, dependencies up), else 0.",
            move || if ready.is_ready() { 1.0 } else { 0.0 },
        )?;
        if let Some(filter) = crate::telemetry::log_filter() {
            filter.export(&metrics)?;
        }
        let admin_tls = tls::server_config(&settings.admin.tls, TlsKeys::ADMIN, tls::ALPN_HTTP)?;
        let admin = AdminServer::bind(&settings.admin, metrics, readiness.clone(), admin_tls).await?;
        Ok(Self {
            settings,
            grpc,
            gateway,
            admin,
            health,
            readiness,
            dependencies,
            database,
            clients,
            shutdown,
            live_streams,
            when_serving: None,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.gateway.addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Runs `hook` once, when every server runs and just before the app
    /// reports ready: work that should follow start-up but precede the
    /// first probe and call. It runs on the runtime, so it must be quick.
    pub fn when_serving(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.when_serving = Some(Box::new(hook));
        self
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
            grpc,
            gateway,
            admin,
            health,
            readiness,
            dependencies,
            database,
            clients,
            shutdown,
            when_serving,
            ..
        } = self;
        let (grpc_addr, http_addr, admin_addr) = (grpc.addr(), gateway.addr(), admin.addr());

        // Every server stops taking new work when draining begins: the gRPC
        // server sends GOAWAY at once, since the gateway's calls reach its
        // stack in process and need none of its connections.
        let draining = {
            let shutdown = shutdown.clone();
            move || {
                let shutdown = shutdown.clone();
                async move { shutdown.draining().await }
            }
        };
        let (draining_http, draining_admin) = (draining.clone(), draining.clone());
        let mut servers = [
            ServerTask::spawn("gRPC", async move { grpc.serve(draining()).await.map_err(AppError::from) }),
            ServerTask::spawn("HTTP", gateway.serve(draining_http()).map_err_into(AppError::Http)),
            ServerTask::spawn("admin", admin.serve(draining_admin()).map_err_into(AppError::Admin)),
        ];

        health.set_serving().await;
        if let Some(hook) = when_serving {
            hook();
        }
        readiness.mark_started();
        let stop_following = CancellationToken::new();
        let following =
            tokio::spawn(follow_dependencies(health.clone(), readiness.clone(), dependencies, stop_following.clone()));
        info!(grpc.addr = %grpc_addr, http.addr = %http_addr, admin.addr = %admin_addr, "keel serving");

        // A server that fails still gets the shutdown sequence: the others
        // turn unready and drain within the bound before the error returns.
        let failure = tokio::select! {
            () = signal => None,
            error = first_failure(&mut servers) => Some(error),
        };
        if let Some(error) = &failure {
            tracing::error!(error = %crate::telemetry::chain(error), "a server failed; shutting down");
        }

        let begun = Instant::now();
        shutdown.request();
        stop_following.cancel();
        let _ = following.await;
        let outcome = shut_down(&settings.shutdown, &mut servers, &health, &shutdown, failure, begun).await;
        let delay = settings.shutdown.drain_delay;
        // Inside the bound: what is left of it, at least the abort grace.
        let left = || settings.shutdown.timeout.saturating_sub(begun.elapsed().saturating_sub(delay)).max(ABORT_GRACE);
        clients.close(left()).await;
        if let Some(database) = database {
            let left = left();
            match tokio::time::timeout(left, database.close()).await {
                Ok(()) => info!(elapsed_ms = elapsed_ms(begun), "shutdown: database pool closed"),
                Err(_) => warn!(elapsed_ms = elapsed_ms(begun), "shutdown: database pool did not close in time"),
            }
        }
        info!(elapsed_ms = elapsed_ms(begun), "shutdown 4/4: complete");
        outcome
    }
}

/// The shutdown sequence once shutdown has been asked for, by a signal or by
/// a server failing (`failure`): NOT_SERVING, the drain delay (skipped after
/// a failure), then draining every server still running within the bound.
/// Returns the failure, else the first error a server ended with.
async fn shut_down(
    settings: &crate::config::ShutdownSettings,
    servers: &mut [ServerTask; 3],
    health: &Health,
    shutdown: &Shutdown,
    mut failure: Option<AppError>,
    begun: Instant,
) -> Result<(), AppError> {
    health.set_not_serving().await;
    info!("shutdown 1/4: reporting NOT_SERVING");

    let delay = settings.drain_delay;
    if !delay.is_zero() && failure.is_none() {
        info!(drain_delay = %humantime::format_duration(delay), "shutdown 2/4: serving through the drain delay");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            error = first_failure(servers) => failure = Some(error),
        }
    }

    info!(elapsed_ms = elapsed_ms(begun), "shutdown 3/4: closing listeners, draining calls and streams");
    shutdown.begin_draining();
    let aborts: Vec<_> = servers.iter().map(|server| server.abort.clone()).collect();
    let drained = async {
        let mut errors = Vec::new();
        for server in servers.iter_mut() {
            if let Err(error) = server.finish().await {
                errors.push(error);
            }
        }
        shutdown.wait_for_tasks().await;
        errors
    };
    tokio::pin!(drained);
    let errors = match tokio::time::timeout(settings.timeout, &mut drained).await {
        Ok(errors) => errors,
        Err(_) => {
            warn!(
                timeout = %humantime::format_duration(settings.timeout),
                tasks = shutdown.tasks_running(),
                "shutdown: drain bound passed; cancelling what remains"
            );
            shutdown.abort();
            // Abandon handlers that ignore cancellation; their tasks end
            // with the runtime.
            tokio::time::timeout(ABORT_GRACE, &mut drained).await.unwrap_or_default()
        }
    };
    // Whatever still runs after the bound is abandoned.
    aborts.iter().for_each(tokio::task::AbortHandle::abort);
    match failure.or_else(|| errors.into_iter().next()) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// One server's task. Its outcome is taken once; after that it counts as
/// finished.
struct ServerTask {
    name: &'static str,
    handle: Option<JoinHandle<Result<(), AppError>>>,
    abort: tokio::task::AbortHandle,
}

impl ServerTask {
    fn spawn(name: &'static str, serve: impl Future<Output = Result<(), AppError>> + Send + 'static) -> Self {
        let handle = tokio::spawn(serve);
        Self { name, abort: handle.abort_handle(), handle: Some(handle) }
    }

    /// Waits for the server to end and takes its outcome; pending forever
    /// once it has been taken.
    async fn ended(&mut self) -> Result<(), AppError> {
        let Some(handle) = self.handle.as_mut() else { return std::future::pending().await };
        let joined = handle.await;
        self.handle = None;
        joined.map_err(|join| AppError::Panicked(self.name, join))?
    }

    /// Like [`Self::ended`], but at once when the outcome was taken already.
    async fn finish(&mut self) -> Result<(), AppError> {
        if self.handle.is_none() {
            return Ok(());
        }
        self.ended().await
    }
}

/// Resolves when any server stops before shutdown asked it to.
async fn first_failure(servers: &mut [ServerTask; 3]) -> AppError {
    let [grpc, http, admin] = servers;
    let (name, outcome) = tokio::select! {
        outcome = grpc.ended() => (grpc.name, outcome),
        outcome = http.ended() => (http.name, outcome),
        outcome = admin.ended() => (admin.name, outcome),
    };
    match outcome {
        Ok(()) => AppError::Stopped(name),
        Err(error) => error,
    }
}

/// `io::Result` futures as `AppError` ones.
trait MapIoError: Future<Output = std::io::Result<()>> + Sized {
    fn map_err_into(self, wrap: fn(std::io::Error) -> AppError) -> impl Future<Output = Result<(), AppError>> {
        async move { self.await.map_err(wrap) }
    }
}

impl<F: Future<Output = std::io::Result<()>>> MapIoError for F {}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A server that fails while the others run: the others are still told
    /// to drain and finish, health turns NOT_SERVING, and the failure is
    /// what the app returns.
    #[tokio::test]
    async fn a_failing_server_still_gets_the_others_drained() {
        let shutdown = Shutdown::new();
        let health = Health::new(vec!["a.v1.Service".to_owned()]).await;
        health.set_serving().await;
        let drained = Arc::new(AtomicUsize::new(0));
        let healthy = |name: &'static str| {
            let shutdown = shutdown.clone();
            let drained = drained.clone();
            ServerTask::spawn(name, async move {
                shutdown.draining().await;
                drained.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        };
        let mut servers =
            [ServerTask::spawn("gRPC", async { Err(AppError::Stopped("gRPC")) }), healthy("HTTP"), healthy("admin")];
        let failure = first_failure(&mut servers).await;
        assert!(matches!(failure, AppError::Stopped("gRPC")), "{failure:?}");

        let settings = crate::config::ShutdownSettings {
            drain_delay: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            ..Default::default()
        };
        shutdown.request();
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            shut_down(&settings, &mut servers, &health, &shutdown, Some(failure), Instant::now()),
        )
        .await;
        // The drain delay is skipped after a failure, and the healthy servers
        // drain at once rather than at the bound.
        assert!(matches!(outcome, Ok(Err(AppError::Stopped("gRPC")))), "{outcome:?}");
        assert_eq!(drained.load(Ordering::SeqCst), 2, "the other servers were not drained");
        assert!(!health.is_serving());
    }
}
