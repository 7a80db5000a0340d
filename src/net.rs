//! Binding listeners: every server binds through here, so a taken port is
//! one error that names the config key and the address.

use std::net::SocketAddr;

use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (the {key} address)")]
pub struct BindError {
    /// The config key the address came from, e.g. `grpc.addr`.
    pub key: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` and reads back the address actually bound, so port 0 works.
pub async fn bind(key: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let fail = |source| BindError { key, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}
