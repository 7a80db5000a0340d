//! The admin server component: `/metrics`, `/livez`, `/readyz` and
//! `/log/level` (read and change the log filter at runtime), on a port of
//! its own that is never public and never behind auth.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use tokio::net::TcpListener;

use crate::config::AdminSettings;
use crate::health::Readiness;
use crate::http_server::{self, HttpLimits};
use crate::metrics::Metrics;
use crate::net::{self, BindError};

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The admin listener and its router.
pub struct AdminServer {
    listener: TcpListener,
    /// The address actually bound; port 0 resolves here.
    addr: SocketAddr,
    router: Router,
    /// Timeouts and the connection cap of `admin.*`.
    limits: HttpLimits,
}

impl AdminServer {
    /// Binds `admin.addr`.
    pub async fn bind(
        settings: &AdminSettings,
        metrics: Metrics,
        readiness: Readiness,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> Result<Self, BindError> {
        let (listener, addr) = net::bind("admin.addr", settings.addr).await?;
        let limits = HttpLimits::admin(settings, &metrics).with_tls(tls);
        Ok(Self { listener, addr, router: router(metrics, readiness), limits })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` resolves.
    pub async fn serve(self, stop: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        http_server::serve(self.listener, self.router, self.limits, stop).await
    }
}

fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/log/level", get(get_log_level).put(put_log_level))
        .with_state(AdminState { metrics, readiness })
}

async fn metrics_handler(State(state): State<AdminState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// Answering at all shows the process is alive and its runtime schedules
/// work; shutdown does not make it fail, so Kubernetes never restarts a pod
/// that is draining.
async fn livez() -> &'static str {
    "ok\n"
}

/// 200 once started, SERVING and not shutting down; otherwise 503 with the
/// failing reason. `?verbose` lists every check, as the Kubernetes API
/// server does.
async fn readyz(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let checks = state.readiness.checks().await;
    let ready = checks.iter().all(|(_, outcome)| outcome.is_ok());
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let verbose = query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "verbose"));
    let body = if verbose {
        let mut text = String::new();
        for (name, outcome) in &checks {
            match outcome {
                Ok(()) => text.push_str(&format!("[+]{name} ok\n")),
                Err(reason) => text.push_str(&format!("[-]{name} failed: {reason}\n")),
            }
        }
        text.push_str(if ready { "readyz check passed\n" } else { "readyz check failed\n" });
        text
    } else if ready {
        "ok\n".to_owned()
    } else {
        let reasons: Vec<&str> = checks.iter().filter_map(|(_, o)| o.as_ref().err().map(String::as_str)).collect();
        format!("not ready: {}\n", reasons.join("; "))
    };
    (status, body).into_response()
}

/// `{"level": "<filter>"}`: the log filter in force.
async fn get_log_level() -> Response {
    match crate::telemetry::log_filter() {
        Some(filter) => json_response(StatusCode::OK, &serde_json::json!({ "level": filter.current() })),
        None => no_log_filter(),
    }
}

/// Puts a new `EnvFilter` directive in force. The body is the directive as
/// plain text (`info,keel::gateway=debug`) or `{"level": "…"}`. Answers
/// `{"level", "previous"}`; a bad directive is a 400 naming the problem,
/// and the filter in force stays.
async fn put_log_level(body: Bytes) -> Response {
    let Some(filter) = crate::telemetry::log_filter() else { return no_log_filter() };
    let Ok(text) = std::str::from_utf8(&body) else {
        return status_response(StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument, "the log filter is not UTF-8");
    };
    let directives = if text.trim_start().starts_with('{') {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(object)) => match object.get("level") {
                Some(serde_json::Value::String(level)) => level.clone(),
                _ => {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        tonic::Code::InvalidArgument,
                        "the JSON body needs a string field \"level\"",
                    );
                }
            },
            Ok(_) | Err(_) => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    tonic::Code::InvalidArgument,
                    "the body is neither a log filter nor a JSON object with \"level\"",
                );
            }
        }
    } else {
        text.to_owned()
    };
    match filter.set(&directives, "api") {
        Ok(previous) => {
            json_response(StatusCode::OK, &serde_json::json!({ "level": filter.current(), "previous": previous }))
        }
        Err(error) => {
            status_response(StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument, &crate::telemetry::chain(&error))
        }
    }
}

/// keel did not install the global subscriber (an embedding that brings
/// its own), so there is no filter to read or change.
fn no_log_filter() -> Response {
    status_response(
        StatusCode::NOT_IMPLEMENTED,
        tonic::Code::Unimplemented,
        "the log filter is not keel's: no reloadable subscriber was installed",
    )
}

/// An error as a `google.rpc.Status` JSON body, as the gateway answers.
fn status_response(status: StatusCode, code: tonic::Code, message: &str) -> Response {
    json_response(status, &crate::gateway::error::status_json(code, message, Vec::new()))
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut body = value.to_string();
    body.push('\n');
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}
