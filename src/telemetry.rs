//! Logging: a tracing subscriber writing JSON lines (production) or pretty
//! text (a terminal), filtered by `log.level` unless `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, LogSettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter: {0}")]
    Filter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber, writing to stdout. `RUST_LOG`, when set,
/// replaces `log.level`.
pub fn init(settings: &LogSettings) -> Result<(), TelemetryError> {
    let directives = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    install(settings, directives.as_deref(), std::io::stdout)
}

/// Installs the global subscriber with an explicit filter and writer (tests
/// capture the production log format this way).
pub fn install<W>(settings: &LogSettings, directives: Option<&str>, writer: W) -> Result<(), TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_new(directives.unwrap_or(&settings.level)).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let result = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)
}
