//! Typed settings and their layered loading.
//!
//! Layers, each overriding the one before: built-in defaults →
//! `config/default.yaml` → `config/$KEEL_ENV.yaml` → `--config FILE` →
//! `KEEL__*` environment variables. Every value is validated before anything
//! starts, and every error names the key and the layer it came from, because
//! the operator reading it must be able to fix it without reading code.
//!
//! A layer that was asked for must exist: a `KEEL_ENV` without its overlay,
//! a `KEEL_CONFIG_DIR` that is not there, or a missing `--config FILE` is an
//! error, because silently skipping it would drop the settings (bind
//! addresses, auth) the operator meant to apply. Only the default `config`
//! directory may be absent, since the built-in defaults are complete.
//!
//! The built-in defaults listen on loopback; `config/production.yaml` binds
//! every interface, so a process only becomes reachable from other hosts when
//! it is deliberately run as production (or given addresses).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Map, Source, Value, ValueKind};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of the environment variables that override settings
/// (`KEEL__GRPC__ADDR`). The rename script rewrites it.
pub const ENV_PREFIX: &str = "KEEL";
/// Selects the `config/$KEEL_ENV.yaml` overlay.
pub const ENV_NAME_VAR: &str = "KEEL_ENV";
/// Overrides the directory holding `default.yaml` and the overlays.
pub const CONFIG_DIR_VAR: &str = "KEEL_CONFIG_DIR";
/// The exit code for any configuration error (sysexits.h `EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;

const ENV_SEPARATOR: &str = "__";

/// Everything keel can be configured with. Unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The gRPC listener and its limits.
    pub grpc: GrpcSettings,
    /// The HTTP/JSON gateway.
    pub http: HttpSettings,
    /// The private admin listener.
    pub admin: AdminSettings,
    /// Log level and format.
    pub log: LogSettings,
    /// Bearer tokens, or auth off.
    pub auth: AuthSettings,
    /// Drain delay and bound.
    pub shutdown: ShutdownSettings,
    /// Server-stream buffering.
    pub streams: StreamSettings,
    /// OTLP span export.
    pub tracing: TracingSettings,
    /// The PostgreSQL store; empty `url` keeps the in-memory one.
    pub database: DatabaseSettings,
    /// The tokio runtime's size.
    pub runtime: RuntimeSettings,
    /// Downstream gRPC services this one calls, by name (`clients.inventory`);
    /// see [`crate::clients`].
    pub clients: BTreeMap<String, ClientSettings>,
}

/// The async runtime. Its own key because the right thread count depends on
/// where keel runs: tokio sizes its pool from the CPUs it sees (the cgroup
/// CPU quota included), so a pod with a CPU limit of 1 gets one worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Worker threads of the multi-threaded runtime; 0 lets tokio choose
    /// (one per CPU it may use). Set it when a CPU limit would otherwise
    /// shrink the pool below the cores the pod actually gets in bursts.
    pub worker_threads: usize,
}

/// The most worker threads `runtime.worker_threads` accepts: far above any
/// node's cores, low enough that a typo (10000) fails instead of spawning.
pub const MAX_WORKER_THREADS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    /// Where this listener binds; port 0 picks a free one.
    pub addr: SocketAddr,
    /// HTTP/2 PING interval, `0s` for none (the default). PINGs also find
    /// a peer whose process hangs while its kernel answers, but hyper's
    /// keepalive bookkeeping runs on every frame of every connection
    /// (about 2% of a unary call's CPU); the TCP keepalive below finds
    /// dead peers for nothing per call.
    #[serde(with = "human_duration")]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "human_duration")]
    pub keepalive_timeout: Duration,
    /// Idle time before the kernel probes a connection (TCP keepalive),
    /// `0s` for never: finds peers that vanished (a node gone, a network
    /// cut) holding streams open, and keeps NAT, IPVS and cloud
    /// load-balancer idle timers from dropping quiet connections.
    #[serde(with = "human_duration")]
    pub tcp_keepalive: Duration,
    /// Time between unanswered keepalive probes.
    #[serde(with = "human_duration")]
    pub tcp_keepalive_interval: Duration,
    /// Unanswered probes after which the connection is dropped. The same
    /// bound (`tcp_keepalive + tcp_keepalive_interval × probes`) becomes
    /// the connection's `TCP_USER_TIMEOUT`, so data sent to a vanished peer
    /// fails as soon, instead of after ~15 minutes of retransmissions.
    pub tcp_keepalive_probes: u32,
    /// Largest request message the server decodes.
    pub max_decoding_message_size: ByteSize,
    /// Largest response message the server encodes.
    pub max_encoding_message_size: ByteSize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection.
    pub max_concurrent_streams: u32,
    /// Calls in flight (streams included) beyond which new calls get
    /// RESOURCE_EXHAUSTED at once.
    pub max_concurrent_requests: usize,
    /// Deadline of a unary call that names none.
    #[serde(with = "human_duration")]
    pub default_timeout: Duration,
    /// No call may ask for a longer deadline; also the deadline of a
    /// server stream that names none.
    #[serde(with = "human_duration")]
    pub max_timeout: Duration,
    /// Connections are asked to go away after this long, so long-lived
    /// HTTP/2 connections rebalance across pods.
    #[serde(with = "human_duration")]
    pub max_connection_age: Duration,
    /// How long a connection past its age may finish its calls.
    #[serde(with = "human_duration")]
    pub max_connection_age_grace: Duration,
    /// Serves gRPC reflection (v1 and v1alpha), so grpcurl and IDEs can
    /// list and call the API without its protos. The production overlay
    /// turns it off: a public pod should not describe its API to anyone.
    pub reflection: bool,
    /// Sends the call's `x-request-id` back in the response headers of
    /// gRPC calls, so a caller can quote a generated id. On by default.
    /// Services at very high call rates may turn it off, as grpc-go and
    /// Envoy (`always_set_request_id_in_response`) leave it off: the id is
    /// in the access line and goes downstream either way, and the echo is
    /// one more HPACK header (Huffman-coded, never indexed) on every
    /// response, about 3% of a trivial unary call's CPU. The gateway's REST
    /// and gRPC-Web responses carry it whatever this says; off, they only
    /// lose the gRPC side's copy, `Grpc-Metadata-X-Request-Id`.
    pub echo_request_id: bool,
    /// TLS (and mTLS) on this listener; plaintext while `cert_file` is empty.
    pub tls: TlsSettings,
}

/// `<listener>.tls`: certificate files, re-read when their content changes
/// (the secrets-from-files convention), so cert-manager rotations need no
/// restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first. Empty: this listener is plaintext.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: String,
    /// PEM CA bundle; when set, clients must present a certificate it signed
    /// (mTLS), and the verified identity reaches auth, handlers and the log.
    pub client_ca_file: String,
}

impl TlsSettings {
    /// True when this listener terminates TLS.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
            keepalive_interval: Duration::ZERO,
            keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
            tcp_keepalive_interval: Duration::from_secs(10),
            tcp_keepalive_probes: 3,
            max_decoding_message_size: ByteSize(4 * 1024 * 1024),
            max_encoding_message_size: ByteSize(4 * 1024 * 1024),
            max_concurrent_streams: 1024,
            max_concurrent_requests: 4096,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(3600),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(60),
            reflection: true,
            echo_request_id: true,
            tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Where this listener binds; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Largest request body the gateway reads; larger ones get 413.
    pub max_body_size: ByteSize,
    /// Deadline of a unary call without a `Grpc-Timeout` header.
    #[serde(with = "human_duration")]
    pub default_timeout: Duration,
    /// Deadline of a streaming call without a `Grpc-Timeout` header.
    #[serde(with = "human_duration")]
    pub default_stream_timeout: Duration,
    /// No call through the gateway may ask for a longer deadline.
    #[serde(with = "human_duration")]
    pub max_timeout: Duration,
    /// Interval of keep-alive comments on Server-Sent Events streams.
    #[serde(with = "human_duration")]
    pub sse_keepalive: Duration,
    /// Serves methods without a `google.api.http` annotation at
    /// `POST /{package.Service}/{Method}`. Off by default, as grpc-gateway's
    /// `generate_unbound_methods`: an internal RPC is not public by accident.
    pub unannotated_routes: bool,
    /// What an unknown JSON field or query parameter does.
    pub unknown_fields: UnknownFields,
    /// Request headers passed to the service as `grpcgateway-<name>`
    /// metadata (grpc-gateway's permanent headers, by default).
    pub permanent_headers: Vec<String>,
    /// Cross-origin requests; off while `allowed_origins` is empty.
    pub cors: CorsSettings,
    /// A new connection must send its first request's headers within this,
    /// and a request begun on a kept-alive connection must finish its
    /// headers within this of its first byte; otherwise the connection is
    /// closed. Bounds slowloris clients.
    #[serde(with = "human_duration")]
    pub header_read_timeout: Duration,
    /// A request body must arrive in full within this of its headers;
    /// otherwise the request gets 408 and the connection is closed.
    #[serde(with = "human_duration")]
    pub body_read_timeout: Duration,
    /// A connection with no request in flight is closed after this. Longer
    /// than the usual load balancer idle timeout (60 s), so the balancer,
    /// not keel, closes a pooled connection and never races a request.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
    /// Open connections beyond which new ones are closed at once (and
    /// counted in `keel_http_connections_rejected_total`).
    pub max_connections: usize,
    /// TLS (and mTLS) on the gateway, with ALPN h2 and http/1.1.
    pub tls: TlsSettings,
}

/// `http.unknown_fields`: strict (as Envoy) or lenient (as grpc-gateway).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    /// A 400 that names the field or parameter.
    #[default]
    Reject,
    /// Dropped, so newer clients can call older servers.
    Ignore,
}

impl<'de> Deserialize<'de> for UnknownFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "reject" => Ok(Self::Reject),
            "ignore" => Ok(Self::Ignore),
            _ => Err(serde::de::Error::custom(format!("unknown value {text:?}: expected reject or ignore"))),
        }
    }
}

/// grpc-gateway's permanent HTTP headers, less three: `Authorization` is
/// forwarded as itself, `Host` as `x-forwarded-host`, and `Cookie` never,
/// since cookies are credentials a gRPC service should not see by default.
pub const DEFAULT_PERMANENT_HEADERS: [&str; 21] = [
    "accept",
    "accept-charset",
    "accept-language",
    "accept-ranges",
    "cache-control",
    "content-type",
    "date",
    "expect",
    "from",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-schedule-tag-match",
    "if-unmodified-since",
    "max-forwards",
    "origin",
    "pragma",
    "referer",
    "user-agent",
    "via",
    "warning",
];

/// `http.cors`: answered by tower-http's CORS layer in front of every route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins allowed to call (`https://app.example.com`), or `["*"]`.
    /// Empty: CORS is off and no CORS header is ever sent.
    pub allowed_origins: Vec<String>,
    /// Methods a preflight allows.
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight allows.
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read.
    pub exposed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(with = "human_duration")]
    pub max_age: Duration,
    /// Sends `Access-Control-Allow-Credentials: true` (not with origin `*`).
    pub allow_credentials: bool,
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].map(str::to_owned).to_vec(),
            allowed_headers: [
                "authorization",
                "content-type",
                "grpc-timeout",
                "x-request-id",
                "x-grpc-web",
                "x-user-agent",
            ]
            .map(str::to_owned)
            .to_vec(),
            exposed_headers: ["grpc-status", "grpc-message", "x-request-id"].map(str::to_owned).to_vec(),
            max_age: Duration::from_secs(600),
            allow_credentials: false,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_size: ByteSize(4 * 1024 * 1024),
            default_timeout: Duration::from_secs(30),
            default_stream_timeout: Duration::from_secs(3600),
            max_timeout: Duration::from_secs(3600),
            sse_keepalive: Duration::from_secs(15),
            unannotated_routes: false,
            unknown_fields: UnknownFields::Reject,
            permanent_headers: DEFAULT_PERMANENT_HEADERS.map(str::to_owned).to_vec(),
            cors: CorsSettings::default(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            // Room for thousands of open watches (1,100 in the benchmarks)
            // next to ordinary traffic; the open-file limit is raised to
            // fit at start.
            max_connections: 4096,
            tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Where this listener binds; port 0 picks a free one.
    pub addr: SocketAddr,
    /// As `http.header_read_timeout`. Probes and scrapes send tiny
    /// requests, so this can be short. (No admin route reads a body, so
    /// there is no body timeout.)
    #[serde(with = "human_duration")]
    pub header_read_timeout: Duration,
    /// As `http.idle_timeout`: longer than Prometheus' usual scrape
    /// interval, so a scraper's kept-alive connection is reused.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
    /// As `http.max_connections`; the admin port serves only probes and
    /// scrapes.
    pub max_connections: usize,
    /// Off by default: kubelet probes and most Prometheus setups scrape
    /// plaintext. Takes the same settings as `http.tls`.
    pub tls: TlsSettings,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(75),
            max_connections: 128,
            tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// An `EnvFilter` directive such as `info` or `keel=debug,tower=warn`.
    /// `RUST_LOG` wins over it.
    pub level: String,
    /// JSON for machines, pretty for people.
    pub format: LogFormat,
    /// Which calls get an access line: `all`, `errors` (failed or slow
    /// calls only, for services at very high rates) or `off`.
    pub access: AccessLogMode,
    /// With `access: errors`, calls slower than this are logged too.
    #[serde(with = "human_duration")]
    pub access_slow: Duration,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Json,
            access: AccessLogMode::All,
            access_slow: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogMode {
    /// One line per call: the default.
    #[default]
    All,
    /// Only calls that failed on the server's side or took longer than
    /// `log.access_slow`.
    Errors,
    /// No access lines.
    Off,
}

impl<'de> Deserialize<'de> for AccessLogMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "all" => Ok(Self::All),
            "errors" => Ok(Self::Errors),
            "off" => Ok(Self::Off),
            _ => {
                Err(serde::de::Error::custom(format!("unknown access log mode {text:?}: expected all, errors or off")))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line: the production default.
    #[default]
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Accepted bearer tokens. Never printed.
    #[serde(serialize_with = "redact_all")]
    pub tokens: Vec<String>,
    /// A file holding the tokens (a mounted Kubernetes Secret), separated by
    /// commas or newlines; exclusive with `tokens`. Re-read when its content
    /// changes, so a rotated token works without a restart and a removed
    /// one stops working.
    pub tokens_file: String,
    /// Runs without authentication; must be set explicitly in production.
    pub disabled: bool,
    /// JWTs from an OIDC provider; configuring `issuer` turns auth on.
    pub jwt: JwtSettings,
}

impl AuthSettings {
    /// True when tokens are configured, inline or as a file.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || !self.tokens_file.is_empty()
    }
}

/// The tokens of a tokens file: separated by commas or newlines (so a
/// Secret made with `--from-literal=tokens='a,b'` and one with a token per
/// line both work), surrounding whitespace ignored. A file with no token is
/// refused, so an emptied Secret never turns authentication into "nobody
/// gets in" by accident: the previous tokens stay.
pub fn parse_tokens(contents: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(contents).map_err(|_| "the file is not UTF-8".to_owned())?;
    let tokens: Vec<String> =
        text.split([',', '\n']).map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect();
    if tokens.is_empty() {
        return Err("the file holds no token".to_owned());
    }
    Ok(tokens)
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("tokens_file", &self.tokens_file)
            .field("disabled", &self.disabled)
            .field("jwt", &self.jwt)
            .finish()
    }
}

impl AuthSettings {
    /// True when some credential is configured (static tokens or JWTs).
    pub fn configured(&self) -> bool {
        self.has_tokens() || self.jwt.enabled()
    }
}

/// `auth.jwt`: bearer JWTs verified against the issuer's JWKS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// The `iss` every token must carry. Empty: JWT auth is off.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one. Required
    /// with `issuer`, since a token meant for another service must fail.
    pub audiences: Vec<String>,
    /// Where the JWKS is fetched (`https://idp/.well-known/jwks.json`);
    /// plain `http://` only on loopback. Exclusive with `jwks_file`.
    pub jwks_url: String,
    /// A JWKS file instead (re-read when its content changes).
    pub jwks_file: String,
    /// Accepted `alg` values: asymmetric only (`none` and HMAC never, so a
    /// public key can never serve as a shared secret).
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "human_duration")]
    pub leeway: Duration,
    /// Extra PEM CA bundle for the JWKS endpoint; empty: the webpki roots.
    pub ca_file: String,
    /// How often the JWKS is re-fetched.
    #[serde(with = "human_duration")]
    pub refresh_interval: Duration,
    /// The least time between fetches caused by an unknown `kid`, so forged
    /// kids cannot hammer the identity provider.
    #[serde(with = "human_duration")]
    pub min_refresh_interval: Duration,
    /// Full method name (`/user.v1.UserService/DeleteUser`) → scopes a
    /// token must all hold to call it (PERMISSION_DENIED otherwise).
    /// Overrides the method's `keel.auth.v1.required_scopes` proto option.
    pub required_scopes: BTreeMap<String, Vec<String>>,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            jwks_url: String::new(),
            jwks_file: String::new(),
            algorithms: ["RS256", "ES256", "EdDSA"].map(str::to_owned).to_vec(),
            leeway: Duration::from_secs(30),
            ca_file: String::new(),
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(10),
            required_scopes: BTreeMap::new(),
        }
    }
}

impl JwtSettings {
    /// True when JWTs are accepted.
    pub fn enabled(&self) -> bool {
        !self.issuer.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long to keep serving after turning unready, so load balancers
    /// stop routing here before the listeners close.
    #[serde(with = "human_duration")]
    pub drain_delay: Duration,
    /// The bound on draining in-flight calls and streams once the listeners
    /// have closed; whatever remains after it is cancelled.
    #[serde(with = "human_duration")]
    pub timeout: Duration,
    /// The bound on the final flush after the drain: buffered log lines and
    /// spans. Whatever is not out by then is lost, so exit is never held.
    #[serde(with = "human_duration")]
    pub flush_timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(20),
            flush_timeout: Duration::from_secs(1),
        }
    }
}

/// How long streams get to deliver their final status once the drain bound
/// has passed, before their connections are dropped.
pub const ABORT_GRACE: Duration = Duration::from_millis(500);

impl ShutdownSettings {
    /// The longest a shutdown can take: the drain delay, the drain bound,
    /// the grace for cancelled streams, and the final flush. The pod's grace
    /// period must exceed it.
    pub fn max_duration(&self) -> Duration {
        self.drain_delay + self.timeout + ABORT_GRACE + self.flush_timeout
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    /// Messages a stream's producer may queue ahead of a slow client.
    pub buffer: usize,
    /// Events a WatchUsers subscriber may fall behind before it is ended
    /// with RESOURCE_EXHAUSTED.
    pub watch_buffer: usize,
    /// The same bound in bytes (encoded size of the queued events), so a few
    /// large events cannot hold more memory than this per subscriber.
    pub watch_buffer_bytes: ByteSize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self { buffer: 16, watch_buffer: 256, watch_buffer_bytes: ByteSize(1024 * 1024) }
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err(serde::de::Error::custom(format!("unknown log format {text:?}: expected json or pretty"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSettings {
    /// OTLP/gRPC collector to export spans to, e.g.
    /// `http://otel-collector:4317`. Empty: no export (the default).
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Fraction of new traces to sample; a sampled parent is always
    /// followed.
    pub sample_ratio: f64,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), service_name: env!("CARGO_PKG_NAME").to_owned(), sample_ratio: 1.0 }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:5432/db?sslmode=require`. Empty (and
    /// no `url_file`): the in-memory store. A secret: its password is
    /// redacted by `keel config` and never logged.
    #[serde(serialize_with = "redact_url")]
    pub url: String,
    /// A file holding the URL (a mounted Kubernetes Secret), read at
    /// startup; exclusive with `url`. Surrounding whitespace is ignored.
    pub url_file: String,
    /// The pool's upper bound on connections.
    pub max_connections: u32,
    /// Connections the pool keeps open even when idle.
    pub min_connections: u32,
    /// How long a query may wait for a free connection before the call
    /// fails with UNAVAILABLE.
    #[serde(with = "human_duration")]
    pub acquire_timeout: Duration,
    /// The longest any statement may run; a call's remaining deadline
    /// shortens it (`SET LOCAL statement_timeout`).
    #[serde(with = "human_duration")]
    pub statement_timeout: Duration,
    /// Runs the embedded migrations before serving (otherwise run
    /// `keel migrate`, as the chart's hook Job does).
    pub migrate_on_start: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            url_file: String::new(),
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            migrate_on_start: false,
        }
    }
}

impl DatabaseSettings {
    /// True when a database is configured (after `url_file` was read).
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redacted_url(&self.url))
            .field("url_file", &self.url_file)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

/// A database URL with its password (in the user info or a `password=`
/// parameter) replaced by `<redacted>`; what cannot be parsed is redacted
/// whole.
pub fn redacted_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    let Some((scheme, rest)) = url.split_once("://") else { return "<redacted>".to_owned() };
    let (before_query, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:<redacted>@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=<redacted>"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

fn redact_url<S: Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redacted_url(url))
}

/// `clients.<name>`: one downstream service and how calls to it behave.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSettings {
    /// `http://host:port` (one HTTP/2 connection, as to a ClusterIP
    /// Service), or `dns:///host:port` (every address the name resolves to,
    /// balanced and re-resolved: for a headless Service).
    pub endpoint: String,
    /// The deadline of a call that has none; a caller's shorter remaining
    /// deadline wins.
    #[serde(with = "human_duration")]
    pub timeout: Duration,
    /// How long establishing one connection may take.
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// A bearer token sent as `authorization` on every call. A secret:
    /// redacted by `keel config` and never logged.
    #[serde(serialize_with = "redact_secret")]
    pub token: String,
    /// A file holding the token (a mounted Secret), re-read when it
    /// changes; exclusive with `token`.
    pub token_file: String,
    /// Forwards the caller's own `authorization` when no token is set.
    pub propagate_authorization: bool,
    /// Retries of UNAVAILABLE calls to idempotent methods.
    pub retry: RetrySettings,
    /// `/readyz` fails while the downstream's `grpc.health.v1` check does.
    pub required_for_readiness: bool,
    /// How often a `dns:///` name is re-resolved (also on connection loss).
    #[serde(with = "human_duration")]
    pub resolve_interval: Duration,
    /// TLS to the downstream: used for `https://` endpoints, and for
    /// `dns:///` ones when any of its files is set.
    pub tls: ClientTlsSettings,
}

/// `clients.<name>.tls`: how keel verifies the downstream and, for mTLS,
/// which certificate it presents. Read at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// PEM CA bundle the downstream's certificate must chain to; empty: the
    /// public web PKI roots (webpki-roots).
    pub ca_file: String,
    /// PEM certificate chain keel presents (mTLS); needs `key_file`.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// The name the downstream's certificate must carry; empty: the
    /// endpoint's host.
    pub server_name: String,
}

impl ClientTlsSettings {
    /// True when any TLS file or name is set.
    pub fn configured(&self) -> bool {
        !(self.ca_file.is_empty()
            && self.cert_file.is_empty()
            && self.key_file.is_empty()
            && self.server_name.is_empty())
    }
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            token: String::new(),
            token_file: String::new(),
            propagate_authorization: false,
            retry: RetrySettings::default(),
            required_for_readiness: false,
            resolve_interval: Duration::from_secs(30),
            tls: ClientTlsSettings::default(),
        }
    }
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("token_file", &self.token_file)
            .field("propagate_authorization", &self.propagate_authorization)
            .field("retry", &self.retry)
            .field("required_for_readiness", &self.required_for_readiness)
            .field("resolve_interval", &self.resolve_interval)
            .field("tls", &self.tls)
            .finish()
    }
}

/// `clients.<name>.retry`: gRPC's retry policy, with a budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts per call, the first included; 1 turns retries off.
    pub max_attempts: u32,
    /// The backoff before the first retry; doubled for each further one,
    /// then drawn at random below it (full jitter).
    #[serde(with = "human_duration")]
    pub initial_backoff: Duration,
    /// The backoff never grows past this.
    #[serde(with = "human_duration")]
    pub max_backoff: Duration,
    /// Retries may add at most this share of calls (beyond a small
    /// reserve), so a failing downstream is not hammered.
    pub budget_percent: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            budget_percent: 20,
        }
    }
}

fn redact_secret<S: Serializer>(secret: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if secret.is_empty() { "" } else { "<redacted>" })
}

/// A size in bytes, written as an integer or with a unit (`4MiB`, `512KiB`,
/// `4MB`). Units are matched case-insensitively (`4mb`, `4mib`), because
/// nothing else could be meant and rejecting `4mb` only frustrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    /// Parses `4194304`, `512KiB`, `4MiB` and the like (the loader's size
    /// parser; public so the fuzz targets reach it).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: usize =
            digits.parse().map_err(|_| format!("invalid size {text:?}: expected e.g. 4194304, 512KiB or 4MiB"))?;
        let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" => 1024,
            "mb" => 1000 * 1000,
            "mib" => 1024 * 1024,
            "gb" => 1000 * 1000 * 1000,
            "gib" => 1024 * 1024 * 1024,
            _ => {
                return Err(format!(
                    "invalid size unit {:?} in {text:?}: use B, KB, KiB, MB, MiB, GB or GiB (in any case)",
                    unit.trim()
                ));
            }
        };
        number.checked_mul(multiplier).map(ByteSize).ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0 as u64)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => {
                usize::try_from(n).map(ByteSize).map_err(|_| serde::de::Error::custom(format!("size {n} is too large")))
            }
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// Durations as human strings (`250ms`, `5s`, `1m 30s`).
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses a duration as the loader does (`250ms`, `5s`, `1m 30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?} ({e}): expected e.g. 250ms, 5s or 1m"))
}

fn redact_all<S: Serializer>(tokens: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(tokens.iter().map(|_| "<redacted>"))
}

/// A configuration problem. Each one stops the process with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    File {
        /// The path as given (or as joined onto the config directory), so
        /// the operator sees the name they wrote.
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("config file {path} does not exist (given with --config)")]
    MissingFile { path: String },
    #[error("config directory {path} does not exist (set by {CONFIG_DIR_VAR})")]
    MissingDir { path: String },
    #[error("cannot read config directory {path} ({origin})")]
    Dir {
        path: String,
        /// How the directory was chosen: the variable, or the default.
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{ENV_NAME_VAR}={environment} selects the config overlay {path}, which does not exist; \
         overlays in {dir}: {available}"
    )]
    MissingOverlay {
        environment: String,
        path: String,
        dir: String,
        /// The `KEEL_ENV` values that would work, so a typo is obvious.
        available: String,
    },
    #[error("invalid {ENV_NAME_VAR}={environment}: it names a file in the config directory, without `/`")]
    Environment { environment: String },
    #[error("cannot merge the config layers")]
    Merge(#[source] config::ConfigError),
    #[error("unknown config key `{key}` (from {origin})")]
    UnknownKey { key: String, origin: String },
    #[error("invalid value for config key `{key}` (from {origin}): {reason}")]
    Invalid { key: String, origin: String, reason: String },
}

/// Where the layers come from. [`ConfigSources::from_process`] reads the real
/// process; tests build one by hand so they never mutate the process env.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// Directory holding `default.yaml` and the `$KEEL_ENV.yaml` overlays.
    pub dir: PathBuf,
    /// True when `dir` was chosen with `KEEL_CONFIG_DIR`. A directory asked
    /// for must exist; the default `config` may be absent (a binary run from
    /// another directory), because the built-in defaults are complete.
    pub dir_from_env: bool,
    /// The `KEEL_ENV` value, selecting the overlay, which must exist.
    pub environment: Option<String>,
    /// The `--config FILE` layer, which must exist.
    pub file: Option<PathBuf>,
    /// Environment variables considered for `KEEL__*` overrides.
    pub env_vars: Vec<(String, String)>,
    /// True for `keel healthcheck`: a probe serves nothing, so the rules for
    /// a serving process (production needs tokens) are not applied. The
    /// chart's test pod runs it from the production image without tokens.
    pub probe: bool,
}

impl ConfigSources {
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let env_vars: Vec<(String, String)> =
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
        let lookup =
            |name: &str| env_vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
        let dir = lookup(CONFIG_DIR_VAR).map(PathBuf::from);
        Self {
            dir_from_env: dir.is_some(),
            dir: dir.unwrap_or_else(|| PathBuf::from("config")),
            environment: lookup(ENV_NAME_VAR),
            file,
            env_vars,
            probe: false,
        }
    }

    /// True when running with `KEEL_ENV=production`.
    pub fn is_production(&self) -> bool {
        self.environment.as_deref() == Some("production")
    }

    /// Fails when an explicitly chosen config directory is missing; returns
    /// whether the directory is there to read.
    fn check_dir(&self) -> Result<bool, ConfigError> {
        let path = self.dir.display().to_string();
        let origin = if self.dir_from_env {
            format!("set by {CONFIG_DIR_VAR}")
        } else {
            format!("the default; set {CONFIG_DIR_VAR} to choose another")
        };
        match std::fs::metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => Ok(true),
            Ok(_) => Err(ConfigError::Dir {
                path,
                origin,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !self.dir_from_env => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError::MissingDir { path }),
            Err(source) => Err(ConfigError::Dir { path, origin, source }),
        }
    }

    /// The `KEEL_ENV` values that have an overlay in the config directory.
    fn available_overlays(&self, dir_exists: bool) -> String {
        if !dir_exists {
            return "none (the directory does not exist)".to_owned();
        }
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".yaml")?;
                (stem != "default" && !stem.is_empty()).then(|| stem.to_owned())
            })
            .collect();
        names.sort();
        if names.is_empty() { "none".to_owned() } else { names.join(", ") }
    }
}

impl Settings {
    /// Merges every layer, rejects unknown keys, deserializes and validates.
    pub fn load(sources: &ConfigSources) -> Result<Self, ConfigError> {
        let known = serde_json::to_value(Settings::default()).map_err(|e| ConfigError::Invalid {
            key: String::new(),
            origin: "built-in defaults".to_owned(),
            reason: e.to_string(),
        })?;

        let mut builder = config::Config::builder();
        let dir_exists = sources.check_dir()?;
        if dir_exists && let Some(layer) = read_yaml(&sources.dir.join("default.yaml"))? {
            builder = builder.add_source(layer);
        }
        if let Some(env) = &sources.environment {
            // A name, not a path: the overlay is looked up in the directory.
            if env.contains(['/', '\\']) || env == "." || env == ".." {
                return Err(ConfigError::Environment { environment: env.clone() });
            }
            let path = sources.dir.join(format!("{env}.yaml"));
            let layer = if dir_exists { read_yaml(&path)? } else { None };
            let Some(layer) = layer else {
                return Err(ConfigError::MissingOverlay {
                    environment: env.clone(),
                    path: path.display().to_string(),
                    dir: sources.dir.display().to_string(),
                    available: sources.available_overlays(dir_exists),
                });
            };
            builder = builder.add_source(layer);
        }
        if let Some(file) = &sources.file {
            let Some(layer) = read_yaml(file)? else {
                return Err(ConfigError::MissingFile { path: file.display().to_string() });
            };
            builder = builder.add_source(layer);
        }
        builder = builder.add_source(Layer::from_env(&sources.env_vars, &known));

        let merged = builder.build().map_err(merge_error)?;
        let tree = merged.collect().map_err(merge_error)?;
        check_known_keys(&tree, &known, "")?;

        let mut settings: Settings = merged.try_deserialize().map_err(|e| invalid_from(e, &tree))?;
        settings.read_database_url(&tree)?;
        settings.validate(&tree)?;
        if !sources.probe && sources.is_production() && !settings.auth.configured() && !settings.auth.disabled {
            return Err(ConfigError::Invalid {
                key: "auth.tokens".to_owned(),
                origin: origin_of(&tree, "auth.tokens"),
                reason: format!(
                    "{ENV_NAME_VAR}=production requires at least one token in auth.tokens or auth.tokens_file, or auth.jwt (or auth.disabled: true to run without)"
                ),
            });
        }
        Ok(settings)
    }

    /// Checks what types alone cannot express.
    fn validate(&self, tree: &Map<String, Value>) -> Result<(), ConfigError> {
        let fail = |key: &str, reason: String| ConfigError::Invalid {
            key: key.to_owned(),
            origin: origin_of(tree, key),
            reason,
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(fail("log.level", format!("{:?} is not a log filter: {e}", self.log.level)));
        }
        let positive = [
            ("streams.buffer", self.streams.buffer),
            ("streams.watch_buffer", self.streams.watch_buffer),
            ("streams.watch_buffer_bytes", self.streams.watch_buffer_bytes.0),
            ("grpc.max_decoding_message_size", self.grpc.max_decoding_message_size.0),
            ("grpc.max_encoding_message_size", self.grpc.max_encoding_message_size.0),
            ("grpc.max_concurrent_streams", self.grpc.max_concurrent_streams as usize),
            ("http.max_body_size", self.http.max_body_size.0),
            ("grpc.max_concurrent_requests", self.grpc.max_concurrent_requests),
            ("http.max_connections", self.http.max_connections),
            ("admin.max_connections", self.admin.max_connections),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(fail(key, "must be greater than zero".to_owned()));
            }
        }
        for (key, value) in [
            ("grpc.default_timeout", self.grpc.default_timeout),
            ("grpc.max_timeout", self.grpc.max_timeout),
            ("grpc.max_connection_age", self.grpc.max_connection_age),
            ("http.default_timeout", self.http.default_timeout),
            ("http.default_stream_timeout", self.http.default_stream_timeout),
            ("http.max_timeout", self.http.max_timeout),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("http.idle_timeout", self.http.idle_timeout),
            ("admin.header_read_timeout", self.admin.header_read_timeout),
            ("admin.idle_timeout", self.admin.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(fail(key, "must be greater than zero".to_owned()));
            }
        }
        if !self.grpc.keepalive_interval.is_zero() && self.grpc.keepalive_timeout.is_zero() {
            return Err(fail(
                "grpc.keepalive_timeout",
                "must be greater than zero while grpc.keepalive_interval is".to_owned(),
            ));
        }
        if !self.grpc.tcp_keepalive.is_zero() {
            // Linux's own bounds (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT):
            // past them setsockopt fails on every accepted connection.
            const MAX_SECS: u64 = 32_767;
            for (key, value) in [
                ("grpc.tcp_keepalive", self.grpc.tcp_keepalive),
                ("grpc.tcp_keepalive_interval", self.grpc.tcp_keepalive_interval),
            ] {
                if value < Duration::from_secs(1) || value.as_secs() > MAX_SECS {
                    return Err(fail(
                        key,
                        format!("must be between 1s and {MAX_SECS}s (whole seconds, as the kernel counts)"),
                    ));
                }
            }
            if !(1..=127).contains(&self.grpc.tcp_keepalive_probes) {
                return Err(fail("grpc.tcp_keepalive_probes", "must be between 1 and 127".to_owned()));
            }
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(fail("tracing.sample_ratio", "must be between 0 and 1".to_owned()));
        }
        if !self.tracing.otlp_endpoint.is_empty() {
            let uri: Result<http::Uri, _> = self.tracing.otlp_endpoint.parse();
            if !uri.is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()) {
                return Err(fail(
                    "tracing.otlp_endpoint",
                    format!(
                        "{:?} is not an http(s) URL such as http://otel-collector:4317",
                        self.tracing.otlp_endpoint
                    ),
                ));
            }
            if !cfg!(feature = "otel") {
                return Err(fail("tracing.otlp_endpoint", "this keel was built without the `otel` feature".to_owned()));
            }
        }
        for name in &self.http.permanent_headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(fail("http.permanent_headers", format!("{name:?} is not a header name")));
            }
        }
        let cors = &self.http.cors;
        for origin in &cors.allowed_origins {
            let valid =
                origin == "*" || origin.parse::<http::Uri>().is_ok_and(|u| u.scheme().is_some() && u.host().is_some());
            if !valid {
                return Err(fail(
                    "http.cors.allowed_origins",
                    format!("{origin:?} is not an origin such as https://app.example.com, or *"),
                ));
            }
        }
        if cors.allowed_origins.len() > 1 && cors.allowed_origins.iter().any(|o| o == "*") {
            return Err(fail("http.cors.allowed_origins", "\"*\" must be the only origin".to_owned()));
        }
        if cors.allow_credentials && cors.allowed_origins.iter().any(|o| o == "*") {
            return Err(fail("http.cors.allow_credentials", "cannot be true with the origin \"*\"".to_owned()));
        }
        for method in &cors.allowed_methods {
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                return Err(fail("http.cors.allowed_methods", format!("{method:?} is not an HTTP method")));
            }
        }
        for (key, names) in
            [("http.cors.allowed_headers", &cors.allowed_headers), ("http.cors.exposed_headers", &cors.exposed_headers)]
        {
            if let Some(name) = names.iter().find(|n| http::HeaderName::from_bytes(n.as_bytes()).is_err()) {
                return Err(fail(key, format!("{name:?} is not a header name")));
            }
        }
        if self.auth.tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(fail("auth.tokens", "tokens must not be empty".to_owned()));
        }
        if !self.auth.tokens_file.is_empty() {
            if !self.auth.tokens.is_empty() {
                return Err(fail("auth.tokens_file", "set together with auth.tokens: use one of them".to_owned()));
            }
            // Read once here so that a missing or empty file stops keel with
            // exit 78 naming the key; the server watches it from then on.
            let contents = std::fs::read(&self.auth.tokens_file)
                .map_err(|e| fail("auth.tokens_file", format!("cannot read {}: {e}", self.auth.tokens_file)))?;
            parse_tokens(&contents)
                .map_err(|reason| fail("auth.tokens_file", format!("{}: {reason}", self.auth.tokens_file)))?;
        }
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            return Err(fail(
                "runtime.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; 0 lets tokio use one per CPU",
                    self.runtime.worker_threads
                ),
            ));
        }
        for (key, tls) in [("grpc.tls", &self.grpc.tls), ("http.tls", &self.http.tls), ("admin.tls", &self.admin.tls)] {
            // Named by the key that is set, whose layer is the one to fix.
            match (tls.cert_file.is_empty(), tls.key_file.is_empty()) {
                (false, true) => return Err(fail(&format!("{key}.cert_file"), "set without key_file".to_owned())),
                (true, false) => return Err(fail(&format!("{key}.key_file"), "set without cert_file".to_owned())),
                _ => {}
            }
            if !tls.client_ca_file.is_empty() && tls.cert_file.is_empty() {
                return Err(fail(
                    &format!("{key}.client_ca_file"),
                    "needs cert_file and key_file (mTLS is TLS)".to_owned(),
                ));
            }
        }
        self.validate_jwt(&fail)?;
        self.validate_database(&fail)?;
        self.validate_clients(&fail)
    }

    /// The `clients` section: names, endpoints, timeouts, tokens, retries.
    fn validate_clients(&self, fail: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        for (name, client) in &self.clients {
            let key = |field: &str| format!("clients.{name}.{field}");
            let valid_name = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(fail(
                    &format!("clients.{name}"),
                    "a client name is 1 to 63 of a-z, 0-9, _ and - (it labels metrics and logs)".to_owned(),
                ));
            }
            if let Err(reason) = check_client_endpoint(&client.endpoint) {
                return Err(fail(&key("endpoint"), reason));
            }
            let tls = &client.tls;
            if tls.configured() && client.endpoint.starts_with("http://") {
                return Err(fail(&key("tls"), "set for an http:// endpoint: use https://host:port".to_owned()));
            }
            match (tls.cert_file.is_empty(), tls.key_file.is_empty()) {
                (false, true) => return Err(fail(&key("tls.cert_file"), "set without tls.key_file".to_owned())),
                (true, false) => return Err(fail(&key("tls.key_file"), "set without tls.cert_file".to_owned())),
                _ => {}
            }
            for (field, path) in
                [("tls.ca_file", &tls.ca_file), ("tls.cert_file", &tls.cert_file), ("tls.key_file", &tls.key_file)]
            {
                if path.is_empty() {
                    continue;
                }
                let text = std::fs::read(path).map_err(|e| fail(&key(field), format!("cannot read {path}: {e}")))?;
                if !text.windows(11).any(|w| w == b"-----BEGIN ") {
                    return Err(fail(&key(field), format!("{path} holds no PEM block")));
                }
            }
            for (field, value) in [
                ("timeout", client.timeout),
                ("connect_timeout", client.connect_timeout),
                ("resolve_interval", client.resolve_interval),
                ("retry.initial_backoff", client.retry.initial_backoff),
                ("retry.max_backoff", client.retry.max_backoff),
            ] {
                if value.is_zero() {
                    return Err(fail(&key(field), "must be greater than zero".to_owned()));
                }
            }
            let retry = &client.retry;
            if !(1..=10).contains(&retry.max_attempts) {
                return Err(fail(&key("retry.max_attempts"), "must be between 1 and 10".to_owned()));
            }
            if retry.max_backoff < retry.initial_backoff {
                return Err(fail(&key("retry.max_backoff"), "must not be less than retry.initial_backoff".to_owned()));
            }
            if retry.budget_percent > 100 {
                return Err(fail(&key("retry.budget_percent"), "must be between 0 and 100".to_owned()));
            }
            if !client.token.is_empty() && !client.token_file.is_empty() {
                return Err(fail(&key("token_file"), "set together with token: use one of them".to_owned()));
            }
            if client.propagate_authorization && !(client.token.is_empty() && client.token_file.is_empty()) {
                return Err(fail(
                    &key("propagate_authorization"),
                    "set together with a token: either send the client's own token or the caller's".to_owned(),
                ));
            }
            if !client.token.is_empty() && crate::clients::bearer(&client.token).is_err() {
                // Never the token itself: it is a secret.
                return Err(fail(&key("token"), "must be visible ASCII without spaces".to_owned()));
            }
            if !client.token_file.is_empty() {
                let text = std::fs::read(&client.token_file)
                    .map_err(|e| fail(&key("token_file"), format!("cannot read {}: {e}", client.token_file)))?;
                let token = crate::secret_file::trimmed_utf8(&text)
                    .map_err(|e| fail(&key("token_file"), format!("{}: {e}", client.token_file)))?;
                if token.is_empty() || crate::clients::bearer(&token).is_err() {
                    return Err(fail(
                        &key("token_file"),
                        format!("{} must hold a token of visible ASCII without spaces", client.token_file),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `auth.jwt`: complete, with only asymmetric algorithms, and a JWKS
    /// URL that cannot be tampered with on the way.
    fn validate_jwt(&self, fail: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        let jwt = &self.auth.jwt;
        let set = !jwt.audiences.is_empty()
            || !jwt.jwks_url.is_empty()
            || !jwt.jwks_file.is_empty()
            || !jwt.required_scopes.is_empty();
        if !jwt.enabled() {
            if set {
                return Err(fail("auth.jwt.issuer", "required when any other auth.jwt key is set".to_owned()));
            }
            return Ok(());
        }
        if jwt.audiences.is_empty() || jwt.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err(fail("auth.jwt.audiences", "at least one non-empty audience is required".to_owned()));
        }
        match (jwt.jwks_url.is_empty(), jwt.jwks_file.is_empty()) {
            (true, true) => return Err(fail("auth.jwt.jwks_url", "set jwks_url or jwks_file".to_owned())),
            (false, false) => return Err(fail("auth.jwt.jwks_file", "set together with jwks_url: use one".to_owned())),
            _ => {}
        }
        if !jwt.jwks_url.is_empty() {
            crate::auth::jwks_url_check(&jwt.jwks_url).map_err(|reason| fail("auth.jwt.jwks_url", reason))?;
        }
        if jwt.algorithms.is_empty() {
            return Err(fail("auth.jwt.algorithms", "at least one algorithm is required".to_owned()));
        }
        for name in &jwt.algorithms {
            crate::auth::parse_algorithm(name).map_err(|reason| fail("auth.jwt.algorithms", reason))?;
        }
        for (key, value) in [
            ("auth.jwt.refresh_interval", jwt.refresh_interval),
            ("auth.jwt.min_refresh_interval", jwt.min_refresh_interval),
        ] {
            if value.is_zero() {
                return Err(fail(key, "must be greater than zero".to_owned()));
            }
        }
        for (method, scopes) in &jwt.required_scopes {
            if !method.starts_with('/') || method[1..].split('/').count() != 2 {
                return Err(fail(
                    "auth.jwt.required_scopes",
                    format!("{method:?} is not a full method name such as /user.v1.UserService/DeleteUser"),
                ));
            }
            if scopes.iter().any(|s| s.trim().is_empty() || s.contains(' ')) {
                return Err(fail("auth.jwt.required_scopes", format!("{method:?}: scopes are non-empty words")));
            }
        }
        Ok(())
    }

    /// The database section: the URL's form (never its text: it holds the
    /// password) and the pool's bounds.
    fn validate_database(&self, fail: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        let db = &self.database;
        if db.max_connections == 0 {
            return Err(fail("database.max_connections", "must be greater than zero".to_owned()));
        }
        if db.min_connections > db.max_connections {
            return Err(fail(
                "database.min_connections",
                format!("{} is more than database.max_connections ({})", db.min_connections, db.max_connections),
            ));
        }
        for (key, value) in
            [("database.acquire_timeout", db.acquire_timeout), ("database.statement_timeout", db.statement_timeout)]
        {
            if value.is_zero() {
                return Err(fail(key, "must be greater than zero".to_owned()));
            }
        }
        if !db.url.is_empty() {
            let key = if db.url_file.is_empty() { "database.url" } else { "database.url_file" };
            if !(db.url.starts_with("postgres://") || db.url.starts_with("postgresql://")) {
                return Err(fail(key, "expected a URL such as postgres://user:password@host:5432/db".to_owned()));
            }
            if let Err(error) = db.url.parse::<sqlx::postgres::PgConnectOptions>() {
                // The driver's message names the part that is wrong, never
                // the URL itself.
                return Err(fail(key, format!("not a valid PostgreSQL URL: {error}")));
            }
        }
        Ok(())
    }

    /// Reads `database.url_file` into `database.url`.
    fn read_database_url(&mut self, tree: &Map<String, Value>) -> Result<(), ConfigError> {
        let db = &mut self.database;
        if db.url_file.is_empty() {
            return Ok(());
        }
        let fail = |reason: String| ConfigError::Invalid {
            key: "database.url_file".to_owned(),
            origin: origin_of(tree, "database.url_file"),
            reason,
        };
        if !db.url.is_empty() {
            return Err(fail("set together with database.url: use one of them".to_owned()));
        }
        let text =
            std::fs::read_to_string(&db.url_file).map_err(|e| fail(format!("cannot read {}: {e}", db.url_file)))?;
        db.url = text.trim().to_owned();
        if db.url.is_empty() {
            return Err(fail(format!("{} is empty", db.url_file)));
        }
        Ok(())
    }

    /// The effective settings as pretty JSON, with secrets redacted.
    pub fn to_redacted_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Reads and parses one YAML layer; `None` when the file does not exist (the
/// caller decides whether that is an error). Read here rather than with
/// `config::File`, which reports paths relative to the current directory
/// and drops the I/O error: the origin of every value is the path as given.
fn read_yaml(path: &Path) -> Result<Option<Layer>, ConfigError> {
    let uri = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigError::File { path: uri, source: Box::new(e) }),
    };
    match config::Format::parse(&config::FileFormat::Yaml, Some(&uri), &text) {
        Ok(values) => Ok(Some(Layer { values: values.into_iter().collect() })),
        Err(source) => Err(ConfigError::File { path: uri, source }),
    }
}

/// An error of the `config` crate while merging layers we already parsed.
fn merge_error(error: config::ConfigError) -> ConfigError {
    ConfigError::Merge(error)
}

/// Maps a deserialization error onto the key it is about and that key's layer.
fn invalid_from(error: config::ConfigError, tree: &Map<String, Value>) -> ConfigError {
    let (key, reason) = match error {
        config::ConfigError::Type { key, unexpected, expected, .. } => {
            (key.unwrap_or_default(), format!("expected {expected}, found {unexpected}"))
        }
        config::ConfigError::At { error, key, .. } => (key.unwrap_or_default(), error.to_string()),
        config::ConfigError::NotFound(key) => (key, "missing".to_owned()),
        other => (String::new(), other.to_string()),
    };
    let origin = origin_of(tree, &key);
    ConfigError::Invalid { key, origin, reason }
}

/// Checks a client endpoint's form: `http://host:port`, `https://host:port`
/// or `dns:///host:port`.
fn check_client_endpoint(endpoint: &str) -> Result<(), String> {
    let example = "expected http://host:port, https://host:port or dns:///host:port";
    if endpoint.is_empty() {
        return Err(format!("is required ({example})"));
    }
    if let Some(target) = endpoint.strip_prefix("dns:///") {
        let (host, port) = target.rsplit_once(':').ok_or_else(|| format!("{endpoint:?} has no port ({example})"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{endpoint:?} is not a host and port ({example})"));
        }
        return Ok(());
    }
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("{endpoint:?} is not a URL ({e}); {example}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() || uri.port_u16().is_none() {
        return Err(format!("{endpoint:?}: {example}"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
        return Err(format!("{endpoint:?} must have no path; {example}"));
    }
    Ok(())
}

/// Rejects any key that no setting has, so a typo (`adress`) is never ignored.
fn check_known_keys(tree: &Map<String, Value>, known: &serde_json::Value, prefix: &str) -> Result<(), ConfigError> {
    for (name, value) in tree {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        // `clients` is a map: its names are free, their fields are not.
        if key == "clients"
            && let ValueKind::Table(entries) = &value.kind
        {
            let client = serde_json::to_value(ClientSettings::default()).unwrap_or_default();
            for (entry, settings) in entries {
                if let ValueKind::Table(fields) = &settings.kind {
                    check_known_keys(fields, &client, &format!("clients.{entry}"))?;
                }
            }
            continue;
        }
        let Some(expected) = known.get(name) else {
            return Err(ConfigError::UnknownKey { origin: describe_value_origin(value, &key), key });
        };
        // An empty table by default is a map whose keys are data
        // (`auth.jwt.required_scopes`), not settings.
        if let (ValueKind::Table(children), serde_json::Value::Object(fields)) = (&value.kind, expected)
            && !fields.is_empty()
        {
            check_known_keys(children, expected, &key)?;
        }
    }
    Ok(())
}

/// The layer a key's value came from, for error messages.
fn origin_of(tree: &Map<String, Value>, key: &str) -> String {
    let mut current = tree;
    let mut found: Option<&Value> = None;
    for segment in key.split('.') {
        let segment = segment.split('[').next().unwrap_or(segment);
        match current.get(segment) {
            Some(value) => {
                found = Some(value);
                if let ValueKind::Table(children) = &value.kind {
                    current = children;
                }
            }
            None => break,
        }
    }
    match found {
        Some(value) => describe_value_origin(value, key),
        None => describe_origin(None, key),
    }
}

/// Describes where `value` (at `key`) came from. Merging gives the tables it
/// creates on the way to a nested key no origin (`KEEL__GRPC__TLS__CERT_FILE`
/// creates `grpc.tls`), so a table without one is described by its first
/// leaf that has one, named by that leaf's key.
fn describe_value_origin(value: &Value, key: &str) -> String {
    match first_origin(value, key) {
        Some((origin, leaf_key)) => describe_origin(Some(origin), &leaf_key),
        None => describe_origin(None, key),
    }
}

fn first_origin<'a>(value: &'a Value, key: &str) -> Option<(&'a str, String)> {
    if let Some(origin) = value.origin() {
        return Some((origin, key.to_owned()));
    }
    let ValueKind::Table(children) = &value.kind else { return None };
    // Sorted, so that the message is the same on every run.
    let mut entries: Vec<(&String, &Value)> = children.iter().collect();
    entries.sort_by_key(|(name, _)| *name);
    entries.into_iter().find_map(|(name, child)| first_origin(child, &format!("{key}.{name}")))
}

fn describe_origin(origin: Option<&str>, key: &str) -> String {
    match origin {
        None => "built-in defaults".to_owned(),
        Some(o) if o.starts_with(ENV_ORIGIN) => format!("environment variable {}", env_var_name(key)),
        Some(path) => format!("file {path}"),
    }
}

const ENV_ORIGIN: &str = "environment";

/// `grpc.addr` → `KEEL__GRPC__ADDR`.
pub fn env_var_name(key: &str) -> String {
    let mut name = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.push_str(&key.to_uppercase().replace('.', ENV_SEPARATOR));
    name
}

/// One parsed layer handed to `config` for merging: a YAML file, or the
/// `KEEL__*` variables. Sorted, so that merging (and any error) is the same
/// on every run.
#[derive(Debug, Clone)]
struct Layer {
    values: BTreeMap<String, Value>,
}

impl Layer {
    /// `KEEL__*` variables as a layer. Built by hand rather than with
    /// `config::Environment` so list-valued keys are split on commas (and
    /// only those), and so errors can name the exact variable.
    fn from_env(vars: &[(String, String)], known: &serde_json::Value) -> Self {
        let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
        let origin = ENV_ORIGIN.to_owned();
        let mut values = BTreeMap::new();
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix(&prefix) else { continue };
            let key = rest.to_lowercase().replace(ENV_SEPARATOR, ".");
            let is_list = key
                .split('.')
                .try_fold(known, |node, segment| node.get(segment))
                .is_some_and(serde_json::Value::is_array);
            let kind = if is_list {
                ValueKind::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|item| !item.is_empty())
                        .map(|item| Value::new(Some(&origin), ValueKind::String(item.to_owned())))
                        .collect(),
                )
            } else {
                ValueKind::String(raw.clone())
            };
            values.insert(key, Value::new(Some(&origin), kind));
        }
        Self { values }
    }
}

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.values.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_and_without_units() {
        assert_eq!(ByteSize::parse("4MiB"), Ok(ByteSize(4 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("512KiB"), Ok(ByteSize(512 * 1024)));
        assert_eq!(ByteSize::parse("100"), Ok(ByteSize(100)));
        assert_eq!(ByteSize::parse("4mb"), Ok(ByteSize(4_000_000)));
        assert_eq!(ByteSize::parse("4mib"), Ok(ByteSize(4 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("2 GiB"), Ok(ByteSize(2 * 1024 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("1kB"), Ok(ByteSize(1000)));
        assert!(ByteSize::parse("4 parsecs").is_err());
        assert!(ByteSize::parse("4mbit").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn database_urls_are_redacted() {
        assert_eq!(redacted_url("postgres://keel:s3cret@db:5432/keel"), "postgres://keel:<redacted>@db:5432/keel");
        assert_eq!(redacted_url("postgres://keel@db/keel?sslmode=require"), "postgres://keel@db/keel?sslmode=require");
        assert_eq!(
            redacted_url("postgresql://db/keel?user=k&password=s3cret&sslmode=require"),
            "postgresql://db/keel?user=k&password=<redacted>&sslmode=require"
        );
        assert_eq!(redacted_url("p@ss"), "<redacted>");
        assert_eq!(redacted_url(""), "");
    }

    #[test]
    fn env_var_names_mirror_keys() {
        assert_eq!(env_var_name("grpc.addr"), "KEEL__GRPC__ADDR");
        assert_eq!(env_var_name("shutdown.drain_delay"), "KEEL__SHUTDOWN__DRAIN_DELAY");
    }
}
