//! The application: [`App::build`] binds every listener and assembles the
//! services; [`App::run`] serves until a shutdown future resolves and then
//! walks the shutdown sequence within its bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::Settings;
use crate::grpc::stream::{LiveStreams, StreamSpawner};
use crate::grpc::{self, GrpcError};
use crate::health::Health;
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
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error("the {0} server stopped unexpectedly: {1}")]
    Crashed(&'static str, String),
}

/// A built, not yet running, keel.
pub struct App {
    settings: Settings,
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    shutdown: Shutdown,
    health: Health,
    live_streams: LiveStreams,
    store: Arc<MemoryStore>,
}

impl App {
    /// Binds every listener, so port 0 works and the real addresses can be
    /// read before anything is served.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let grpc_listener = bind("grpc.addr", settings.grpc.addr).await?;
        let grpc_addr = local_addr("grpc.addr", settings.grpc.addr, &grpc_listener)?;
        let health = Health::new(vec![USER_SERVICE.to_owned()]).await;
        let store = Arc::new(MemoryStore::new(settings.streams.watch_buffer));
        Ok(Self {
            settings,
            grpc_listener,
            grpc_addr,
            shutdown: Shutdown::new(),
            health,
            live_streams: LiveStreams::default(),
            store,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The number of stream producers still running.
    pub fn live_streams(&self) -> LiveStreams {
        self.live_streams.clone()
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Serves until `signal` resolves, then shuts down: NOT_SERVING, the
    /// drain delay (still serving), listeners closed and streams told to
    /// finish, and at most `shutdown.timeout` of draining before the rest is
    /// cancelled.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), AppError> {
        let App { settings, grpc_listener, grpc_addr, shutdown, health, live_streams, store } = self;
        let streams = StreamSpawner::new(shutdown.clone(), settings.streams.buffer, live_streams);
        let users = Users::new(store, streams, settings.streams.watch_buffer);

        let stop = {
            let shutdown = shutdown.clone();
            async move { shutdown.draining().await }
        };
        let mut grpc_server: JoinHandle<Result<(), GrpcError>> =
            tokio::spawn(grpc::serve(grpc_listener, settings.grpc.clone(), health.clone(), users, stop));

        health.set_serving().await;
        info!(grpc.addr = %grpc_addr, "keel serving");

        tokio::select! {
            () = signal => {}
            joined = &mut grpc_server => return Err(crashed("gRPC", joined)),
        }

        let begun = Instant::now();
        health.set_not_serving().await;
        info!("shutdown 1/4: reporting NOT_SERVING");

        let delay = settings.shutdown.drain_delay;
        if !delay.is_zero() {
            info!(drain_delay = %humantime::format_duration(delay), "shutdown 2/4: serving through the drain delay");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                joined = &mut grpc_server => return Err(crashed("gRPC", joined)),
            }
        }

        info!(
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "shutdown 3/4: closing listeners, draining calls and streams"
        );
        shutdown.begin_draining();
        let drained = async {
            let served = (&mut grpc_server).await;
            shutdown.wait_for_tasks().await;
            served
        };
        tokio::pin!(drained);
        let outcome = match tokio::time::timeout(settings.shutdown.timeout, &mut drained).await {
            Ok(joined) => joined,
            Err(_) => {
                warn!(
                    timeout = %humantime::format_duration(settings.shutdown.timeout),
                    tasks = shutdown.tasks_running(),
                    "shutdown: drain bound passed; cancelling what remains"
                );
                shutdown.abort();
                match tokio::time::timeout(ABORT_GRACE, &mut drained).await {
                    Ok(joined) => joined,
                    // Abandon handlers that ignore cancellation; their tasks
                    // end with the runtime.
                    Err(_) => Ok(Ok(())),
                }
            }
        };
        info!(elapsed_ms = begun.elapsed().as_millis() as u64, "shutdown 4/4: complete");
        match outcome {
            Ok(served) => served.map_err(AppError::from),
            Err(join) => Err(AppError::Crashed("gRPC", join.to_string())),
        }
    }
}

fn crashed(server: &'static str, joined: Result<Result<(), GrpcError>, tokio::task::JoinError>) -> AppError {
    match joined {
        Ok(Err(error)) => AppError::from(error),
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
