//! Route matching, the gateway's first step on every REST call: the path
//! templates of `user.v1.UserService` (its `google.api.http` routes and the
//! unannotated `POST /{service}/{method}` ones, as the gateway registers
//! them) in a [`RouteTable`], looked up the way a request is.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use keel::gateway::route::{Lookup, PathTemplate, RouteTable};

/// The gateway's table for the example service, plus health.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/users"),
    ("GET", "/v1/users/{user_id}"),
    ("PATCH", "/v1/users/{user.user_id}"),
    ("DELETE", "/v1/users/{user_id}"),
    ("GET", "/v1/users"),
    ("GET", "/v1/users:watch"),
    ("POST", "/user.v1.UserService/CreateUser"),
    ("POST", "/user.v1.UserService/GetUser"),
    ("POST", "/user.v1.UserService/UpdateUser"),
    ("POST", "/user.v1.UserService/DeleteUser"),
    ("POST", "/user.v1.UserService/ListUsers"),
    ("POST", "/user.v1.UserService/WatchUsers"),
];

fn table() -> Option<RouteTable<usize>> {
    let mut table = RouteTable::default();
    for (i, (method, template)) in ROUTES.iter().enumerate() {
        let method = Method::from_bytes(method.as_bytes()).ok()?;
        let template = PathTemplate::parse(template).ok()?;
        table.insert(method, template, i, |i| i.to_string()).ok()?;
    }
    Some(table)
}

fn found(lookup: &Lookup<'_, usize>) -> bool {
    matches!(lookup, Lookup::Found { .. })
}

fn bench(c: &mut Criterion) {
    let Some(table) = table() else {
        eprintln!("cannot build the route table");
        return;
    };
    // Fail loudly rather than time a path that does not match.
    if !found(&table.lookup(&Method::GET, "/v1/users/ada")) || !found(&table.lookup(&Method::GET, "/v1/users:watch")) {
        eprintln!("the benchmark paths do not match their routes");
        return;
    }
    let mut group = c.benchmark_group("route");
    group.bench_function("get_user", |b| b.iter(|| black_box(table.lookup(&Method::GET, black_box("/v1/users/ada")))));
    group.bench_function("watch_verb", |b| {
        b.iter(|| black_box(table.lookup(&Method::GET, black_box("/v1/users:watch"))))
    });
    group.bench_function("unannotated_post", |b| {
        b.iter(|| black_box(table.lookup(&Method::POST, black_box("/user.v1.UserService/DeleteUser"))))
    });
    group.bench_function("not_found", |b| {
        b.iter(|| black_box(table.lookup(&Method::GET, black_box("/v2/nothing/here"))))
    });
    group.bench_function("template_match_only", |b| {
        let template = PathTemplate::parse("/v1/users/{user_id}").ok();
        b.iter(|| black_box(template.as_ref().and_then(|t| t.matches(black_box("/v1/users/ada")))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
