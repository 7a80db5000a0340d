//! The per-call access log and the server's metrics (one layer): one
//! `rpc finished` line per call, formatted by the production subscriber (`telemetry::install` with
//! `log.format: json` at `info`) into a writer that discards the bytes, so
//! only the formatting is timed, not the terminal or the disk.
//!
//! - `call_layer` drives keel's real server call layer (every step: method
//!   lookup, request id, metrics, the access line queued to the batching
//!   writer, size limits, shedding, a static token, the deadline, panic
//!   recovery) around a service that answers at once (trailers-only
//!   `grpc-status: 0`).
//! - `no_layer` is the same call without the layer: the difference is the
//!   layer's cost per call.
//! - `event_in_span` emits the line's event through tracing-subscriber's
//!   JSON formatter inside a span: what the line would cost as an ordinary
//!   tracing event.
//!
//! The average bytes per line are printed at the end.

use std::convert::Infallible;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use keel::config::{AuthSettings, LogSettings, TracingSettings};
use keel::grpc::middleware::auth::Authenticator;
use keel::grpc::middleware::deadline::DeadlinePolicy;
use keel::grpc::middleware::limits::SizeLimits;
use keel::grpc::middleware::method::{GrpcType, MethodInfo, MethodTable};
use keel::grpc::middleware::server::{CallLayer, CallPolicy};
use keel::grpc::middleware::shed::Shedder;
use keel::metrics::Metrics;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

static BYTES: AtomicU64 = AtomicU64::new(0);
static LINES: AtomicU64 = AtomicU64::new(0);

/// Counts what the subscriber writes and drops it.
struct Counting;

impl std::io::Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BYTES.fetch_add(buf.len() as u64, Ordering::Relaxed);
        LINES.fetch_add(buf.iter().filter(|b| **b == b'\n').count() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A call as a client sends it (with JSON logs and no exporter there is
/// no span).
fn request() -> Request<Body> {
    Request::builder()
        .uri("/user.v1.UserService/GetUser")
        .header("x-forwarded-for", "203.0.113.7")
        .header("authorization", "Bearer bench-token")
        .header("grpc-timeout", "5S")
        .body(Body::empty())
        .unwrap_or_default()
}

/// Runs one call to completion; every future here is ready at once.
fn call<S, B>(service: &mut S, request: Request<Body>) -> bool
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let ready = matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(())));
    let future = pin!(service.call(request));
    ready && matches!(future.poll(&mut cx), Poll::Ready(Ok(_)))
}

fn answer(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    let mut response = Response::new(Body::empty());
    response.headers_mut().insert("grpc-status", http::HeaderValue::from_static("0"));
    std::future::ready(Ok(response))
}

fn bench(c: &mut Criterion) {
    let installed = keel::telemetry::install(&LogSettings::default(), &TracingSettings::default(), None, Counting);
    let metrics = Metrics::new();
    let (Ok(_guard), Ok(metrics)) = (installed, metrics) else {
        eprintln!("cannot install the subscriber or build the metrics");
        return;
    };
    let method = MethodInfo {
        path: "/user.v1.UserService/GetUser".to_owned(),
        grpc_type: GrpcType::Unary,
        metrics: Some(metrics.grpc_server.method("unary", "user.v1.UserService", "GetUser")),
        auth_exempt: false,
        shed_exempt: false,
        served: true,
        access_text: Some(keel::telemetry::access::MethodText::new("/user.v1.UserService/GetUser")),
    };
    let auth = AuthSettings { tokens: vec!["bench-token".to_owned()], ..AuthSettings::default() };
    let Ok(auth) = Authenticator::new(&auth, None) else {
        eprintln!("cannot build the authenticator");
        return;
    };
    let layer = CallLayer::new(CallPolicy {
        methods: Box::leak(Box::new(MethodTable::of([method]))),
        auth,
        shed: Shedder::new(1024, metrics.grpc_shed.clone()),
        limits: SizeLimits::new(4 << 20, 4 << 20),
        deadlines: DeadlinePolicy::new(Duration::from_secs(30), Duration::from_secs(300)),
        echo_request_id: false,
    });
    // The layer reads tokio's clock for deadlines.
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        eprintln!("cannot build a runtime");
        return;
    };
    let _runtime = runtime.enter();

    let mut group = c.benchmark_group("access_log");
    let mut layered = layer.layer(tower::service_fn(answer));
    group.bench_function("call_layer", |b| b.iter(|| black_box(call(&mut layered, request()))));
    let mut bare = tower::service_fn(answer).boxed();
    group.bench_function("no_layer", |b| b.iter(|| black_box(call(&mut bare, request()))));
    let span = tracing::info_span!(
        "rpc",
        request_id = "0b7f3c1e-8d2a-4f5b-9c6d-1e2f3a4b5c6d",
        grpc.method = "/user.v1.UserService/GetUser",
        trace_id = tracing::field::Empty
    );
    group.bench_function("event_in_span", |b| {
        b.iter(|| {
            let _entered = span.enter();
            tracing::info!(
                grpc.method = "/user.v1.UserService/GetUser",
                grpc.code = "OK",
                duration_ms = black_box(0.123_f64),
                peer = %"203.0.113.7:51234",
                request_id = "0b7f3c1e-8d2a-4f5b-9c6d-1e2f3a4b5c6d",
                "rpc finished"
            );
        })
    });
    group.finish();
    let (bytes, lines) = (BYTES.load(Ordering::Relaxed), LINES.load(Ordering::Relaxed));
    if let Some(average) = bytes.checked_div(lines) {
        println!("access_log: {lines} lines, {average} bytes per line on average");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
