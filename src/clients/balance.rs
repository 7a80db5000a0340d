//! `dns:///host:port` endpoints: every address the name resolves to joins
//! one balanced channel, and the name is re-resolved every
//! `resolve_interval` and whenever a call loses its connection, so pods
//! added behind a headless Service receive calls and removed ones leave.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;

/// The future a [`Resolve`] returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns a host and port into addresses. The system resolver in
/// production; tests supply their own to stand several servers behind one
/// name.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

/// `getaddrinfo` through tokio: what a headless Service's DNS name gives.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// After a re-resolution triggered by a lost connection, the next one
/// waits at least this long, so a downstream that refuses every call
/// cannot turn the resolver into a DNS flood.
const MIN_PAUSE: Duration = Duration::from_millis(250);

/// Everything the resolver task of one client needs.
pub struct Resolver {
    pub client: Arc<str>,
    pub host: String,
    pub port: u16,
    pub interval: Duration,
    pub resolve: Arc<dyn Resolve>,
    /// Builds the endpoint of one address with the client's settings.
    pub endpoint: Box<dyn Fn(SocketAddr) -> Option<Endpoint> + Send>,
    /// The balanced channel's discovery side.
    pub changes: Sender<Change<SocketAddr, Endpoint>>,
    /// Woken by the transport layer when a call lost its connection.
    pub lost: Arc<Notify>,
    /// Cancelled when the client closes.
    pub stop: CancellationToken,
}

impl Resolver {
    /// Runs until the client closes.
    pub async fn run(self) {
        let mut current: BTreeSet<SocketAddr> = BTreeSet::new();
        loop {
            match self.resolve.resolve(&self.host, self.port).await {
                Ok(found) if !found.is_empty() => {
                    let found: BTreeSet<SocketAddr> = found.into_iter().collect();
                    let added: Vec<SocketAddr> = found.difference(&current).copied().collect();
                    let removed: Vec<SocketAddr> = current.difference(&found).copied().collect();
                    for addr in &removed {
                        if self.changes.send(Change::Remove(*addr)).await.is_err() {
                            return;
                        }
                    }
                    for addr in &added {
                        let Some(endpoint) = (self.endpoint)(*addr) else { continue };
                        if self.changes.send(Change::Insert(*addr, endpoint)).await.is_err() {
                            return;
                        }
                    }
                    if !added.is_empty() || !removed.is_empty() {
                        tracing::info!(
                            client = %self.client,
                            host = %self.host,
                            addresses = found.len(),
                            added = added.len(),
                            removed = removed.len(),
                            "client addresses changed"
                        );
                    }
                    current = found;
                }
                // An empty answer while pods restart would leave nothing to
                // call; the last addresses are the better guess.
                Ok(_) => {
                    tracing::warn!(client = %self.client, host = %self.host, "name resolved to no address; keeping the last ones")
                }
                Err(error) => {
                    tracing::warn!(client = %self.client, host = %self.host, %error, "cannot resolve; keeping the last addresses")
                }
            }
            let lost = tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(self.interval) => false,
                () = self.lost.notified() => true,
            };
            if lost {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(MIN_PAUSE) => {}
                }
            }
        }
    }
}
