//! Serving state: the `grpc.health.v1` statuses of every registered service,
//! flipped together at startup and at shutdown, and the health service
//! that answers from them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{self, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::grpc::middleware::deadline::deadline_of;
use crate::grpc::stream::{ResponseStream, StreamKind, StreamSpawner};

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
        let mut updates = self.inner.watch(request).await?.into_inner();
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
