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
}

impl AppError {
    /// A listener could not be bound (the port is taken, or not ours).
    pub fn is_bind(&self) -> bool {
        matches!(self, Self::Bind(_) | Self::Grpc(GrpcError::Bind(_)) | Self::Gateway(GatewayStartError::Bind(_)))
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
    /// The handle every server, stream and task obeys.
    shutdown: Shutdown,
    /// Stream producers still running, for tests and the drain.
    live_streams: LiveStreams,
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
        let live_streams = LiveStreams::new(metrics.live_streams.clone());
        let streams = StreamSpawner::new(shutdown.clone(), settings.streams.buffer, live_streams.clone());

        let database = Database::connect(&settings.database, &metrics).await?;
        let mut registry = ServiceRegistry::new()?;
        if let Some(database) = &database {
            registry.require_ready("database", Arc::new(database.clone()));
        }
        let context = ServiceContext { settings: &settings, streams: streams.clone(), database: database.as_ref() };
        register(&mut registry, &context).map_err(AppError::Setup)?;
        let health = Health::new(registry.health_names()).await;
        grpc::register_infrastructure(&mut registry, &health, &streams)?;
        let mut services = registry.finish()?;

        let grpc = GrpcServer::bind(&settings.grpc, &settings.auth, &mut services, &metrics, &shutdown).await?;
        let gateway = GatewayServer::bind(&settings.http, &services, grpc.in_process(), &metrics).await?;
        let readiness = Readiness::new(health.clone(), shutdown.clone(), services.take_readiness());
        let dependencies = std::mem::take(&mut services.dependencies);
        let admin = AdminServer::bind(&settings.admin, metrics, readiness.clone()).await?;
        Ok(Self { settings, grpc, gateway, admin, health, readiness, dependencies, database, shutdown, live_streams })
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

    /// The number of stream producers still running.
    pub fn live_streams(&self) -> LiveStreams {
        self.live_streams.clone()
    }

    /// Serves until `signal` resolves, then shuts down: NOT_SERVING, the
    /// drain delay (still serving), listeners closed and streams told to
    /// finish, and at most `shutdown.timeout` of draining before the rest is
    /// cancelled.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), AppError> {
        let App { settings, grpc, gateway, admin, health, readiness, dependencies, database, shutdown, .. } = self;
        let (grpc_addr, http_addr, admin_addr) = (grpc.addr(), gateway.addr(), admin.addr());

        // Every server stops taking new work when draining begins: the gRPC
        // server sends GOAWAY at once, since the gateway's calls reach its
        // stack in process and need none of its connections.
        let draining = || {
            let shutdown = shutdown.clone();
            async move { shutdown.draining().await }
        };
        let mut grpc_server: JoinHandle<Result<(), GrpcError>> = tokio::spawn(grpc.serve(draining()));
        let mut http_server = tokio::spawn(gateway.serve(draining()));
        let mut admin_server = tokio::spawn(admin.serve(draining()));

        health.set_serving().await;
        readiness.mark_started();
        let stop_following = CancellationToken::new();
        let following =
            tokio::spawn(follow_dependencies(health.clone(), readiness.clone(), dependencies, stop_following.clone()));
        info!(grpc.addr = %grpc_addr, http.addr = %http_addr, admin.addr = %admin_addr, "keel serving");

        tokio::select! {
            () = signal => {}
            error = first_failure(&mut grpc_server, &mut http_server, &mut admin_server) => return Err(error),
        }

        let begun = Instant::now();
        shutdown.request();
        stop_following.cancel();
        let _ = following.await;
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
        if let Some(database) = database {
            // Inside the bound: what is left of it, at least the abort grace.
            let left = settings.shutdown.timeout.saturating_sub(begun.elapsed().saturating_sub(delay)).max(ABORT_GRACE);
            match tokio::time::timeout(left, database.close()).await {
                Ok(()) => info!(elapsed_ms = elapsed_ms(begun), "shutdown: database pool closed"),
                Err(_) => warn!(elapsed_ms = elapsed_ms(begun), "shutdown: database pool did not close in time"),
            }
        }
        info!(elapsed_ms = elapsed_ms(begun), "shutdown 4/4: complete");
        match outcome {
            Some((http, grpc, admin)) => {
                http.map_err(|e| AppError::Panicked("HTTP", e))?.map_err(AppError::Http)?;
                grpc.map_err(|e| AppError::Panicked("gRPC", e))??;
                admin.map_err(|e| AppError::Panicked("admin", e))?.map_err(AppError::Admin)?;
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
        joined = grpc => match joined {
            Ok(Err(error)) => AppError::from(error),
            Ok(Ok(())) => AppError::Stopped("gRPC"),
            Err(join) => AppError::Panicked("gRPC", join),
        },
        joined = http => io_crashed("HTTP", joined, AppError::Http),
        joined = admin => io_crashed("admin", joined, AppError::Admin),
    }
}

fn io_crashed(
    server: &'static str,
    joined: Result<std::io::Result<()>, tokio::task::JoinError>,
    failed: fn(std::io::Error) -> AppError,
) -> AppError {
    match joined {
        Ok(Err(error)) => failed(error),
        Ok(Ok(())) => AppError::Stopped(server),
        Err(join) => AppError::Panicked(server, join),
    }
}
