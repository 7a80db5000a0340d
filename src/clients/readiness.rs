//! The readiness check of a client with `required_for_readiness`: the
//! downstream's own `grpc.health.v1` Check, with a short timeout, cached
//! briefly so probes and the health follower share one call.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::ClientChannel;
use crate::health::{CheckFuture, ReadinessCheck};

/// A check's answer is reused for this long.
const CACHE_FOR: Duration = Duration::from_secs(1);
/// How long the downstream has to answer a Check.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

pub struct DownstreamHealth {
    /// The client's name, in the reason `/readyz` gives.
    pub client: String,
    pub health: HealthClient<ClientChannel>,
    /// The last outcome and when it was taken; the lock also makes
    /// concurrent probes wait for one call instead of each making one.
    pub cached: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl DownstreamHealth {
    async fn probe(&self) -> Result<(), String> {
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.set_timeout(CHECK_TIMEOUT);
        match self.health.clone().check(request).await {
            Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
            Ok(response) => Err(format!(
                "client {}: the downstream reports {}",
                self.client,
                ServingStatus::try_from(response.get_ref().status).map_or("an unknown status", |s| s.as_str_name())
            )),
            Err(status) => Err(format!(
                "client {}: health check failed: {} {}",
                self.client,
                crate::metrics::code_name(status.code()),
                status.message()
            )),
        }
    }
}

impl ReadinessCheck for DownstreamHealth {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let mut cached = self.cached.lock().await;
            if let Some((at, outcome)) = &*cached
                && at.elapsed() < CACHE_FOR
            {
                return outcome.clone();
            }
            let outcome = self.probe().await;
            *cached = Some((Instant::now(), outcome.clone()));
            outcome
        })
    }
}
