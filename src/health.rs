//! Serving state: the `grpc.health.v1` statuses of every registered service,
//! flipped together at startup and at shutdown, the health service that
//! answers from them, and readiness: those statuses plus the checks of the
//! dependencies a service registered (its store, a required client).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{self, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::grpc::middleware::deadline::deadline_of;
use crate::grpc::stream::{ResponseStream, StreamKind, StreamSpawner};
use crate::shutdown::Shutdown;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// The future a [`ReadinessCheck`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// A dependency that readiness waits on, such as a database. `Err` says
/// why it is not ready. Checks run on every `/readyz` request, so they
/// must be cheap (a pool's state, a `SELECT 1`), and are bounded by a
/// timeout.
pub trait ReadinessCheck: Send + Sync + 'static {
    fn check(&self) -> CheckFuture<'_>;
}

/// What readiness is made of: startup, gRPC health, shutdown, and the
/// registered dependency checks. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    /// Set once every server is running.
    started: Arc<AtomicBool>,
    health: Health,
    shutdown: Shutdown,
    /// Registered by services at startup, by name.
    dependencies: Arc<[(String, Arc<dyn ReadinessCheck>)]>,
    /// Whether every dependency passed its most recent check, for
    /// [`Readiness::is_ready`], which scrapes read and cannot wait on a
    /// check. Refreshed by each run of the checks (gRPC health follows them
    /// every second, and each `/readyz` runs them).
    dependencies_ok: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new(health: Health, shutdown: Shutdown, dependencies: Vec<(String, Arc<dyn ReadinessCheck>)>) -> Self {
        let dependencies_ok = Arc::new(AtomicBool::new(dependencies.is_empty()));
        Self {
            started: Arc::new(AtomicBool::new(false)),
            health,
            shutdown,
            dependencies: dependencies.into(),
            dependencies_ok,
        }
    }

    /// Readiness without running a check: started, SERVING, not shutting
    /// down, and every dependency passed its last check. What
    /// `keel_ready` exports.
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::Acquire)
            && self.health.is_serving()
            && !self.shutdown.is_requested()
            && self.dependencies_ok.load(Ordering::Acquire)
    }

    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Whether any dependency registered a readiness check.
    pub fn has_dependency_checks(&self) -> bool {
        !self.dependencies.is_empty()
    }

    /// The registered dependency checks alone, each bounded.
    pub async fn dependency_checks(&self) -> Vec<(String, Result<(), String>)> {
        let mut out = Vec::with_capacity(self.dependencies.len());
        for (name, check) in self.dependencies.iter() {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check.check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            out.push((name.clone(), outcome));
        }
        self.dependencies_ok.store(out.iter().all(|(_, outcome)| outcome.is_ok()), Ordering::Release);
        out
    }

    /// Each check with its outcome: `Err` carries the reason.
    pub async fn checks(&self) -> Vec<(String, Result<(), String>)> {
        let fixed = |ok: bool, reason: &str| if ok { Ok(()) } else { Err(reason.to_owned()) };
        let mut out = vec![
            ("startup".to_owned(), fixed(self.started.load(Ordering::Acquire), "startup not complete")),
            ("grpc-health".to_owned(), fixed(self.health.is_serving(), "gRPC health is NOT_SERVING")),
            ("shutdown".to_owned(), fixed(!self.shutdown.is_requested(), "shutting down")),
        ];
        out.extend(self.dependency_checks().await);
        out
    }
}

/// How often gRPC health re-reads the dependency checks.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Runs the dependency checks every second while serving, so
/// [`Readiness::is_ready`] stays current, and makes gRPC health follow
/// them: a service is NOT_SERVING while a check it depends on fails, and so is the server
/// (`""`, what Kubernetes' gRPC probe asks) while any of them fails; both
/// recover on their own. Returns when `stop` is cancelled, which the app
/// does before it reports NOT_SERVING for shutdown, so the two never race.
pub async fn follow_dependencies(
    health: Health,
    readiness: Readiness,
    dependencies: crate::registry::Dependencies,
    stop: tokio_util::sync::CancellationToken,
) {
    if dependencies.is_empty() {
        // No service's health depends on a check; still run them, since
        // `keel_ready` reads their last outcome. Health is left alone.
        while readiness.has_dependency_checks() {
            let _ = readiness.dependency_checks().await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
        }
        return;
    }
    let mut last: std::collections::HashMap<String, ServingStatus> = std::collections::HashMap::new();
    loop {
        let failed: Vec<(String, String)> = readiness
            .dependency_checks()
            .await
            .into_iter()
            .filter_map(|(name, outcome)| outcome.err().map(|reason| (name, reason)))
            .collect();
        if stop.is_cancelled() {
            return;
        }
        let mut server = ServingStatus::Serving;
        for (service, checks) in &dependencies {
            let down = failed.iter().find(|(name, _)| checks.contains(name));
            let status = if down.is_some() { ServingStatus::NotServing } else { ServingStatus::Serving };
            if down.is_some() {
                server = ServingStatus::NotServing;
            }
            if last.get(service) != Some(&status) {
                match down {
                    Some((check, reason)) => tracing::warn!(service, check, reason, "dependency down: NOT_SERVING"),
                    None if last.contains_key(service) => tracing::info!(service, "dependencies back: SERVING"),
                    None => {}
                }
                health.reporter.set_service_status(service, status).await;
                last.insert(service.clone(), status);
            }
        }
        if last.get("") != Some(&server) {
            health.reporter.set_service_status("", server).await;
            last.insert(String::new(), server);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
}

/// The health of the server and each of its services. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    /// Fully qualified names of the services that report health, besides "".
    services: Arc<[String]>,
    /// Mirrors the statuses for synchronous readers such as readiness probes.
    serving: Arc<AtomicBool>,
}

impl Health {
    /// Starts NOT_SERVING: nothing is ready until the app says so.
    pub async fn new(services: Vec<String>) -> Self {
        let health = Self {
            reporter: HealthReporter::new(),
            services: services.into(),
            serving: Arc::new(AtomicBool::new(false)),
        };
        health.set_all(ServingStatus::NotServing).await;
        health
    }

    /// The `grpc.health.v1.Health` service answering from this state. Its
    /// `Watch` streams run on `streams`, so they end like every other
    /// endless stream: at their deadline, or with UNAVAILABLE at shutdown.
    pub fn service(&self, streams: StreamSpawner) -> HealthServer<HealthApi> {
        HealthServer::new(HealthApi { inner: HealthService::from_health_reporter(self.reporter.clone()), streams })
    }

    pub async fn set_serving(&self) {
        self.set_all(ServingStatus::Serving).await;
    }

    /// Tells health checkers and watchers to stop sending traffic here.
    pub async fn set_not_serving(&self) {
        self.set_all(ServingStatus::NotServing).await;
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    async fn set_all(&self, status: ServingStatus) {
        self.serving.store(status == ServingStatus::Serving, Ordering::Release);
        self.reporter.set_service_status("", status).await;
        for service in self.services.iter() {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// tonic-health's service, with `Watch` streams that end at shutdown
/// instead of holding their connections open until the drain bound.
pub struct HealthApi {
    inner: HealthService,
    streams: StreamSpawner,
}

#[tonic::async_trait]
impl health_server::Health for HealthApi {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = ResponseStream<HealthCheckResponse>;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let deadline = deadline_of(&request);
        let mut updates = match self.inner.watch(request).await {
            Ok(updates) => updates.into_inner(),
            // The health protocol: an unknown service is not an error for
            // Watch. Send SERVICE_UNKNOWN and keep the stream open (it ends
            // like every watch, at its deadline or at shutdown), so a
            // watcher started before its service registers keeps waiting.
            Err(status) if status.code() == tonic::Code::NotFound => {
                let stream = self.streams.spawn(StreamKind::Endless, deadline, move |sink| async move {
                    sink.send(HealthCheckResponse {
                        status: tonic_health::pb::health_check_response::ServingStatus::ServiceUnknown as i32,
                    })
                    .await?;
                    Err(sink.stopped().await.into())
                });
                return Ok(Response::new(stream));
            }
            Err(status) => return Err(status),
        };
        let stream = self.streams.spawn(StreamKind::Endless, deadline, move |sink| async move {
            loop {
                tokio::select! {
                    end = sink.stopped() => return Err(end.into()),
                    update = updates.next() => match update {
                        Some(update) => sink.send(update?).await?,
                        None => return Ok(()),
                    },
                }
            }
        });
        Ok(Response::new(stream))
    }
}
