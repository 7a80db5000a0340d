//! Calling other services: the `clients` config section turned into one
//! tonic channel per downstream, built once at startup (lazily connected,
//! with keepalive), behind one client layer stack (`stack`), and handed
//! to handlers as typed clients through [`Clients::get`]. The app closes
//! every channel at shutdown, after the servers have drained.
//!
//! `http://` endpoints hold one HTTP/2 connection (to a ClusterIP Service,
//! which pins it to one pod); `dns:///` endpoints balance across every
//! address the name resolves to (`balance`), as a headless Service needs.

mod balance;
mod layers;
mod methods;
mod readiness;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use prometheus::{IntCounterVec, Opts};
use prost_reflect::DescriptorPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use tower::util::BoxCloneSyncService;

pub use balance::{Resolve, ResolveFuture, SystemResolver};
pub use layers::{BUDGET_RESERVE, encode_grpc_timeout};

use crate::config::ClientSettings;
use crate::health::ReadinessCheck;
use crate::metrics::{Metrics, MetricsError};
use layers::{
    Close, Credentials, Deadline, FailureLog, Propagate, Req, Res, Retry, RetryBudget, RetryPolicy, Transport,
};
use methods::ClientMethods;

/// HTTP/2 PINGs on idle connections too, so a dead downstream is noticed
/// before a call waits on it; the server's own keepalive must allow this
/// rate (keel's does).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Endpoints a `dns:///` client can hold.
const MAX_ADDRESSES: usize = 1024;

/// The service every typed client is built over: the client layer stack
/// on top of the target's one channel. Cloning it reuses the channel.
#[derive(Clone)]
pub struct ClientChannel {
    inner: BoxCloneSyncService<Req, Res, Status>,
}

impl std::fmt::Debug for ClientChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientChannel")
    }
}

impl tower::Service<Req> for ClientChannel {
    type Response = Res;
    type Error = Status;
    type Future = <BoxCloneSyncService<Req, Res, Status> as tower::Service<Req>>::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.inner.call(request)
    }
}

/// A generated tonic client that [`Clients::get`] can build: its proto
/// service (for the metric series and the retry policy of its methods) and
/// its constructor. Implement it with [`grpc_client!`](crate::grpc_client).
pub trait GrpcClient: Sized {
    /// The fully qualified proto service, e.g. `shop.v1.Inventory`.
    const SERVICE: &'static str;
    fn from_channel(channel: ClientChannel) -> Self;
}

/// Makes a tonic-generated client usable with [`Clients::get`]:
/// `keel::grpc_client!(InventoryClient<ClientChannel> => "shop.v1.Inventory");`
#[macro_export]
macro_rules! grpc_client {
    ($client:ty => $service:literal) => {
        impl $crate::clients::GrpcClient for $client {
            const SERVICE: &'static str = $service;
            fn from_channel(channel: $crate::clients::ClientChannel) -> Self {
                <$client>::new(channel)
            }
        }
    };
}

crate::grpc_client!(crate::proto::user::v1::user_service_client::UserServiceClient<ClientChannel> => "user.v1.UserService");
crate::grpc_client!(tonic_health::pb::health_client::HealthClient<ClientChannel> => "grpc.health.v1.Health");

/// Why the clients cannot be built or a client cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no client named {name:?} is configured (configured: {configured}); add clients.{name}.endpoint")]
    Unknown { name: String, configured: String },
    #[error("client {name}: invalid endpoint {endpoint}")]
    Endpoint {
        name: String,
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("client {name}: cannot read {file}")]
    TlsFile {
        name: String,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("client {name}: cannot read its token")]
    Token {
        name: String,
        #[source]
        source: crate::secret_file::SecretFileError,
    },
    #[error("client {name}: service {service} has no descriptors; put its .proto under proto/")]
    NoDescriptor { name: String, service: &'static str },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("clients are built inside a Tokio runtime: their channels and resolvers run on it")]
    NoRuntime,
}

/// `authorization: Bearer <token>`, marked sensitive so it is never logged.
pub fn bearer(token: &str) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    if token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()) {
        // Rejected by hand too: HeaderValue allows spaces and tabs.
        return HeaderValue::from_bytes(b"\n");
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// One configured downstream.
struct Target {
    /// The stack over the channel; cloned into every typed client.
    channel: ClientChannel,
    /// Its methods, to pre-initialise the series of a declared service.
    methods: Arc<ClientMethods>,
    /// For the shutdown log.
    endpoint: String,
    /// Its readiness check, when `required_for_readiness`.
    readiness: Option<Arc<readiness::DownstreamHealth>>,
}

/// Every configured client, by name. Built once at startup; handed to
/// services through [`crate::registry::ServiceContext::clients`].
pub struct Clients {
    targets: BTreeMap<String, Target>,
    /// Cancelled by [`Clients::close`]: the close layer of every client and
    /// the resolver tasks watch it.
    closed: CancellationToken,
    /// The `dns:///` resolver tasks, awaited at close.
    resolvers: Vec<JoinHandle<()>>,
}

impl Clients {
    /// Builds every client of `settings` with the system resolver.
    pub fn build(
        settings: &BTreeMap<String, ClientSettings>,
        pool: &DescriptorPool,
        metrics: &Metrics,
    ) -> Result<Self, ClientError> {
        Self::build_with_resolver(settings, pool, metrics, Arc::new(SystemResolver))
    }

    /// As [`Clients::build`], resolving `dns:///` names with `resolve`
    /// (tests stand several servers behind one name with it).
    pub fn build_with_resolver(
        settings: &BTreeMap<String, ClientSettings>,
        pool: &DescriptorPool,
        metrics: &Metrics,
        resolve: Arc<dyn Resolve>,
    ) -> Result<Self, ClientError> {
        tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let closed = CancellationToken::new();
        let mut targets = BTreeMap::new();
        let mut resolvers = Vec::new();
        let retries = IntCounterVec::new(
            Opts::new(
                "keel_grpc_client_retries_total",
                "Retries of client calls (outcome=retried), and retries the budget refused (budget_exhausted).",
            ),
            &["grpc_client_target", "outcome"],
        )
        .map_err(MetricsError::from)?;
        if !settings.is_empty() {
            metrics.register(Box::new(retries.clone()))?;
        }
        for (name, client) in settings {
            let methods = Arc::new(ClientMethods::new(pool.clone(), metrics.grpc_client.for_target(name)));
            // Every gRPC server speaks health; a client known only from
            // config is measured through it.
            methods.declare("grpc.health.v1.Health");
            let (transport, resolver) = transport(name, client, resolve.clone(), &closed)?;
            resolvers.extend(resolver.map(|r| tokio::spawn(r.run())));
            let credentials = credentials(name, client)?;
            let policy = Arc::new(RetryPolicy {
                max_attempts: client.retry.max_attempts,
                initial_backoff: client.retry.initial_backoff,
                max_backoff: client.retry.max_backoff,
                budget: RetryBudget::new(client.retry.budget_percent),
                retried: retries.with_label_values(&[name, "retried"]),
                throttled: retries.with_label_values(&[name, "budget_exhausted"]),
            });
            let channel = stack(name, client, transport, methods.clone(), policy, credentials, closed.clone());
            let readiness = client.required_for_readiness.then(|| {
                Arc::new(readiness::DownstreamHealth {
                    client: name.clone(),
                    health: tonic_health::pb::health_client::HealthClient::new(channel.clone()),
                    cached: tokio::sync::Mutex::new(None),
                })
            });
            targets.insert(name.clone(), Target { channel, methods, endpoint: client.endpoint.clone(), readiness });
        }
        Ok(Self { targets, closed, resolvers })
    }

    /// A typed client of the downstream `name`, e.g.
    /// `clients.get::<InventoryClient<ClientChannel>>("inventory")`. Its
    /// service's methods are measured from now on (at zero until called).
    /// Cloning the client reuses the one channel.
    pub fn get<C: GrpcClient>(&self, name: &str) -> Result<C, ClientError> {
        let target = self.target(name)?;
        if !target.methods.declare(C::SERVICE) {
            return Err(ClientError::NoDescriptor { name: name.to_owned(), service: C::SERVICE });
        }
        Ok(C::from_channel(target.channel.clone()))
    }

    /// The layered channel of `name`, for hand-written clients.
    pub fn channel(&self, name: &str) -> Result<ClientChannel, ClientError> {
        Ok(self.target(name)?.channel.clone())
    }

    /// The configured client names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.targets.keys().map(String::as_str)
    }

    fn target(&self, name: &str) -> Result<&Target, ClientError> {
        self.targets.get(name).ok_or_else(|| ClientError::Unknown {
            name: name.to_owned(),
            configured: if self.targets.is_empty() {
                "none".to_owned()
            } else {
                self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// The readiness checks of the clients with `required_for_readiness`,
    /// named `clients.<name>`.
    pub fn readiness_checks(&self) -> Vec<(String, Arc<dyn ReadinessCheck>)> {
        self.targets
            .iter()
            .filter_map(|(name, t)| {
                let check: Arc<dyn ReadinessCheck> = t.readiness.clone()?;
                Some((format!("clients.{name}"), check))
            })
            .collect()
    }

    /// Closes every channel: calls still in flight end with CANCELLED, new
    /// ones are refused, resolvers stop (awaited within `bound`), and this
    /// registry's clones are dropped; the connections close when the last
    /// handler's clone goes with the drained servers.
    pub async fn close(mut self, bound: Duration) {
        self.closed.cancel();
        let resolvers = std::mem::take(&mut self.resolvers);
        let stopped = tokio::time::timeout(bound, async {
            for resolver in resolvers {
                let _ = resolver.await;
            }
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("shutdown: client resolvers did not stop in time");
        }
        for (name, target) in std::mem::take(&mut self.targets) {
            let endpoint = target.endpoint.clone();
            drop(target);
            tracing::info!(client = %name, %endpoint, "shutdown: client channel closed");
        }
    }
}

impl Drop for Clients {
    /// Clients dropped without [`Clients::close`] (an app whose build failed
    /// later on) still stop their resolver tasks and refuse further calls.
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// The client layer stack, outermost first. Each layer is one concern:
fn stack(
    name: &str,
    settings: &ClientSettings,
    transport: Transport,
    methods: Arc<ClientMethods>,
    policy: Arc<RetryPolicy>,
    credentials: Credentials,
    closed: CancellationToken,
) -> ClientChannel {
    // Retries sit innermost: each attempt is a fresh request on the channel,
    // inside the one deadline, and is not a new call to the layers above.
    let retry = Retry { inner: transport, methods: methods.clone(), policy };
    // Propagation sets headers once; every attempt carries them.
    let propagate = Propagate { inner: retry, credentials };
    // The deadline bounds all attempts and their backoff together, and an
    // expired one answers here, before anything is sent.
    let deadline = Deadline { inner: propagate, timeout: settings.timeout };
    // Metrics see one call per call, with its final code, including the
    // calls the deadline refused.
    let measured = tower::ServiceBuilder::new()
        .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new))
        .layer(crate::grpc::middleware::metrics::GrpcMetricsLayer::client(methods))
        .service(deadline);
    // One log line per failed call.
    let logged = FailureLog { inner: measured, client: Arc::from(name) };
    // Outermost, so shutdown cancels a call wherever it is.
    let closing = Close { inner: logged, closed };
    ClientChannel { inner: BoxCloneSyncService::new(closing) }
}

/// The innermost service of a client: one lazily connecting channel, or a
/// balanced one fed by a resolver task.
fn transport(
    name: &str,
    settings: &ClientSettings,
    resolve: Arc<dyn Resolve>,
    closed: &CancellationToken,
) -> Result<(Transport, Option<balance::Resolver>), ClientError> {
    let endpoint_error =
        |source| ClientError::Endpoint { name: name.to_owned(), endpoint: settings.endpoint.clone(), source };
    let configure = {
        let connect_timeout = settings.connect_timeout;
        move |endpoint: Endpoint| {
            endpoint
                .connect_timeout(connect_timeout)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
                .tcp_nodelay(true)
        }
    };
    let Some(target) = settings.endpoint.strip_prefix("dns:///") else {
        let mut endpoint = Endpoint::from_shared(settings.endpoint.clone()).map_err(endpoint_error)?;
        if settings.endpoint.starts_with("https://") {
            let host = endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
            let tls = tls_config(name, &settings.tls, host)?;
            endpoint = endpoint.tls_config(tls).map_err(endpoint_error)?;
        }
        return Ok((Transport { channel: configure(endpoint).connect_lazy(), lost: None }, None));
    };
    // Validated by config: `host:port`.
    let (host, port) = target.rsplit_once(':').unwrap_or((target, "0"));
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    // Every resolved address is dialled by IP; the certificate is checked
    // against the name.
    let tls = if settings.tls.configured() { Some(tls_config(name, &settings.tls, &host)?) } else { None };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let port = port.parse().unwrap_or(0);
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(MAX_ADDRESSES);
    let lost = Arc::new(Notify::new());
    let client: Arc<str> = Arc::from(name);
    let resolver = balance::Resolver {
        client: client.clone(),
        host,
        port,
        interval: settings.resolve_interval,
        resolve,
        endpoint: Box::new(move |addr: SocketAddr| {
            match Endpoint::from_shared(format!("{scheme}://{addr}")).and_then(|endpoint| match &tls {
                Some(tls) => endpoint.tls_config(tls.clone()),
                None => Ok(endpoint),
            }) {
                Ok(endpoint) => Some(configure(endpoint)),
                Err(error) => {
                    tracing::warn!(client = %client, %addr, %error, "cannot use a resolved address");
                    None
                }
            }
        }),
        changes,
        lost: lost.clone(),
        stop: closed.clone(),
    };
    Ok((Transport { channel, lost: Some(lost) }, Some(resolver)))
}

/// TLS to a downstream: its CA (or the web PKI roots), keel's own
/// certificate for mTLS, and the name to verify (the endpoint's host unless
/// `server_name` is set). ALPN h2 is tonic's.
fn tls_config(
    name: &str,
    tls: &crate::config::ClientTlsSettings,
    host: &str,
) -> Result<tonic::transport::ClientTlsConfig, ClientError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |file: &str| {
        std::fs::read(file).map_err(|source| ClientError::TlsFile {
            name: name.to_owned(),
            file: file.to_owned(),
            source,
        })
    };
    let server_name = if tls.server_name.is_empty() { host } else { tls.server_name.as_str() };
    let mut config = ClientTlsConfig::new().domain_name(server_name);
    config = if tls.ca_file.is_empty() {
        config.with_webpki_roots()
    } else {
        config.ca_certificate(Certificate::from_pem(read(&tls.ca_file)?))
    };
    if !tls.cert_file.is_empty() {
        config = config.identity(Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?));
    }
    Ok(config)
}

/// A client's credentials: its token (inline or from a watched file), the
/// caller's, or none.
fn credentials(name: &str, settings: &ClientSettings) -> Result<Credentials, ClientError> {
    if !settings.token.is_empty() {
        // Checked by config already.
        return Ok(match bearer(&settings.token) {
            Ok(value) => Credentials::Token(crate::secret_file::Watched::fixed(value)),
            Err(_) => Credentials::None,
        });
    }
    if !settings.token_file.is_empty() {
        // Named by its key in logs and `keel_secret_reloads_total`; one small
        // string per client for the life of the process.
        let secret: &'static str = Box::leak(format!("clients.{name}.token_file").into_boxed_str());
        let watched = crate::secret_file::watch(
            secret,
            vec![settings.token_file.clone().into()],
            crate::secret_file::DEFAULT_POLL_INTERVAL,
            |contents| {
                let token = crate::secret_file::trimmed_utf8(contents.first().map_or(&[][..], Vec::as_slice))?;
                bearer(&token).map_err(|_| "the token must be visible ASCII without spaces".to_owned())
            },
        )
        .map_err(|source| ClientError::Token { name: name.to_owned(), source })?;
        return Ok(Credentials::Token(watched));
    }
    if settings.propagate_authorization { Ok(Credentials::Propagate) } else { Ok(Credentials::None) }
}
