//! Logging and tracing: a tracing subscriber writing JSON lines (production)
//! or pretty text (a terminal), filtered by `log.level` unless `RUST_LOG` is
//! set; and, with the `otel` feature and `tracing.otlp_endpoint`, the same
//! spans exported over OTLP with W3C `traceparent` propagation, so a call
//! through the gateway and the gRPC server is one trace. Every line goes
//! through one non-blocking, batching writer ([`sink`]); the per-call
//! access line is formatted in [`access`].
//!
//! The level filter sits behind tracing-subscriber's reload layer, so
//! [`LogFilter`] (`PUT /log/level`, SIGHUP) swaps it without a restart. The
//! swap rebuilds tracing's callsite interest cache, so callsites that the
//! filter turns off still cost one cached check, as before; the JSON access
//! line never passes through the filter layer at all.

pub mod access;
pub mod sink;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogFormat, LogSettings, TracingSettings};
use crate::metrics::{Metrics, MetricsError};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter")]
    Filter(#[source] tracing_subscriber::filter::ParseError),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("cannot start the log writer thread")]
    Writer(#[source] std::io::Error),
    #[error("telemetry must be set up inside the tokio runtime")]
    NoRuntime,
    #[cfg(feature = "otel")]
    #[error("cannot set up the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the span exporter alive; [`TelemetryGuard::shutdown`] flushes it.
#[must_use = "dropping the guard without shutdown may lose the last lines and spans"]
#[derive(Default)]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Writes out every queued log line and exports the buffered spans,
    /// within `bound` (`shutdown.flush_timeout`): whatever is not out by
    /// then is abandoned, so exit is never held.
    pub async fn shutdown(self, bound: std::time::Duration) {
        #[cfg(feature = "otel")]
        let provider = self.provider;
        #[cfg(not(feature = "otel"))]
        let _ = self;
        // Both block (the span export runs on this runtime), so wait for
        // them from a blocking thread.
        let flush = tokio::task::spawn_blocking(move || {
            #[cfg(feature = "otel")]
            if let Some(provider) = provider
                && let Err(error) = provider.shutdown()
            {
                tracing::warn!(%error, "flushing spans failed");
            }
            // Last, so the span warning above is written too.
            flush_logs();
        });
        if tokio::time::timeout(bound, flush).await.is_err() {
            eprintln!("keel: the final flush of logs and spans took longer than shutdown.flush_timeout");
        }
    }
}

/// `error` and its causes on one line, `: `-separated, as anyhow's `{:#}`
/// but without repeats: a cause is left out when the text so far already
/// ends with it, because many errors print their source in their own
/// message too (`cannot listen on …: {source}`), and hyper's connect error
/// repeats its own text as its source.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !message.is_empty() && !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// The log writer thread; dropping its guard writes out every queued line.
/// Global, so an immediate exit (a second signal) can flush too.
static LOG_WORKER: Mutex<Option<sink::SinkGuard>> = Mutex::new(None);

/// Writes out every queued log line and stops the writer thread; later
/// lines are dropped (and counted). Blocks for at most about a second
/// ([`sink::SinkGuard`]'s bound). Call right before the process exits.
pub fn flush_logs() {
    let worker = LOG_WORKER.lock().map(|mut w| w.take()).unwrap_or_else(|poisoned| poisoned.into_inner().take());
    drop(worker);
}

/// The installed writer, for `keel_log_lines_dropped_total`.
static SINK: OnceLock<sink::LogSink> = OnceLock::new();

/// How many log lines were dropped since start because the writer fell
/// behind.
pub fn dropped_lines() -> u64 {
    SINK.get().map_or(0, sink::LogSink::dropped)
}

/// The filter the configuration asks for: `RUST_LOG` when set, otherwise
/// `log.level`. What startup installs and SIGHUP restores.
pub fn configured_filter(log: &LogSettings) -> String {
    std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| log.level.clone())
}

/// Installs the global subscriber, writing to stdout. `RUST_LOG`, when set,
/// replaces `log.level`. Call from within the tokio runtime.
pub fn init(log: &LogSettings, tracing: &TracingSettings) -> Result<TelemetryGuard, TelemetryError> {
    let directives = configured_filter(log);
    // Unbuffered: the sink hands over whole batches.
    install(log, tracing, Some(&directives), std::io::stdout())
}

/// A log filter longer than this is refused: no sane one comes close, and
/// the text ends up in a metric label.
const MAX_FILTER_LEN: usize = 4096;

/// The W3C trace context header, as a name made at compile time: the call
/// layer, the gateway and the downstream clients look it up on every call.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Why a new log filter was refused; the filter in force stays.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("the log filter is empty; send a directive such as `info` or `info,keel::gateway=debug`")]
    Empty,
    #[error("the log filter is longer than {MAX_FILTER_LEN} bytes")]
    TooLong,
    #[error("invalid log filter {directives:?}")]
    Invalid {
        directives: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot swap the log filter")]
    Reload(#[source] reload::Error),
}

/// The global subscriber's level filter, swapped at runtime by
/// `PUT /log/level` and by SIGHUP. Only exists once [`install`] has set up
/// the global subscriber.
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives in force, as given (EnvFilter's own `Display`
    /// reorders them). Locked across a swap, so concurrent changes apply in
    /// one order and this always names the filter in force.
    current: Mutex<String>,
    /// Successful changes since start (`keel_log_level_changes_total`).
    changes: AtomicU64,
}

static LOG_FILTER: OnceLock<LogFilter> = OnceLock::new();

/// The reloadable filter of the global subscriber, if keel installed it.
pub fn log_filter() -> Option<&'static LogFilter> {
    LOG_FILTER.get()
}

impl LogFilter {
    /// The directives in force.
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Parses `directives` and, when they are valid, puts them in force;
    /// returns the previous ones. `source` says who asked (`api`,
    /// `sighup`), for the log line. A bad filter changes nothing.
    pub fn set(&self, directives: &str, source: &str) -> Result<String, LogFilterError> {
        let directives = directives.trim();
        if directives.is_empty() {
            return Err(LogFilterError::Empty);
        }
        if directives.len() > MAX_FILTER_LEN {
            return Err(LogFilterError::TooLong);
        }
        let filter = EnvFilter::builder()
            .parse(directives)
            .map_err(|source| LogFilterError::Invalid { directives: directives.to_owned(), source })?;
        let previous = {
            let mut current = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.handle.reload(filter).map_err(LogFilterError::Reload)?;
            std::mem::replace(&mut *current, directives.to_owned())
        };
        access::levels_changed();
        self.changes.fetch_add(1, Ordering::Relaxed);
        // WARN, so the change shows under every filter short of `error`.
        tracing::warn!(previous = %previous, level = %directives, source, "log level changed");
        Ok(previous)
    }

    /// Exports `keel_log_level_info{filter="…"} 1` (the filter in force) and
    /// `keel_log_level_changes_total`.
    pub fn export(&'static self, metrics: &Metrics) -> Result<(), MetricsError> {
        metrics.export_info_fn(
            "keel_log_level_info",
            "The log filter in force (log.level, RUST_LOG, or PUT /log/level); the value is always 1.",
            "filter",
            || self.current(),
        )?;
        metrics.export_counter_fn(
            "keel_log_level_changes_total",
            "Changes of the log filter at runtime, by PUT /log/level or SIGHUP.",
            || LOG_FILTER.get().map_or(0, |filter| filter.changes.load(Ordering::Relaxed)),
        )
    }
}

/// Whether each call gets a tracing span (see [`call_spans`]).
static CALL_SPANS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the gRPC server and the gateway open a span per call: only when
/// something reads spans, the OTLP exporter or the pretty format (which
/// prints span fields). Otherwise JSON lines take the call's request id and
/// method from the call itself ([`CallFields`]), and a call costs no span.
pub fn call_spans() -> bool {
    CALL_SPANS.load(Ordering::Relaxed)
}

/// The JSON event format, plus the request id and method of the call the
/// event happens in (from the task-local `Caller`), unless a span of the
/// event already names them. Events are rare next to calls (the access
/// line does not come through here), so the line is formatted into a
/// buffer and the fields added before its closing brace.
struct CallFields<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for CallFields<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use crate::grpc::middleware::request_id::with_caller;
        let call = with_caller(|caller| (caller.request_id.clone(), caller.method));
        let Some((id, method)) = call else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        let open = line.trim_end_matches('\n').strip_suffix('}').map(str::len);
        match open {
            Some(open) if !line.contains("\"request_id\":") => {
                // The same escaping as the access line's fields.
                line.truncate(open);
                line.push_str(",\"request_id\":");
                access::json_string(&mut line, id.as_str());
                if let Some(method) = method.filter(|m| !m.path.is_empty()) {
                    line.push_str(",\"grpc.method\":");
                    access::json_string(&mut line, &method.path);
                }
                line.push_str("}\n");
                writer.write_str(&line)
            }
            _ => writer.write_str(&line),
        }
    }
}

/// The JSON event format of every line but the access line: event fields
/// at the top level, and the innermost span's fields (when there is one).
fn json_format() -> tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json> {
    tracing_subscriber::fmt::format().json().flatten_event(true).with_current_span(true).with_span_list(false)
}

/// Installs the global subscriber with an explicit filter and writer (tests
/// capture the production log format this way). Lines go through a bounded
/// buffer to a writer thread ([`sink`]), so no caller ever blocks on the
/// writer; when the buffer is full, new lines are dropped and counted.
pub fn install<W>(
    log: &LogSettings,
    tracing: &TracingSettings,
    directives: Option<&str>,
    writer: W,
) -> Result<TelemetryGuard, TelemetryError>
where
    W: std::io::Write + Send + 'static,
{
    let directives = directives.unwrap_or(&log.level).trim().to_owned();
    let filter = EnvFilter::try_new(&directives).map_err(TelemetryError::Filter)?;
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, worker) = sink::LogSink::start(writer).map_err(TelemetryError::Writer)?;
    let _ = SINK.set(writer.clone());
    if let Ok(mut slot) = LOG_WORKER.lock() {
        *slot = Some(worker);
    }
    if log.format == LogFormat::Json {
        access::install_sink(writer.clone(), log.access, log.access_slow);
    }
    let logs = match log.format {
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().event_format(CallFields(json_format())).with_writer(writer).boxed()
        }
        LogFormat::Pretty => tracing_subscriber::fmt::layer().pretty().with_writer(writer).boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(logs);

    #[cfg(feature = "otel")]
    {
        let (layer, provider) = otel::layer(tracing)?;
        CALL_SPANS.store(layer.is_some() || log.format == LogFormat::Pretty, Ordering::Relaxed);
        registry.with(layer).try_init().map_err(|_| TelemetryError::AlreadyInstalled)?;
        // Lines recorded between the sink and the subscriber saw no filter.
        access::levels_changed();
        let _ = LOG_FILTER.set(LogFilter { handle, current: Mutex::new(directives), changes: AtomicU64::new(0) });
        Ok(TelemetryGuard { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = tracing;
        CALL_SPANS.store(log.format == LogFormat::Pretty, Ordering::Relaxed);
        registry.try_init().map_err(|_| TelemetryError::AlreadyInstalled)?;
        access::levels_changed();
        let _ = LOG_FILTER.set(LogFilter { handle, current: Mutex::new(directives), changes: AtomicU64::new(0) });
        Ok(TelemetryGuard {})
    }
}

/// Makes `span` a child of the W3C trace context in `headers`, if any.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    #[cfg(feature = "otel")]
    otel::continue_trace(span, headers);
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers);
}

/// Writes the current span's trace context into outgoing headers, replacing
/// any the caller sent, so the next hop is a child of this one.
pub fn propagate(headers: &mut http::HeaderMap) {
    #[cfg(feature = "otel")]
    otel::propagate(headers);
    #[cfg(not(feature = "otel"))]
    let _ = headers;
}

#[cfg(feature = "otel")]
mod otel {
    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::registry::LookupSpan;

    use super::TelemetryError;
    use crate::config::TracingSettings;

    const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

    pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync>;

    /// The OpenTelemetry layer, or a no-op one when no endpoint is set.
    pub fn layer<S>(
        settings: &TracingSettings,
    ) -> Result<(Option<BoxedLayer<S>>, Option<SdkTracerProvider>), TelemetryError>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        if settings.otlp_endpoint.is_empty() {
            return Ok((None, None));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(TelemetryError::Exporter)?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(settings.service_name.clone()).build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(OnRuntime { inner: Arc::new(exporter), runtime })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
        Ok((Some(layer), Some(provider)))
    }

    /// Runs exports on the application's runtime. The SDK's batch processor
    /// exports from a plain thread, where tonic's client has no reactor.
    #[derive(Debug)]
    struct OnRuntime {
        inner: Arc<opentelemetry_otlp::SpanExporter>,
        runtime: tokio::runtime::Handle,
    }

    impl SpanExporter for OnRuntime {
        fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
            let inner = self.inner.clone();
            let task = self.runtime.spawn(async move { inner.export(batch).await });
            async move { task.await.unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string()))) }
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn force_flush(&self) -> OTelSdkResult {
            self.inner.force_flush()
        }

        fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
            if let Some(inner) = Arc::get_mut(&mut self.inner) {
                inner.set_resource(resource);
            }
        }
    }

    struct Headers<'a>(&'a http::HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }

    struct HeadersMut<'a>(&'a mut http::HeaderMap);

    impl Injector for HeadersMut<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
                self.0.insert(name, value);
            }
        }
    }

    pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
        if headers.contains_key(&crate::telemetry::TRACEPARENT) {
            let parent = TraceContextPropagator::new().extract(&Headers(headers));
            let _ = span.set_parent(parent);
        }
        let context = span.context();
        let trace = context.span().span_context().trace_id();
        if trace != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace));
        }
    }

    pub fn propagate(headers: &mut http::HeaderMap) {
        let context = tracing::Span::current().context();
        if context.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
        }
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// An error with a fixed message and an optional source.
    #[derive(Debug)]
    struct Link(&'static str, Option<Box<Link>>);

    impl std::fmt::Display for Link {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Link {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn link(message: &'static str, source: Option<Link>) -> Link {
        Link(message, source.map(Box::new))
    }

    #[test]
    fn chain_prints_every_cause_once() {
        let repeated = link(
            "cannot connect",
            Some(link("tcp connect error", Some(link("tcp connect error", Some(link("Connection refused", None)))))),
        );
        assert_eq!(chain(&repeated), "cannot connect: tcp connect error: Connection refused");
        let inlined = link("cannot listen on x: Address in use", Some(link("Address in use", None)));
        assert_eq!(chain(&inlined), "cannot listen on x: Address in use");
        let plain = link("cannot read config file a.yaml", Some(link("permission denied", None)));
        assert_eq!(chain(&plain), "cannot read config file a.yaml: permission denied");
    }
}

#[cfg(test)]
mod call_fields_tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::CallFields;
    use crate::grpc::middleware::method::{GrpcType, MethodInfo};
    use crate::grpc::middleware::request_id::{self, Caller, RequestId};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn caller(id: &str, path: &str) -> Caller {
        let method = MethodInfo {
            path: path.to_owned(),
            grpc_type: GrpcType::Unary,
            metrics: None,
            auth_exempt: false,
            shed_exempt: false,
            served: true,
            access_text: None,
        };
        Caller {
            request_id: RequestId::new(id).unwrap_or_else(RequestId::generate),
            method: Some(Box::leak(Box::new(method))),
            deadline: None,
            traceparent: None,
            authorization: None,
        }
    }

    /// Lines logged inside a call carry its request id and method once,
    /// as top-level fields, without any span; lines outside carry neither.
    #[test]
    fn a_line_inside_a_call_names_the_call_without_a_span() {
        let lines = Lines::default();
        let writer = lines.clone();
        let format = super::json_format();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .event_format(CallFields(format))
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                tracing::info!("before");
                request_id::scope(caller("rid-\"7", "/user.v1.UserService/GetUser"), async {
                    tracing::info!(user = "u1", "inside");
                    // A span of the handler's own that names the id already.
                    let span = tracing::info_span!("own", request_id = "rid-\"7");
                    span.in_scope(|| tracing::info!("in own span"));
                })
                .await;
            });
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(parsed.len(), 3, "{text}");
        assert_eq!(parsed[0]["message"], "before");
        assert!(parsed[0].get("request_id").is_none(), "{text}");
        assert_eq!(parsed[1]["message"], "inside");
        assert_eq!(parsed[1]["user"], "u1");
        assert_eq!(parsed[1]["request_id"], "rid-\"7");
        assert_eq!(parsed[1]["grpc.method"], "/user.v1.UserService/GetUser");
        assert!(parsed[1].get("span").is_none(), "{text}");
        for line in text.lines() {
            assert!(line.matches("\"request_id\":").count() <= 1, "{line}");
        }
        assert_eq!(parsed[2]["span"]["request_id"], "rid-\"7");
    }
}
