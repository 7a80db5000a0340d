//! Serving state: the `grpc.health.v1` statuses of every registered service,
//! flipped together at startup and at shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

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

    /// The `grpc.health.v1.Health` service answering from this state.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
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
