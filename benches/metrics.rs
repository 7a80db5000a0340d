//! The gRPC metrics recorded on every call: the pre-resolved series of one
//! method (`Metrics::grpc_server.method(...)`, done once at startup) and
//! what each call costs on them — `started`, one message each way, and
//! `handled` with its histogram observation. `with_label_values` is the
//! per-call lookup the pre-resolved series avoid, for comparison. The
//! `_while_another_thread_counts` case runs the same call with a second
//! thread counting on the same series, as two runtime workers do at full
//! load: what a shared counter would lose to cache-line transfers (see
//! `metrics::sharded`). `render` is one scrape.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keel::metrics::{MethodMetrics, Metrics};
use tonic::Code;

/// What one unary call records: started, a message each way, handled OK.
fn unary_call(method: &MethodMetrics, elapsed: Duration) {
    method.started();
    method.received(1);
    method.sent(1);
    method.handled(black_box(Code::Ok), black_box(elapsed));
}

fn bench(c: &mut Criterion) {
    let metrics = match Metrics::new() {
        Ok(metrics) => metrics,
        Err(error) => {
            eprintln!("cannot build the metrics: {error}");
            return;
        }
    };
    let method = metrics.grpc_server.method("unary", "user.v1.UserService", "GetUser");
    let mut group = c.benchmark_group("metrics");
    group.bench_function("unary_call_ok", |b| b.iter(|| unary_call(&method, Duration::from_micros(123))));
    // The last code in ALL_CODES: the worst case of the code lookup.
    group.bench_function("unary_call_unauthenticated", |b| {
        b.iter(|| {
            method.started();
            method.handled(black_box(Code::Unauthenticated), black_box(Duration::from_micros(12)));
        })
    });
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let other = method.clone();
        let stop = &stop;
        scope.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                unary_call(&other, Duration::from_micros(80));
            }
        });
        group.bench_function("unary_call_ok_while_another_thread_counts", |b| {
            b.iter(|| unary_call(&method, Duration::from_micros(123)))
        });
        stop.store(true, Ordering::Relaxed);
    });
    group.bench_function("render", |b| b.iter(|| black_box(metrics.render())));
    group.bench_function("resolve_method_series", |b| {
        b.iter(|| black_box(metrics.grpc_server.method("unary", "user.v1.UserService", black_box("GetUser"))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
