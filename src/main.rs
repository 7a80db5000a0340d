//! The `keel` binary: CLI → config → runtime → telemetry → build → run →
//! exit code. Config comes before telemetry because the log format, level
//! and exporter are config; a config error is printed plainly to stderr.
//! Errors are printed with their whole cause chain, on one line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel::app::{App, AppError};
use keel::config::{ConfigSources, EXIT_CONFIG, Settings};
use keel::shutdown::{Signal, SignalListener};
use keel::telemetry::chain;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "keel", version, about = "A gRPC microservice with an HTTP/JSON gateway")]
struct Cli {
    /// A YAML file layered over config/default.yaml and config/$KEEL_ENV.yaml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
enum Command {
    /// Serve gRPC, the HTTP gateway and the admin endpoints (the default).
    Serve,
    /// Print the effective configuration, secrets redacted.
    Config,
    /// Apply the embedded database migrations to database.url and exit;
    /// idempotent. Exit 78 without a database configured, 1 on failure.
    Migrate,
    /// Check the gRPC health of a running server: exit 0 when SERVING, 1
    /// otherwise. Serves as Docker HEALTHCHECK and Kubernetes exec probe.
    Healthcheck(HealthcheckArgs),
}

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
struct HealthcheckArgs {
    /// The server's gRPC address; defaults to grpc.addr (on loopback when
    /// it is a wildcard address).
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The service to check; empty means the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// How long to wait for an answer.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Speak TLS (grpc.tls is set on the server).
    #[arg(long)]
    tls: bool,
    /// PEM CA bundle to verify the server with (with --tls); default: the
    /// webpki roots.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca_file: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry; default: the host of
    /// --addr.
    #[arg(long, value_name = "NAME", requires = "tls")]
    server_name: Option<String>,
    /// Client certificate for mTLS (grpc.tls.client_ca_file is set).
    #[arg(long, value_name = "FILE", requires = "key_file")]
    cert_file: Option<std::path::PathBuf>,
    /// The client certificate's key.
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    key_file: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = ConfigSources::from_process(cli.config.clone());
    sources.probe = matches!(cli.command, Some(Command::Healthcheck(_)));
    let settings = match Settings::load(&sources) {
        Ok(settings) => settings,
        Err(error) => {
            report(format_args!("keel: {}", chain(&error)));
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => print_stdout(&settings.to_redacted_json()),
        Command::Healthcheck(args) => {
            let addr = args.addr.unwrap_or_else(|| keel::healthcheck::local_target(settings.grpc.addr).to_string());
            let tls = args.tls.then(|| keel::healthcheck::ClientTls {
                ca_file: args.ca_file.clone(),
                server_name: args.server_name.clone(),
                identity: args.cert_file.clone().zip(args.key_file.clone()),
            });
            match keel::healthcheck::check(&addr, &args.service, args.timeout, tls.as_ref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    report(format_args!("keel healthcheck: {addr}: {}", chain(&reason)));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate => migrate(&settings),
        Command::Serve => serve(settings, sources),
    }
}

fn migrate(settings: &Settings) -> ExitCode {
    if !settings.database.enabled() {
        report(format_args!("keel migrate: no database configured: set database.url or database.url_file"));
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            report(format_args!("keel: cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keel::database::migrate_url(&settings.database)) {
        Ok(()) => {
            report(format_args!("keel migrate: database schema is up to date"));
            ExitCode::SUCCESS
        }
        Err(error) => {
            report(format_args!("keel migrate: {}", chain(&error)));
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings, sources: ConfigSources) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // 0: tokio's own choice, one worker per CPU the process may use (it
    // reads the cgroup quota, so a CPU limit of 1 means one worker).
    if settings.runtime.worker_threads > 0 {
        builder.worker_threads(settings.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            report(format_args!("keel: cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Telemetry needs the runtime: span export runs on it.
        let telemetry = match keel::telemetry::init(&settings.log, &settings.tracing) {
            Ok(guard) => guard,
            Err(error) => return Err(Failure::Config(error.into())),
        };
        let flush_timeout = settings.shutdown.flush_timeout;
        let served = run(settings, sources).await;
        if let Err(error) = &served {
            // Logged before the final flush, so the line is written.
            tracing::error!(error = %chain(error.as_ref()), "keel failed");
        }
        telemetry.shutdown(flush_timeout).await;
        served.map_err(Failure::Run)
    });
    // Don't wait on abandoned handlers: they were given their bound.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(error)) => {
            report(format_args!("keel: {}", chain(error.as_ref())));
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(Failure::Run(error)) => {
            let message = chain(error.as_ref());
            let app = error.downcast_ref::<AppError>();
            if app.is_some_and(AppError::is_config) {
                report(format_args!("keel: {message}"));
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            if app.is_some_and(AppError::is_bind) {
                report(format_args!("keel: {message}"));
            }
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(anyhow::Error),
    Run(anyhow::Error),
}

/// Writes `text` and a newline to stdout. A closed pipe (`keel config |
/// head -3`) is success: the reader has all it wanted. `println!` would
/// panic there instead.
fn print_stdout(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            report(format_args!("keel: cannot write to stdout: {error}"));
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: loads the configuration again (the files may have changed, a
/// ConfigMap say) and puts its log level, or `RUST_LOG`, in force. Only the
/// level is applied; everything else needs a restart. A configuration that
/// no longer loads keeps the level in force, and says why.
fn restore_log_level(sources: &ConfigSources) {
    let Some(filter) = keel::telemetry::log_filter() else { return };
    let settings = match Settings::load(sources) {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!(error = %chain(&error), "SIGHUP: the configuration does not load; the log level stays");
            return;
        }
    };
    let wanted = keel::telemetry::configured_filter(&settings.log);
    if wanted.trim() == filter.current() {
        tracing::info!(level = %wanted, "SIGHUP: the log level is already the configured one");
        return;
    }
    if let Err(error) = filter.set(&wanted, "sighup") {
        tracing::error!(error = %chain(&error), "SIGHUP: cannot apply the configured log level; it stays");
    }
}

/// Writes one line to stderr. A failure to write it is ignored: there is
/// nowhere left to report it, and `eprintln!` would panic.
fn report(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Build → run, with the signals wired to the shutdown future.
async fn run(settings: Settings, sources: ConfigSources) -> anyhow::Result<()> {
    let signals = SignalListener::install().context("cannot install signal handlers")?;
    // Before anything opens a descriptor; a failure only limits how many
    // connections fit, so it is a warning.
    let wanted = settings.http.max_connections + settings.admin.max_connections;
    match keel::net::raise_open_file_limit() {
        Ok(limit) if limit.soft < wanted as u64 => tracing::warn!(
            open_file_limit = limit.soft,
            wanted,
            "the open-file limit is below http.max_connections + admin.max_connections; raise the hard limit"
        ),
        Ok(limit) => tracing::debug!(open_file_limit = limit.soft, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    // Start-up code is not needed again: an idle pod keeps only what its
    // calls run resident (keel::startup_pages).
    let app = App::build(settings).await?.when_serving(|| match keel::startup_pages::release() {
        Ok(released) => {
            tracing::debug!(mappings = released.mappings, bytes = released.bytes, "start-up pages released")
        }
        Err(error) => tracing::debug!(%error, "cannot release the start-up pages"),
    });
    let stop = CancellationToken::new();
    tokio::spawn(handle_signals(signals, stop.clone(), sources));
    app.run(stop.cancelled_owned()).await?;
    Ok(())
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one, or
/// SIGQUIT, exits at once. SIGHUP puts the configured log level back.
async fn handle_signals(mut signals: SignalListener, stop: CancellationToken, sources: ConfigSources) {
    while let Some(signal) = signals.recv().await {
        if signal == Signal::Hangup {
            restore_log_level(&sources);
            continue;
        }
        if signal == Signal::Quit {
            tracing::warn!(?signal, "exiting immediately");
            keel::telemetry::flush_logs();
            std::process::exit(signal.exit_code().into());
        }
        if stop.is_cancelled() {
            tracing::warn!(?signal, "second signal during shutdown; exiting immediately");
            keel::telemetry::flush_logs();
            std::process::exit(130);
        }
        tracing::info!(?signal, "shutdown requested");
        stop.cancel();
    }
}
