//! Spawns the whole app in-process on ephemeral ports and hands out real
//! clients. Every test tears its app down explicitly with [`TestApp::stop`].

#![allow(dead_code)]

pub mod echo;
pub mod echo_gateway;
pub mod exposition;
pub mod http;
pub mod postgres;
pub mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use keel::app::{App, AppError};
use keel::config::Settings;
use keel::grpc::stream::LiveStreams;
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::registry::{ServiceContext, ServiceRegistry, SetupError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long any readiness wait may take before the test fails.
pub const READY_BOUND: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub live_streams: LiveStreams,
    /// The app's serving state, to flip in tests.
    pub health_state: keel::health::Health,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AppError>>>,
}

/// Settings for tests: loopback, ephemeral ports, no drain delay.
pub fn test_settings() -> Settings {
    let mut settings = Settings::default();
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    settings.grpc.addr = loopback;
    settings.http.addr = loopback;
    settings.admin.addr = loopback;
    settings.shutdown.drain_delay = Duration::ZERO;
    settings.shutdown.timeout = Duration::from_secs(5);
    settings
}

pub async fn spawn_app() -> Result<TestApp> {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> Result<TestApp> {
    spawn_app_prepared(adjust, |_, _| Ok(())).await
}

/// Like [`spawn_app_with`], registering more services (test-only ones)
/// after the app's own, through the same registry.
pub async fn spawn_app_prepared(
    adjust: impl FnOnce(&mut Settings),
    register: impl FnOnce(&mut ServiceRegistry, &ServiceContext<'_>) -> Result<(), SetupError>,
) -> Result<TestApp> {
    let mut settings = test_settings();
    adjust(&mut settings);
    let app = App::build_with(settings, |services, ctx| {
        keel::services::register(services, ctx)?;
        register(services, ctx)
    })
    .await?;
    let grpc_addr = app.grpc_addr();
    let http_addr = app.http_addr();
    let admin_addr = app.admin_addr();
    let live_streams = app.live_streams();
    let health_state = app.health();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    let test_app =
        TestApp { grpc_addr, http_addr, admin_addr, live_streams, health_state, stop: Some(stop), task: Some(task) };
    test_app.wait_until_serving("").await?;
    Ok(test_app)
}

impl TestApp {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A client for the HTTP gateway.
    pub fn http(&self) -> http::HttpClient {
        http::HttpClient::new(self.http_addr)
    }

    /// A client for the admin server.
    pub fn admin(&self) -> http::HttpClient {
        http::HttpClient::new(self.admin_addr)
    }

    /// The current `/metrics` exposition, parsed strictly.
    pub async fn scrape(&self) -> Result<exposition::Exposition> {
        let response = self.admin().get("/metrics").await?;
        anyhow::ensure!(response.status == ::http::StatusCode::OK, "/metrics answered {}", response.status);
        exposition::Exposition::parse(&response.text())
    }

    /// A lazily connecting channel of its own.
    pub fn channel(&self) -> Result<Channel> {
        Ok(Endpoint::from_shared(self.grpc_url())?.connect_lazy())
    }

    pub fn endpoint(&self) -> Result<Endpoint> {
        Ok(Endpoint::from_shared(self.grpc_url())?)
    }

    pub fn users(&self) -> Result<UserServiceClient<Channel>> {
        Ok(UserServiceClient::new(self.channel()?))
    }

    pub fn health(&self) -> Result<HealthClient<Channel>> {
        Ok(HealthClient::new(self.channel()?))
    }

    /// Polls the health service until `service` reports SERVING.
    pub async fn wait_until_serving(&self, service: &str) -> Result<()> {
        let health = self.health()?;
        eventually(READY_BOUND, || {
            let mut health = health.clone();
            let service = service.to_owned();
            async move {
                let response = health.check(HealthCheckRequest { service }).await;
                matches!(response, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
            }
        })
        .await
        .context("the app never reported SERVING")
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else { return Ok(()) };
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .context("the app did not stop within 30s")??
            .context("the app failed")?;
        Ok(())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // A failed assertion skips stop(); end the server anyway.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The value of the sample of `metric` whose labels include all of
/// `labels`.
pub fn sample(scrape: &exposition::Exposition, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.value(metric, labels)
}

/// The headers of a gRPC call to `method` (`package.Service/Method`) on
/// `addr`, for a raw HTTP/2 client: the body is the caller's to send.
pub fn raw_grpc_request(addr: SocketAddr, method: &str) -> Result<::http::Request<()>> {
    Ok(::http::Request::post(format!("http://{addr}/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?)
}

/// One uncompressed gRPC message frame: the flag byte, the length, then
/// `message`.
pub fn grpc_frame(message: &[u8]) -> Result<Vec<u8>> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(message);
    Ok(frame)
}

/// Compiles a test-only proto under `tests/proto` (imports from `proto/`)
/// into an encoded descriptor set, as build.rs does for the real ones.
pub fn compile_test_proto(file: &str) -> Result<Vec<u8>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut compiler = protox::Compiler::new([root.join("tests/proto"), root.join("proto")])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(file)?;
    Ok(compiler.encode_file_descriptor_set())
}

/// Polls `condition` with a short backoff until it holds or `bound` passes.
pub async fn eventually<F, Fut>(bound: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    let mut pause = Duration::from_millis(2);
    loop {
        if condition().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("condition still false after {bound:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
