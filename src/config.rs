//! Typed settings and their layered loading.
//!
//! Layers, each overriding the one before: built-in defaults →
//! `config/default.yaml` → `config/$KEEL_ENV.yaml` → `--config FILE` →
//! `KEEL__*` environment variables. Every value is validated before anything
//! starts, and every error names the key and the layer it came from, because
//! the operator reading it must be able to fix it without reading code.

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
    pub grpc: GrpcSettings,
    pub http: HttpSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
    pub shutdown: ShutdownSettings,
    pub streams: StreamSettings,
    pub tracing: TracingSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    pub addr: SocketAddr,
    /// HTTP/2 PING interval; detects dead peers holding endless streams open.
    #[serde(with = "human_duration")]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "human_duration")]
    pub keepalive_timeout: Duration,
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
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 9000)),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_decoding_message_size: ByteSize(4 * 1024 * 1024),
            max_encoding_message_size: ByteSize(4 * 1024 * 1024),
            max_concurrent_streams: 1024,
            max_concurrent_requests: 4096,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(3600),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
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
    /// `POST /{package.Service}/{Method}`.
    pub unannotated_routes: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_body_size: ByteSize(4 * 1024 * 1024),
            default_timeout: Duration::from_secs(30),
            default_stream_timeout: Duration::from_secs(3600),
            max_timeout: Duration::from_secs(3600),
            sse_keepalive: Duration::from_secs(15),
            unannotated_routes: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    pub addr: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self { addr: SocketAddr::from(([0, 0, 0, 0], 8081)) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// An `EnvFilter` directive such as `info` or `keel=debug,tower=warn`.
    /// `RUST_LOG` wins over it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { level: "info".to_owned(), format: LogFormat::Json }
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
    /// Runs without authentication; must be set explicitly in production.
    pub disabled: bool,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("disabled", &self.disabled)
            .finish()
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
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self { drain_delay: Duration::from_secs(5), timeout: Duration::from_secs(20) }
    }
}

impl ShutdownSettings {
    /// The longest a shutdown can take; the pod's grace period must exceed it.
    pub fn max_duration(&self) -> Duration {
        self.drain_delay + self.timeout
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
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self { buffer: 16, watch_buffer: 256 }
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

/// A size in bytes, written as an integer or with a unit (`4MiB`, `512KiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: usize =
            digits.parse().map_err(|_| format!("invalid size {text:?}: expected e.g. 4194304, 512KiB or 4MiB"))?;
        let multiplier: usize = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1024,
            "MB" => 1000 * 1000,
            "MiB" => 1024 * 1024,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1024 * 1024 * 1024,
            other => return Err(format!("invalid size unit {other:?} in {text:?}: use B, KiB, MiB or GiB")),
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
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {text:?} ({e}): expected e.g. 250ms, 5s or 1m"))
        })
    }
}

fn redact_all<S: Serializer>(tokens: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(tokens.iter().map(|_| "<redacted>"))
}

/// A configuration problem. Each one stops the process with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
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
    /// The `KEEL_ENV` value, selecting the overlay.
    pub environment: Option<String>,
    /// The `--config FILE` layer; unlike the directory's files it must exist.
    pub file: Option<PathBuf>,
    /// Environment variables considered for `KEEL__*` overrides.
    pub env_vars: Vec<(String, String)>,
}

impl ConfigSources {
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let env_vars: Vec<(String, String)> =
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
        let lookup =
            |name: &str| env_vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
        Self {
            dir: lookup(CONFIG_DIR_VAR).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("config")),
            environment: lookup(ENV_NAME_VAR),
            file,
            env_vars,
        }
    }

    /// True when running with `KEEL_ENV=production`.
    pub fn is_production(&self) -> bool {
        self.environment.as_deref() == Some("production")
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
        builder = builder.add_source(yaml_file(&sources.dir.join("default.yaml"), false));
        if let Some(env) = &sources.environment {
            builder = builder.add_source(yaml_file(&sources.dir.join(format!("{env}.yaml")), false));
        }
        if let Some(file) = &sources.file {
            if !file.is_file() {
                return Err(ConfigError::File {
                    path: file.display().to_string(),
                    reason: "no such file (given with --config)".to_owned(),
                });
            }
            builder = builder.add_source(yaml_file(file, true));
        }
        builder = builder.add_source(EnvSource::new(&sources.env_vars, &known));

        let merged = builder.build().map_err(file_error)?;
        let tree = merged.collect().map_err(file_error)?;
        check_known_keys(&tree, &known, "")?;

        let settings: Settings = merged.try_deserialize().map_err(|e| invalid_from(e, &tree))?;
        settings.validate(&tree)?;
        if sources.is_production() && settings.auth.tokens.is_empty() && !settings.auth.disabled {
            return Err(ConfigError::Invalid {
                key: "auth.tokens".to_owned(),
                origin: origin_of(&tree, "auth.tokens"),
                reason: format!(
                    "{ENV_NAME_VAR}=production requires at least one token (or auth.disabled: true to run without)"
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
            ("grpc.max_decoding_message_size", self.grpc.max_decoding_message_size.0),
            ("grpc.max_encoding_message_size", self.grpc.max_encoding_message_size.0),
            ("grpc.max_concurrent_streams", self.grpc.max_concurrent_streams as usize),
            ("http.max_body_size", self.http.max_body_size.0),
            ("grpc.max_concurrent_requests", self.grpc.max_concurrent_requests),
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
        ] {
            if value.is_zero() {
                return Err(fail(key, "must be greater than zero".to_owned()));
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
        if self.auth.tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(fail("auth.tokens", "tokens must not be empty".to_owned()));
        }
        Ok(())
    }

    /// The effective settings as pretty JSON, with secrets redacted.
    pub fn to_redacted_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

fn yaml_file(path: &Path, required: bool) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(path).format(config::FileFormat::Yaml).required(required)
}

fn file_error(error: config::ConfigError) -> ConfigError {
    match error {
        config::ConfigError::FileParse { uri, cause } => {
            ConfigError::File { path: uri.unwrap_or_else(|| "<unknown>".to_owned()), reason: cause.to_string() }
        }
        config::ConfigError::Foreign(cause) => {
            ConfigError::File { path: "<unknown>".to_owned(), reason: cause.to_string() }
        }
        other => ConfigError::File { path: "<unknown>".to_owned(), reason: other.to_string() },
    }
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

/// Rejects any key that no setting has, so a typo (`adress`) is never ignored.
fn check_known_keys(tree: &Map<String, Value>, known: &serde_json::Value, prefix: &str) -> Result<(), ConfigError> {
    for (name, value) in tree {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        let Some(expected) = known.get(name) else {
            return Err(ConfigError::UnknownKey { origin: describe_origin(value.origin(), &key), key });
        };
        if let (ValueKind::Table(children), serde_json::Value::Object(_)) = (&value.kind, expected) {
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
    describe_origin(found.and_then(Value::origin), key)
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

/// `KEEL__*` variables as a config layer. Written by hand rather than with
/// `config::Environment` so list-valued keys are split on commas (and only
/// those), and so errors can name the exact variable.
#[derive(Debug, Clone)]
struct EnvSource {
    values: BTreeMap<String, Value>,
}

impl EnvSource {
    fn new(vars: &[(String, String)], known: &serde_json::Value) -> Self {
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

impl Source for EnvSource {
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
        assert!(ByteSize::parse("4 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn env_var_names_mirror_keys() {
        assert_eq!(env_var_name("grpc.addr"), "KEEL__GRPC__ADDR");
        assert_eq!(env_var_name("shutdown.drain_delay"), "KEEL__SHUTDOWN__DRAIN_DELAY");
    }
}
