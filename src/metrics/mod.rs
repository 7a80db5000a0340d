//! The Prometheus registry and every metric family keel exports.
//!
//! gRPC metrics use exactly the names and labels of go-grpc-middleware's
//! Prometheus provider, so dashboards and alerts built for Go services work
//! unchanged. Label children are resolved once per method or route at
//! startup; the request path only increments pre-resolved counters. The
//! gRPC series, which every call touches several times, are kept per
//! thread and summed at scrape time ([`sharded`]). Process metrics come
//! from [`process`].

mod process;
mod sharded;

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tonic::Code;

/// Every gRPC code, in wire order, for pre-initialising `handled` series.
pub const ALL_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The code as grpc-go spells it (`OK`, `Canceled`, `NotFound`, ...), the
/// spelling Prometheus dashboards and log queries built for Go services use.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// HTTP statuses given their own pre-resolved child per route.
const COMMON_HTTP_STATUSES: [u16; 16] =
    [200, 400, 401, 403, 404, 405, 409, 413, 415, 429, 499, 500, 501, 503, 504, 502];

#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics")]
pub struct MetricsError(#[from] prometheus::Error);

/// The registry and the families the layers record into. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    /// Everything below is registered here; `/metrics` renders it.
    registry: Registry,
    /// `grpc_server_*`: calls this process serves.
    pub grpc_server: GrpcFamilies,
    /// `grpc_client_*`: calls this process makes, labelled by
    /// `grpc_client_target`: `gateway` for the gateway's own channel (the
    /// default of these families), a client's name for the downstream
    /// clients (see [`GrpcFamilies::for_target`]).
    pub grpc_client: GrpcFamilies,
    /// `http_*`: the gateway's requests, by route template.
    pub http: HttpMetrics,
    /// Stream producers still running (`keel_grpc_live_streams`).
    pub live_streams: IntGauge,
    /// HTTP connections closed at accept because the server's
    /// `max_connections` was reached (`keel_http_connections_rejected_total`,
    /// by `server`: gateway or admin).
    pub http_connections_rejected: IntCounterVec,
    /// Calls refused with RESOURCE_EXHAUSTED because
    /// `grpc.max_concurrent_requests` were in flight
    /// (`keel_grpc_requests_shed_total`); counted on the refusal path only.
    pub grpc_shed: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let grpc_server = GrpcFamilies::new(&registry, RpcSide::Server)?;
        let grpc_client = GrpcFamilies::new(&registry, RpcSide::Client)?;
        let http = HttpMetrics::new(&registry)?;
        let live_streams = IntGauge::new("keel_grpc_live_streams", "Server-stream producers currently running.")?;
        registry.register(Box::new(live_streams.clone()))?;
        let http_connections_rejected = IntCounterVec::new(
            Opts::new(
                "keel_http_connections_rejected_total",
                "HTTP connections closed at accept because the server's connection cap was reached.",
            ),
            &["server"],
        )?;
        registry.register(Box::new(http_connections_rejected.clone()))?;
        let grpc_shed = IntCounter::new(
            "keel_grpc_requests_shed_total",
            "Calls refused with RESOURCE_EXHAUSTED because grpc.max_concurrent_requests calls were in flight.",
        )?;
        registry.register(Box::new(grpc_shed.clone()))?;
        let build_info = IntGauge::with_opts(
            Opts::new("keel_build_info", "Build information; the value is always 1.")
                // KEEL_VERSION: the image's version build arg (a release tag
                // or a pre-release such as 0.2.0-rc.1); the crate's otherwise.
                .const_label("version", option_env!("KEEL_VERSION").unwrap_or(env!("CARGO_PKG_VERSION")))
                .const_label("commit", option_env!("KEEL_GIT_COMMIT").unwrap_or("unknown")),
        )?;
        build_info.set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(process::ProcessCollector::new()?))?;
        registry.register(Box::new(process::MemoryLimitCollector::new()?))?;
        Ok(Self { registry, grpc_server, grpc_client, http, live_streams, http_connections_rejected, grpc_shed })
    }

    /// Exports `shutdown.drain_delay + shutdown.timeout`, the longest a
    /// graceful shutdown can take, so deployments can check their grace
    /// period against it (`keel_shutdown_budget_seconds`).
    pub fn export_shutdown_budget(&self, budget: std::time::Duration) -> Result<(), MetricsError> {
        let gauge = Gauge::new(
            "keel_shutdown_budget_seconds",
            "Longest graceful shutdown: shutdown.drain_delay + shutdown.timeout.",
        )?;
        gauge.set(budget.as_secs_f64());
        self.registry.register(Box::new(gauge))?;
        Ok(())
    }

    /// Exports a counter whose value is read from `read` at scrape time,
    /// for counts kept elsewhere (such as the log writer's drops).
    pub fn export_counter_fn(&self, name: &str, help: &str, read: fn() -> u64) -> Result<(), MetricsError> {
        self.registry.register(Box::new(process::CounterFn::new(name, help, read)?))?;
        Ok(())
    }

    /// Exports a gauge with a fixed value, such as a configured limit that
    /// panels draw usage against.
    pub fn export_gauge(&self, name: &str, help: &str, value: f64) -> Result<(), MetricsError> {
        let gauge = Gauge::new(name, help)?;
        gauge.set(value);
        self.registry.register(Box::new(gauge))?;
        Ok(())
    }

    /// Exports a gauge whose value `read` computes at scrape time.
    pub fn export_gauge_fn(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        self.registry.register(Box::new(process::GaugeFn::new(name, help, Box::new(read))?))?;
        Ok(())
    }

    /// Exports `name{label="…"} 1`, with the label value `read` returns at
    /// scrape time (the current log filter, say).
    pub fn export_info_fn(
        &self,
        name: &str,
        help: &str,
        label: &str,
        read: impl Fn() -> String + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        self.registry.register(Box::new(process::InfoFn::new(name, help, label, Box::new(read))?))?;
        Ok(())
    }

    /// Registers a component's own collector (the database pool's).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<(), MetricsError> {
        self.registry.register(collector)?;
        Ok(())
    }

    /// The exposition in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if let Err(error) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        out
    }
}

/// Which end of a call a set of gRPC families measures.
#[derive(Clone, Copy)]
enum RpcSide {
    Server,
    Client,
}

/// One side's (server or client) gRPC metric families.
#[derive(Clone)]
pub struct GrpcFamilies {
    /// The five families and their series, kept per thread
    /// ([`sharded`]) and registered as one collector.
    families: Arc<sharded::Families>,
    /// The `grpc_client_target` label of client families; `None` on the
    /// server side, which has no such label.
    target: Option<Arc<str>>,
}

/// The `grpc_client_target` of the gateway's calls into its own server.
pub const GATEWAY_TARGET: &str = "gateway";

impl GrpcFamilies {
    /// The same client families, with series labelled for `target`
    /// (a downstream client's name), so its calls never mix with the
    /// gateway's.
    pub fn for_target(&self, target: &str) -> Self {
        Self { target: self.target.as_ref().map(|_| Arc::from(target)), ..self.clone() }
    }

    fn new(registry: &Registry, side: RpcSide) -> Result<Self, prometheus::Error> {
        let (prefix, who) = match side {
            RpcSide::Server => ("grpc_server", "on the server"),
            RpcSide::Client => ("grpc_client", "by the client"),
        };
        // go-grpc-middleware's labels; the client side adds its target
        // (and `handled_total` adds the code after the method).
        let labels: &[&str] = match side {
            RpcSide::Server => &["grpc_type", "grpc_service", "grpc_method"],
            RpcSide::Client => &["grpc_type", "grpc_service", "grpc_method", "grpc_client_target"],
        };
        let (received_help, sent_help) = match side {
            RpcSide::Server => (
                "Total number of RPC stream messages received on the server.",
                "Total number of gRPC stream messages sent by the server.",
            ),
            RpcSide::Client => (
                "Total number of RPC stream messages received by the client.",
                "Total number of gRPC stream messages sent by the client.",
            ),
        };
        let text = |name: &str, help: String| sharded::FamilyText { name: format!("{prefix}_{name}"), help };
        let families = Arc::new(sharded::Families::new(
            [
                text("started_total", format!("Total number of RPCs started {who}.")),
                text(
                    "handled_total",
                    format!("Total number of RPCs completed {who}, regardless of success or failure."),
                ),
                text("msg_received_total", received_help.to_owned()),
                text("msg_sent_total", sent_help.to_owned()),
                text(
                    "handling_seconds",
                    format!(
                        "Histogram of response latency (seconds) of gRPC that had been application-level handled {who}."
                    ),
                ),
            ],
            labels,
        )?);
        registry.register(Box::new(SharedFamilies(families.clone())))?;
        Ok(Self {
            families,
            target: match side {
                RpcSide::Server => None,
                RpcSide::Client => Some(Arc::from(GATEWAY_TARGET)),
            },
        })
    }

    /// Resolves (and so pre-initialises at zero) every series of a method.
    pub fn method(&self, grpc_type: &str, service: &str, method: &str) -> MethodMetrics {
        let mut values = vec![grpc_type, service, method];
        values.extend(self.target.as_deref());
        MethodMetrics(self.families.series(&values))
    }
}

/// The registry owns its collectors; the families stay shared with every
/// [`GrpcFamilies`] that makes series.
struct SharedFamilies(Arc<sharded::Families>);

impl prometheus::core::Collector for SharedFamilies {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

/// The pre-resolved series of one method.
#[derive(Clone, Debug)]
pub struct MethodMetrics(Arc<sharded::Series>);

impl MethodMetrics {
    pub fn started(&self) {
        self.0.started();
    }

    pub fn received(&self, messages: u64) {
        if messages > 0 {
            self.0.received(messages);
        }
    }

    pub fn sent(&self, messages: u64) {
        if messages > 0 {
            self.0.sent(messages);
        }
    }

    /// The call ended with `code` after `elapsed`.
    pub fn handled(&self, code: Code, elapsed: std::time::Duration) {
        self.0.handled(code, elapsed);
    }
}

/// The gateway's HTTP families, labelled by route template.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests handled by the gateway, by route template and status."),
            &["method", "route", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time until the gateway's response headers, by route template.",
            ),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self { requests, duration })
    }

    /// Resolves the series of one route (a template, never a raw path).
    pub fn route(&self, method: &str, route: &str) -> RouteMetrics {
        let codes = COMMON_HTTP_STATUSES
            .iter()
            .map(|code| (*code, self.requests.with_label_values(&[method, route, &code.to_string()])))
            .collect();
        RouteMetrics(Arc::new(RouteSeries {
            method: method.to_owned(),
            route: route.to_owned(),
            codes,
            requests: self.requests.clone(),
            duration: self.duration.with_label_values(&[method, route]),
        }))
    }
}

/// The pre-resolved series of one route.
#[derive(Clone, Debug)]
pub struct RouteMetrics(Arc<RouteSeries>);

#[derive(Debug)]
struct RouteSeries {
    method: String,
    route: String,
    codes: Vec<(u16, IntCounter)>,
    /// For the rare status without a pre-resolved child.
    requests: IntCounterVec,
    duration: Histogram,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, seconds: f64) {
        let series = &self.0;
        match series.codes.iter().find(|(code, _)| *code == status) {
            Some((_, counter)) => counter.inc(),
            None => series.requests.with_label_values(&[&series.method, &series.route, &status.to_string()]).inc(),
        }
        series.duration.observe(seconds);
    }
}
