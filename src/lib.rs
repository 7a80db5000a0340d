//! keel: a gRPC microservice template for Kubernetes.
//!
//! # Layout
//! - [`config`]: typed settings, layered loading and validation (exit 78).
//! - [`telemetry`]: the tracing subscriber (JSON or pretty), its filter
//!   reloadable at runtime.
//! - [`app`]: `App::build` registers the services and binds each component
//!   (gRPC server, gateway, admin); `App::run` serves and shuts down.
//! - [`services`]: the list of served services — the one line per service
//!   a team edits.
//! - [`registry`]: the service registry and its one descriptor pool, from
//!   which routes, method tables, metrics, gateway routes, OpenAPI, health,
//!   reflection and auth policy are derived.
//! - [`net`]: binding listeners, and the open-file limit.
//! - [`http_server`]: serving HTTP (gateway, admin): header, body and idle
//!   timeouts, the connection cap, the drain.
//! - [`startup_pages`]: handing the start-up code pages of the executable and
//!   its shared libraries back once serving begins, for a small idle footprint.
//! - [`shutdown`]: the shutdown handle every server, stream and task obeys,
//!   and the signals that trigger it.
//! - [`health`]: `grpc.health.v1` statuses, flipped at start and shutdown,
//!   and the readiness they imply.
//! - [`metrics`]: the Prometheus registry and every metric family.
//! - [`admin`]: the admin server: `/metrics`, `/livez`, `/readyz`,
//!   `/log/level` (the log filter, read and changed at runtime).
//! - [`healthcheck`]: `keel healthcheck`, the probe built into the binary.
//! - [`gateway`]: the HTTP/JSON gateway, routes derived from the
//!   `google.api.http` annotations, forwarding over one shared channel.
//! - [`grpc`]: the server, its layer stack ([`grpc::middleware`]) and the
//!   streaming plumbing ([`grpc::stream`]).
//! - [`clients`]: calling other services: one channel per configured
//!   downstream, its client layer stack, `dns:///` balancing, readiness and
//!   close at shutdown.
//! - [`users`]: the example service over a `Store` trait — the part to
//!   replace.
//! - [`proto`]: code generated from `proto/` at build time, and the
//!   descriptor set reflection reads.

/// The process allocator, for every binary built from this crate: keel, its
/// tests and the bare baselines alike, so benchmarks compare layers, not
/// allocators. A gRPC call allocates on one worker thread and frees on
/// another (h2 frames, log lines handed to the writer thread); glibc's
/// malloc then contends on its arena locks (futex waits showed up in the
/// profile), and the image's musl malloc is slower still. mimalloc frees
/// across threads without a lock. Built without transparent huge pages
/// (its `no_thp` feature): with them an idle process kept 12 MB of
/// mostly empty 2 MB pages, doubling its RSS, for no measurable speed.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod app;
pub mod auth;
pub mod clients;
pub mod config;
pub mod database;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod grpc;
pub mod health;
pub mod healthcheck;
pub mod http_server;
pub mod metrics;
pub mod net;
pub mod registry;
pub mod secret_file;
pub mod services;
pub mod shutdown;
pub mod startup_pages;
pub mod telemetry;
pub mod tls;
pub mod users;

/// Generated from `proto/` by `build.rs`; never edited by hand. Every
/// package is a module here (`user.v1` → `proto::user::v1`, and
/// `google.api`, read from method options by the gateway).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/proto_modules.rs"));

    /// Every file under `proto/` with its imports, well-known types included.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keel_descriptor.bin"));
}
