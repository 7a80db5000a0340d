//! `keel healthcheck`: a one-shot gRPC health check against a running
//! server, so the image needs no separate probe binary. With `--tls` it
//! speaks TLS (and mTLS with a client certificate), so exec probes work
//! where Kubernetes' native gRPC probes cannot (they speak plaintext only).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
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
    #[error("cannot read {0}")]
    File(PathBuf, #[source] std::io::Error),
}

/// How `keel healthcheck --tls` connects.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA bundle to verify the server with; `None`: the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry; `None`: the host of the address.
    pub server_name: Option<String>,
    /// Certificate and key files, for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    fn config(&self, addr: &str) -> Result<ClientTlsConfig, CheckError> {
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| CheckError::File(path.clone(), e));
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
        let mut config =
            ClientTlsConfig::new().domain_name(self.server_name.clone().unwrap_or_else(|| host.to_owned()));
        config = match &self.ca_file {
            Some(path) => config.ca_certificate(Certificate::from_pem(read(path)?)),
            None => config.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }
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

/// Checks `service` at `addr` (`host:port`), within `timeout` in all, over
/// TLS when `tls` is given.
pub fn check(addr: &str, service: &str, timeout: Duration, tls: Option<&ClientTls>) -> Result<(), CheckError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CheckError::Runtime)?;
    runtime.block_on(async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(CheckError::Address)?
            .connect_timeout(timeout)
            .timeout(timeout);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.config(addr)?).map_err(CheckError::Address)?;
        }
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
