//! The admin server component: `/metrics`, `/livez` and `/readyz`, on a
//! port of its own that is never public and never behind auth.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
