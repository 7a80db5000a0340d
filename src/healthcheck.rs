//! `keel healthcheck`: a one-shot gRPC health check against a running
//! server, so the image needs no separate probe binary.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Why a health check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("invalid address")]
    Address(#[source] tonic::transport::Error),
    #[error("cannot start a runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect")]
    Connect(#[source] tonic::transport::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("health check failed")]
    Rpc(#[source] tonic::Status),
    #[error("status is {0}")]
    NotServing(&'static str),
}

/// Where to reach a server listening on `bound`: a wildcard address means
/// this host, so use loopback.
pub fn local_target(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bound.port()),
        _ => bound,
    }
}

/// Checks `service` at `addr` (`host:port`), within `timeout` in all.
pub fn check(addr: &str, service: &str, timeout: Duration) -> Result<(), CheckError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CheckError::Runtime)?;
    runtime.block_on(async {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(CheckError::Address)?
            .connect_timeout(timeout)
            .timeout(timeout);
        let attempt = async {
            let channel = endpoint.connect().await.map_err(CheckError::Connect)?;
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest { service: service.to_owned() })
                .await
                .map_err(CheckError::Rpc)?;
            match ServingStatus::try_from(response.into_inner().status) {
                Ok(ServingStatus::Serving) => Ok(()),
                Ok(other) => Err(CheckError::NotServing(other.as_str_name())),
                Err(_) => Err(CheckError::NotServing("UNRECOGNIZED")),
            }
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| CheckError::Timeout(timeout))?
    })
}
