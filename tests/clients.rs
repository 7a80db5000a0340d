//! Calling other services: keel in-process with `clients` configured, and
//! test-only downstream servers on ephemeral ports (raw tower services
//! speaking `user.v1.UserService` and `grpc.health.v1.Health`, scripted per
//! test), checked for deadlines, propagation, retries and their budget,
//! balancing across addresses, readiness, exact metrics, garbage answers
//! and closing.

// Test helpers may unwrap too: a panic in them is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use keel::clients::{ClientChannel, Clients, Resolve, ResolveFuture};
use keel::config::{ClientSettings, ConfigSources, Settings};
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::proto::user::v1::{CreateUserRequest, GetUserRequest};
use support::{READY_BOUND, compile_test_proto, eventually, sample, spawn_app_prepared};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;

// ------------------------------------------------------------ the downstream

/// What the downstream saw and how it answers; shared by its services.
#[derive(Default)]
struct Script {
    /// Every call's path and headers, in arrival order.
    seen: Mutex<Vec<(String, HeaderMap)>>,
    /// UserService calls answered UNAVAILABLE (trailers-only) before OK.
    fail_next: AtomicUsize,
    /// Every UserService call answered UNAVAILABLE.
    fail_always: AtomicBool,
    /// UserService calls are never answered.
    hang: AtomicBool,
    /// 0: a proper answer; 1..: a kind of garbage (see `garbage`).
    garbage: AtomicU8,
    /// The serving status Check reports (1 SERVING, 2 NOT_SERVING).
    health: AtomicI32,
}

impl Script {
    fn calls(&self, suffix: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|(path, _)| path.ends_with(suffix)).count()
    }

    fn last_headers(&self, suffix: &str) -> Option<HeaderMap> {
        self.seen.lock().unwrap().iter().rev().find(|(path, _)| path.ends_with(suffix)).map(|(_, h)| h.clone())
    }
}

type DownBody = tonic::body::Body;

/// One downstream server; stopped when dropped.
struct Downstream {
    addr: SocketAddr,
    script: Arc<Script>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Downstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

macro_rules! downstream_service {
    ($name:ident, $proto:literal) => {
        #[derive(Clone)]
        struct $name(Arc<Script>);

        impl NamedService for $name {
            const NAME: &'static str = $proto;
        }

        impl tower::Service<http::Request<DownBody>> for $name {
            type Response = http::Response<DownBody>;
            type Error = Infallible;
            type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, request: http::Request<DownBody>) -> Self::Future {
                let script = self.0.clone();
                Box::pin(async move { Ok(answer(&script, request).await) })
            }
        }
    };
}

downstream_service!(DownUsers, "user.v1.UserService");
downstream_service!(DownHealth, "grpc.health.v1.Health");

fn trailers_only(code: i32) -> http::Response<DownBody> {
    http::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", "scripted")
        .body(DownBody::default())
        .unwrap()
}

fn frames(frames: Vec<Frame<Bytes>>) -> DownBody {
    DownBody::new(StreamBody::new(tokio_stream::iter(frames.into_iter().map(Ok::<_, Infallible>))))
}

fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

async fn answer(script: &Script, request: http::Request<DownBody>) -> http::Response<DownBody> {
    let (parts, body) = request.into_parts();
    let _ = body.collect().await;
    let path = parts.uri.path().to_owned();
    script.seen.lock().unwrap().push((path.clone(), parts.headers.clone()));
    if path.ends_with("/Check") {
        // HealthCheckResponse { status } is field 1, a varint.
        let status = script.health.load(Ordering::SeqCst) as u8;
        let message = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
        return http::Response::builder()
            .header("content-type", "application/grpc")
            .body(frames(vec![Frame::data(message), Frame::trailers(ok_trailers())]))
            .unwrap();
    }
    if script.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if script.fail_always.load(Ordering::SeqCst) {
        return trailers_only(14);
    }
    if script.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        return trailers_only(14);
    }
    match script.garbage.load(Ordering::SeqCst) {
        0 => http::Response::builder()
            .header("content-type", "application/grpc")
            // An empty User: a zero-length message.
            .body(frames(vec![Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])), Frame::trailers(ok_trailers())]))
            .unwrap(),
        // A grpc-status that is not a number.
        1 => http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "abc")
            .body(DownBody::default())
            .unwrap(),
        // Plain HTTP 500, no gRPC at all.
        2 => http::Response::builder()
            .status(500)
            .header("content-type", "text/html")
            .body(frames(vec![Frame::data(Bytes::from_static(b"<h1>oops</h1>"))]))
            .unwrap(),
        // A frame announcing more bytes than it carries, then the end.
        3 => http::Response::builder()
            .header("content-type", "application/grpc")
            .body(frames(vec![Frame::data(Bytes::from_static(&[0, 0, 0, 0, 9, 1, 2]))]))
            .unwrap(),
        // Response headers, then UNAVAILABLE in the trailers: too late to
        // retry, the downstream may have acted on the call.
        5 => http::Response::builder()
            .header("content-type", "application/grpc")
            .body(frames(vec![Frame::trailers({
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("14"));
                trailers
            })]))
            .unwrap(),
        // A message that is not a User, then trailers with no status.
        _ => http::Response::builder()
            .header("content-type", "application/grpc")
            .body(frames(vec![
                Frame::data(Bytes::from_static(&[0, 0, 0, 0, 3, 0xff, 0xff, 0xff])),
                Frame::trailers(HeaderMap::new()),
            ]))
            .unwrap(),
    }
}

/// A downstream on `ip`, port 0.
async fn downstream_on(ip: [u8; 4]) -> Result<Downstream> {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0))).await?;
    let addr = listener.local_addr()?;
    let script = Arc::new(Script { health: AtomicI32::new(1), ..Script::default() });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(DownUsers(script.clone()))
        .add_service(DownHealth(script.clone()));
    tokio::spawn(router.serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
        let _ = stopped.await;
    }));
    Ok(Downstream { addr, script, stop: Some(stop) })
}

async fn downstream() -> Result<Downstream> {
    downstream_on([127, 0, 0, 1]).await
}

fn client_settings(endpoint: String) -> ClientSettings {
    let mut client = ClientSettings { endpoint, timeout: Duration::from_secs(10), ..ClientSettings::default() };
    client.retry.initial_backoff = Duration::from_millis(1);
    client.retry.max_backoff = Duration::from_millis(5);
    client
}

type Users = UserServiceClient<ClientChannel>;

/// keel with one client, `down`, and the typed client a handler would get.
async fn app_calling(client: ClientSettings) -> Result<(support::TestApp, Users)> {
    let slot: Arc<Mutex<Option<Users>>> = Arc::default();
    let keep = slot.clone();
    let app = spawn_app_prepared(
        |settings| {
            settings.clients.insert("down".to_owned(), client);
        },
        move |_, ctx| {
            *keep.lock().unwrap() = Some(ctx.clients.get::<Users>("down")?);
            Ok(())
        },
    )
    .await?;
    let users = slot.lock().unwrap().take().unwrap();
    Ok((app, users))
}

fn get_user() -> GetUserRequest {
    GetUserRequest { user_id: "u-1".to_owned() }
}

fn create_user() -> CreateUserRequest {
    CreateUserRequest::default()
}

const CLIENT_LABELS: [(&str, &str); 2] = [("grpc_client_target", "down"), ("grpc_service", "user.v1.UserService")];

fn labels<'a>(method: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut out = CLIENT_LABELS.to_vec();
    out.push(("grpc_method", method));
    out.extend_from_slice(extra);
    out
}

// ------------------------------------------------------------ retries

/// UNAVAILABLE twice, then OK: the idempotent GetUser succeeds on its third
/// attempt (counted as one call), the non-idempotent CreateUser fails with
/// the first UNAVAILABLE, and the metrics say exactly that.
#[tokio::test]
async fn unavailable_is_retried_only_for_idempotent_methods() -> Result<()> {
    let down = downstream().await?;
    let (app, mut users) = app_calling(client_settings(format!("http://{}", down.addr))).await?;

    down.script.fail_next.store(2, Ordering::SeqCst);
    users.get_user(get_user()).await?;
    assert_eq!(down.script.calls("/GetUser"), 3, "GetUser was not retried twice");
    let third = down.script.last_headers("/GetUser").unwrap();
    assert_eq!(third.get("grpc-previous-rpc-attempts").and_then(|v| v.to_str().ok()), Some("2"));

    down.script.fail_next.store(2, Ordering::SeqCst);
    let failed = users.create_user(create_user()).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable);
    assert_eq!(down.script.calls("/CreateUser"), 1, "a non-idempotent method was retried");

    // UNAVAILABLE after the response headers: never retried.
    down.script.fail_next.store(0, Ordering::SeqCst);
    down.script.garbage.store(5, Ordering::SeqCst);
    let before = down.script.calls("/GetUser");
    assert_eq!(users.get_user(get_user()).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(down.script.calls("/GetUser"), before + 1, "retried after response headers");
    down.script.garbage.store(0, Ordering::SeqCst);

    let scrape = app.scrape().await?;
    let value = |method, extra: &[(&str, &str)]| sample(&scrape, "grpc_client_handled_total", &labels(method, extra));
    assert_eq!(sample(&scrape, "grpc_client_started_total", &labels("GetUser", &[])), Some(2.0));
    assert_eq!(value("GetUser", &[("grpc_code", "OK")]), Some(1.0));
    assert_eq!(value("GetUser", &[("grpc_code", "Unavailable")]), Some(1.0));
    assert_eq!(sample(&scrape, "grpc_client_msg_sent_total", &labels("GetUser", &[])), Some(2.0));
    assert_eq!(sample(&scrape, "grpc_client_msg_received_total", &labels("GetUser", &[])), Some(1.0));
    assert_eq!(
        sample(&scrape, "grpc_client_handling_seconds_count", &labels("GetUser", &[("grpc_type", "unary")])),
        Some(2.0)
    );
    assert_eq!(sample(&scrape, "grpc_client_started_total", &labels("CreateUser", &[])), Some(1.0));
    assert_eq!(value("CreateUser", &[("grpc_code", "Unavailable")]), Some(1.0));
    assert_eq!(
        sample(&scrape, "keel_grpc_client_retries_total", &[("grpc_client_target", "down"), ("outcome", "retried")]),
        Some(2.0)
    );
    app.stop().await
}

/// A downstream that always fails: the budget (a reserve of 10 retries,
/// then 20% of calls) stops the retries, and the refusals are counted.
#[tokio::test]
async fn the_budget_stops_retries_under_sustained_failure() -> Result<()> {
    let down = downstream().await?;
    let (app, mut users) = app_calling(client_settings(format!("http://{}", down.addr))).await?;
    down.script.fail_always.store(true, Ordering::SeqCst);
    const CALLS: usize = 40;
    for _ in 0..CALLS {
        assert_eq!(users.get_user(get_user()).await.unwrap_err().code(), Code::Unavailable);
    }
    let attempts = down.script.calls("/GetUser");
    // Without a budget: 3 attempts each, 120. With it: the reserve of 10,
    // plus at most one retry per 5 calls.
    let retries = attempts - CALLS;
    assert!(retries >= 10, "the reserve was not used: {retries} retries");
    assert!(retries <= 10 + CALLS / 5, "the budget did not hold: {retries} retries for {CALLS} calls");
    let scrape = app.scrape().await?;
    let retried = sample(&scrape, "keel_grpc_client_retries_total", &[("outcome", "retried")]).unwrap();
    let refused = sample(&scrape, "keel_grpc_client_retries_total", &[("outcome", "budget_exhausted")]).unwrap();
    assert_eq!(retried as usize, retries);
    assert!(refused >= 1.0, "no retry was refused");
    app.stop().await
}

// ------------------------------------------------------------ deadlines and propagation

/// Serves `echo.v1.EchoService` in keel by calling the downstream's
/// GetUser from inside the handler, as a real service would.
#[derive(Clone)]
struct Relay(Users);

impl NamedService for Relay {
    const NAME: &'static str = "echo.v1.EchoService";
}

impl tower::Service<http::Request<DownBody>> for Relay {
    type Response = http::Response<DownBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<DownBody>) -> Self::Future {
        let mut users = self.0.clone();
        // Steered by `relay-wait` metadata: first sleep until exactly the
        // call's deadline. The server's deadline layer polls the handler
        // before its own timer, so the handler runs on with a deadline
        // that has just passed, as a slow handler would.
        let wait = request.headers().contains_key("relay-wait");
        let deadline = keel::grpc::middleware::deadline::current_deadline();
        Box::pin(async move {
            let _ = request.into_body().collect().await;
            if wait && let Some(at) = deadline {
                tokio::time::sleep_until(at).await;
            }
            Ok(match users.get_user(get_user()).await {
                Ok(_) => http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(frames(vec![
                        Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])),
                        Frame::trailers(ok_trailers()),
                    ]))
                    .unwrap(),
                Err(status) => {
                    let mut response = trailers_only(status.code() as i32);
                    // Marks the answer as the relay's, not the server's cut.
                    response.headers_mut().insert("relay-code", HeaderValue::from(status.code() as i32));
                    response
                }
            })
        })
    }
}

async fn app_relaying(client: ClientSettings) -> Result<support::TestApp> {
    let echo = compile_test_proto("echo/v1/echo.proto")?;
    spawn_app_prepared(
        |settings| {
            settings.clients.insert("down".to_owned(), client);
        },
        move |services, ctx| {
            let users = ctx.clients.get::<Users>("down")?;
            services.add_descriptors(&echo).add(Relay(users));
            Ok(())
        },
    )
    .await
}

/// A call through the gateway with a 3 s deadline, a request id and a
/// traceparent: the downstream sees all three, the deadline reduced.
#[tokio::test]
async fn the_callers_deadline_request_id_and_traceparent_reach_the_downstream() -> Result<()> {
    let down = downstream().await?;
    let app = app_relaying(client_settings(format!("http://{}", down.addr))).await?;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = app
        .http()
        .send(
            http::Method::GET,
            "/v1/echo/abc",
            &[("grpc-timeout", "3S"), ("x-request-id", "relay-42"), ("traceparent", traceparent)],
            None,
        )
        .await?;
    assert_eq!(response.status, http::StatusCode::OK, "{}", response.text());
    let seen = down.script.last_headers("/GetUser").unwrap();
    let header = |name: &str| seen.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("x-request-id").as_deref(), Some("relay-42"));
    let forwarded = header("traceparent").unwrap();
    assert!(forwarded.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{forwarded}");
    let timeout = keel::grpc::middleware::deadline::parse_grpc_timeout(&header("grpc-timeout").unwrap()).unwrap();
    // The client's own timeout is 10 s: the caller's 3 s won, reduced by
    // the time already spent.
    assert!(timeout <= Duration::from_secs(3) && timeout > Duration::ZERO, "{timeout:?}");
    app.stop().await
}

/// An expired deadline fails at once with DEADLINE_EXCEEDED and nothing is
/// sent: set on the request, or inherited from the call being handled.
#[tokio::test]
async fn an_expired_deadline_never_leaves_the_process() -> Result<()> {
    let down = downstream().await?;
    let (app, mut users) = app_calling(client_settings(format!("http://{}", down.addr))).await?;
    let mut request = tonic::Request::new(get_user());
    request.set_timeout(Duration::ZERO);
    assert_eq!(users.get_user(request).await.unwrap_err().code(), Code::DeadlineExceeded);
    assert_eq!(down.script.calls("/GetUser"), 0, "an expired call was sent");
    let scrape = app.scrape().await?;
    let handled =
        sample(&scrape, "grpc_client_handled_total", &labels("GetUser", &[("grpc_code", "DeadlineExceeded")]));
    assert_eq!(handled, Some(1.0));
    app.stop().await?;

    let app = app_relaying(client_settings(format!("http://{}", down.addr))).await?;
    // Straight to the gRPC port over plain HTTP/2: the gateway's timer, or
    // a tonic channel's, would race the server's. The relay's answer is
    // trailers-only, marked as its own.
    let tcp = tokio::net::TcpStream::connect(app.grpc_addr).await?;
    let (h2, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let mut h2 = h2.ready().await?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("{}/echo.v1.EchoService/Echo", app.grpc_url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "200m")
        .header("relay-wait", "1")
        .body(())?;
    let (response, mut body) = h2.send_request(request, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let response = response.await?;
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
    assert_eq!(header("grpc-status"), Some("4"), "{:?}", response.headers());
    assert_eq!(header("relay-code"), Some("4"), "the client did not fail the call itself: {:?}", response.headers());
    assert_eq!(down.script.calls("/GetUser"), 0, "a call past the caller's deadline was sent");
    let scrape = app.scrape().await?;
    let handled =
        sample(&scrape, "grpc_client_handled_total", &labels("GetUser", &[("grpc_code", "DeadlineExceeded")]));
    assert_eq!(handled, Some(1.0));
    app.stop().await
}

/// A client's own token goes out as a bearer token, from config or from a
/// file that is re-read when it changes; with `propagate_authorization`
/// the caller's own goes instead.
#[tokio::test]
async fn credentials_are_the_clients_token_or_the_callers() -> Result<()> {
    let down = downstream().await?;
    let authorization = |script: &Script| {
        script
            .last_headers("/GetUser")
            .and_then(|h| h.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned))
    };

    let mut client = client_settings(format!("http://{}", down.addr));
    client.token = "own-token".to_owned();
    let (app, mut users) = app_calling(client).await?;
    users.get_user(get_user()).await?;
    assert_eq!(authorization(&down.script).as_deref(), Some("Bearer own-token"));
    app.stop().await?;

    let dir = tempfile_dir()?;
    let file = dir.join("token");
    std::fs::write(&file, "file-token-1\n")?;
    let mut client = client_settings(format!("http://{}", down.addr));
    client.token_file = file.display().to_string();
    let (app, mut users) = app_calling(client).await?;
    users.get_user(get_user()).await?;
    assert_eq!(authorization(&down.script).as_deref(), Some("Bearer file-token-1"));
    std::fs::write(&file, "file-token-2\n")?;
    let script = down.script.clone();
    eventually(Duration::from_secs(15), || {
        let mut users = users.clone();
        let script = script.clone();
        async move {
            let _ = users.get_user(get_user()).await;
            authorization(&script).as_deref() == Some("Bearer file-token-2")
        }
    })
    .await?;
    app.stop().await?;

    let mut client = client_settings(format!("http://{}", down.addr));
    client.propagate_authorization = true;
    let app = app_relaying(client).await?;
    let response =
        app.http().send(http::Method::GET, "/v1/echo/abc", &[("authorization", "Bearer callers-token")], None).await?;
    assert_eq!(response.status, http::StatusCode::OK, "{}", response.text());
    assert_eq!(authorization(&down.script).as_deref(), Some("Bearer callers-token"));
    app.stop().await
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("keel-clients-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// ------------------------------------------------------------ balancing

/// Resolves every name to the addresses the test holds.
#[derive(Default)]
struct TestResolver(Mutex<Vec<SocketAddr>>);

impl Resolve for TestResolver {
    fn resolve<'a>(&'a self, _host: &'a str, _port: u16) -> ResolveFuture<'a> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

/// Three downstreams on 127.0.0.2-4 behind one `dns:///` name each get
/// calls; a fourth on 127.0.0.5 gets calls once re-resolution finds it.
#[tokio::test]
async fn dns_endpoints_balance_across_addresses_and_follow_new_ones() -> Result<()> {
    let mut servers = Vec::new();
    for last in 2..=5 {
        servers.push(downstream_on([127, 0, 0, last]).await?);
    }
    let resolver = Arc::new(TestResolver::default());
    *resolver.0.lock().unwrap() = servers[..3].iter().map(|s| s.addr).collect();
    let mut client = client_settings("dns:///pods.test:9000".to_owned());
    client.resolve_interval = Duration::from_millis(100);
    let settings = BTreeMap::from([("pods".to_owned(), client)]);
    let pool = prost_reflect::DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET)?;
    let metrics = keel::metrics::Metrics::new()?;
    let clients = Clients::build_with_resolver(&settings, &pool, &metrics, resolver.clone())?;
    let users: Users = clients.get("pods")?;

    let each_called = |servers: &[Downstream]| servers.iter().all(|s| s.script.calls("/GetUser") > 0);
    eventually(READY_BOUND, || {
        let mut users = users.clone();
        async move { users.get_user(get_user()).await.is_ok() }
    })
    .await?;
    for _ in 0..60 {
        users.clone().get_user(get_user()).await?;
    }
    assert!(each_called(&servers[..3]), "calls did not reach every address");
    assert_eq!(servers[3].script.calls("/GetUser"), 0);

    resolver.0.lock().unwrap().push(servers[3].addr);
    let fourth = servers[3].script.clone();
    eventually(READY_BOUND, || {
        let mut users = users.clone();
        let fourth = fourth.clone();
        async move {
            let _ = users.get_user(get_user()).await;
            fourth.calls("/GetUser") > 0
        }
    })
    .await?;
    clients.close(Duration::from_secs(5)).await;
    Ok(())
}

// ------------------------------------------------------------ readiness

/// `/readyz` follows a required downstream: ready while it is SERVING, 503
/// naming the client while it is NOT_SERVING or gone, ready again after.
#[tokio::test]
async fn readiness_follows_a_required_downstream() -> Result<()> {
    let down = downstream().await?;
    let mut client = client_settings(format!("http://{}", down.addr));
    client.required_for_readiness = true;
    let app = spawn_app_prepared(
        |settings| {
            settings.clients.insert("down".to_owned(), client);
        },
        |_, _| Ok(()),
    )
    .await?;
    let admin = app.admin();
    let readyz = |expected: http::StatusCode| {
        let admin = admin.clone();
        move || {
            let admin = admin.clone();
            async move { admin.get("/readyz").await.is_ok_and(|r| r.status == expected) }
        }
    };
    eventually(READY_BOUND, readyz(http::StatusCode::OK)).await?;

    down.script.health.store(2, Ordering::SeqCst);
    eventually(READY_BOUND, readyz(http::StatusCode::SERVICE_UNAVAILABLE)).await?;
    let body = admin.get("/readyz").await?.text();
    assert!(body.contains("client down") && body.contains("NOT_SERVING"), "{body}");
    let verbose = admin.get("/readyz?verbose").await?.text();
    assert!(verbose.contains("[-]clients.down failed"), "{verbose}");

    down.script.health.store(1, Ordering::SeqCst);
    eventually(READY_BOUND, readyz(http::StatusCode::OK)).await?;

    drop(down);
    eventually(READY_BOUND, readyz(http::StatusCode::SERVICE_UNAVAILABLE)).await?;
    let body = admin.get("/readyz").await?.text();
    assert!(body.contains("client down: health check failed"), "{body}");
    let scrape = app.scrape().await?;
    let checks = sample(
        &scrape,
        "grpc_client_handled_total",
        &[("grpc_client_target", "down"), ("grpc_method", "Check"), ("grpc_code", "OK")],
    );
    assert!(checks.is_some_and(|n| n >= 2.0), "{checks:?}");
    app.stop().await
}

// ------------------------------------------------------------ metrics

/// Series exist at zero before any call: the health methods of every
/// client, the declared service's methods, each with its target, and the
/// gateway's own calls under `grpc_client_target="gateway"`.
#[tokio::test]
async fn client_series_are_preinitialised_and_labelled_by_target() -> Result<()> {
    let down = downstream().await?;
    let (app, _users) = app_calling(client_settings(format!("http://{}", down.addr))).await?;
    let scrape = app.scrape().await?;
    for method in ["CreateUser", "GetUser", "DeleteUser", "ListUsers"] {
        assert_eq!(sample(&scrape, "grpc_client_started_total", &labels(method, &[])), Some(0.0), "{method}");
    }
    let health = [("grpc_client_target", "down"), ("grpc_service", "grpc.health.v1.Health"), ("grpc_method", "Check")];
    assert_eq!(sample(&scrape, "grpc_client_started_total", &health), Some(0.0));
    let gateway =
        [("grpc_client_target", "gateway"), ("grpc_service", "user.v1.UserService"), ("grpc_method", "GetUser")];
    assert_eq!(sample(&scrape, "grpc_client_started_total", &gateway), Some(0.0));

    let response = app.http().get("/v1/users/nobody").await?;
    assert_eq!(response.status, http::StatusCode::NOT_FOUND);
    let scrape = app.scrape().await?;
    assert_eq!(sample(&scrape, "grpc_client_started_total", &gateway), Some(1.0));
    assert_eq!(sample(&scrape, "grpc_client_started_total", &labels("GetUser", &[])), Some(0.0));
    app.stop().await
}

// ------------------------------------------------------------ garbage and closing

/// Garbage from the downstream (a bad grpc-status, plain HTTP 500, a
/// truncated frame, an undecodable message) is a status for the caller,
/// counted, never a panic; the client keeps working after.
#[tokio::test]
async fn garbage_from_the_downstream_is_a_status_never_a_panic() -> Result<()> {
    let down = downstream().await?;
    let (app, mut users) = app_calling(client_settings(format!("http://{}", down.addr))).await?;
    for kind in [1u8, 2, 3, 4, 6] {
        down.script.garbage.store(kind, Ordering::SeqCst);
        let outcome = users.get_user(get_user()).await;
        let status = outcome.expect_err("garbage was accepted");
        assert_ne!(status.code(), Code::Ok, "kind {kind}");
    }
    down.script.garbage.store(0, Ordering::SeqCst);
    users.get_user(get_user()).await?;
    let scrape = app.scrape().await?;
    assert_eq!(sample(&scrape, "grpc_client_started_total", &labels("GetUser", &[])), Some(6.0));
    assert_eq!(sample(&scrape, "grpc_client_handled_total", &labels("GetUser", &[("grpc_code", "OK")])), Some(1.0));
    app.stop().await
}

/// Closing cancels a call still waiting on the downstream, and refuses
/// new ones, with CANCELLED.
#[tokio::test]
async fn close_cancels_calls_in_flight_and_refuses_new_ones() -> Result<()> {
    let down = downstream().await?;
    down.script.hang.store(true, Ordering::SeqCst);
    let settings = BTreeMap::from([("down".to_owned(), client_settings(format!("http://{}", down.addr)))]);
    let pool = prost_reflect::DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET)?;
    let clients = Clients::build(&settings, &pool, &keel::metrics::Metrics::new()?)?;
    let users: Users = clients.get("down")?;
    let in_flight = tokio::spawn({
        let mut users = users.clone();
        async move { users.get_user(get_user()).await }
    });
    let script = down.script.clone();
    eventually(READY_BOUND, || {
        let script = script.clone();
        async move { script.calls("/GetUser") == 1 }
    })
    .await?;
    clients.close(Duration::from_secs(5)).await;
    let cancelled = tokio::time::timeout(Duration::from_secs(5), in_flight).await??;
    assert_eq!(cancelled.unwrap_err().code(), Code::Cancelled);
    assert_eq!(users.clone().get_user(get_user()).await.unwrap_err().code(), Code::Cancelled);
    Ok(())
}

/// The binary closes every channel at shutdown, after the drain, and logs
/// each by name.
#[test]
fn shutdown_closes_every_channel_and_logs_it() -> Result<()> {
    let mut keel = support::process::KeelProcess::start(&[
        ("KEEL__SHUTDOWN__DRAIN_DELAY", "0s"),
        ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://127.0.0.1:9"),
        ("KEEL__CLIENTS__PODS__ENDPOINT", "dns:///localhost:9"),
    ])?;
    keel.signal("TERM")?;
    let status = keel.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "{status:?}");
    let logs = keel.all_logs()?;
    let position = |needle: &str| logs.iter().position(|line| line.contains(needle));
    let drained = position("shutdown 3/4").expect("no drain line");
    for client in ["inventory", "pods"] {
        let closed = logs
            .iter()
            .position(|l| {
                l.contains("shutdown: client channel closed") && l.contains(&format!("\"client\":\"{client}\""))
            })
            .unwrap_or_else(|| panic!("no close line for {client}: {logs:#?}"));
        assert!(closed > drained, "{client} closed before the drain");
    }
    let complete = position("shutdown 4/4").expect("no completion line");
    assert!(logs.iter().rposition(|l| l.contains("client channel closed")).unwrap() < complete);
    Ok(())
}

// ------------------------------------------------------------ config

fn load(vars: &[(&str, &str)]) -> Result<Settings, keel::config::ConfigError> {
    let sources = ConfigSources {
        dir: std::path::PathBuf::from("/nonexistent-keel-config"),
        env_vars: vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..ConfigSources::default()
    };
    Settings::load(&sources)
}

#[test]
fn clients_are_configured_from_the_environment() -> Result<()> {
    let settings = load(&[
        ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "dns:///inventory-headless.shop.svc:9000"),
        ("KEEL__CLIENTS__INVENTORY__TIMEOUT", "750ms"),
        ("KEEL__CLIENTS__INVENTORY__RETRY__MAX_ATTEMPTS", "5"),
        ("KEEL__CLIENTS__INVENTORY__TOKEN", "s3cret-token"),
        ("KEEL__CLIENTS__INVENTORY__REQUIRED_FOR_READINESS", "true"),
    ])?;
    let inventory = &settings.clients["inventory"];
    assert_eq!(inventory.endpoint, "dns:///inventory-headless.shop.svc:9000");
    assert_eq!(inventory.timeout, Duration::from_millis(750));
    assert_eq!(inventory.retry.max_attempts, 5);
    assert_eq!(inventory.retry.budget_percent, 20, "defaults fill the rest");
    assert!(inventory.required_for_readiness);
    let shown = settings.to_redacted_json();
    assert!(!shown.contains("s3cret-token"), "{shown}");
    assert!(shown.contains("<redacted>"));
    assert!(!format!("{settings:?}").contains("s3cret-token"));
    Ok(())
}

#[test]
fn bad_client_values_name_their_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("KEEL__CLIENTS__INVENTORY__TIMEOUT", "2s")], "clients.inventory.endpoint"),
        (&[("KEEL__CLIENTS__INVENTORY__ENDPOINT", "inventory:9000")], "clients.inventory.endpoint"),
        (&[("KEEL__CLIENTS__INVENTORY__ENDPOINT", "ftp://inventory:9000")], "clients.inventory.endpoint"),
        (&[("KEEL__CLIENTS__INVENTORY__ENDPOINT", "dns:///inventory")], "clients.inventory.endpoint"),
        (
            &[
                ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://inventory:9000"),
                ("KEEL__CLIENTS__INVENTORY__TIMEOUT", "0s"),
            ],
            "clients.inventory.timeout",
        ),
        (
            &[
                ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://inventory:9000"),
                ("KEEL__CLIENTS__INVENTORY__RETRY__MAX_ATTEMPTS", "0"),
            ],
            "clients.inventory.retry.max_attempts",
        ),
        (
            &[
                ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://inventory:9000"),
                ("KEEL__CLIENTS__INVENTORY__RETRY__BUDGET_PERCENT", "150"),
            ],
            "clients.inventory.retry.budget_percent",
        ),
        (
            &[
                ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://inventory:9000"),
                ("KEEL__CLIENTS__INVENTORY__TOKEN_FILE", "/nonexistent/token"),
            ],
            "clients.inventory.token_file",
        ),
        (
            &[
                ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://inventory:9000"),
                ("KEEL__CLIENTS__INVENTORY__TOKEN", "a b"),
            ],
            "clients.inventory.token",
        ),
        (
            &[
                ("KEEL__CLIENTS__INVENTORY__ENDPOINT", "http://inventory:9000"),
                ("KEEL__CLIENTS__INVENTORY__ADRESS", "x"),
            ],
            "clients.inventory.adress",
        ),
    ];
    for (vars, key) in cases {
        let error = load(vars).expect_err(key);
        let text = format!("{error}");
        assert!(text.contains(&format!("`{key}`")), "{key}: {text}");
        assert!(!text.contains("a b"), "the token leaked: {text}");
    }
}

/// A handler asking for a client that is not configured stops the start,
/// naming the configured ones.
#[tokio::test]
async fn an_unconfigured_client_is_a_startup_error() -> Result<()> {
    let down = downstream().await?;
    let outcome = spawn_app_prepared(
        |settings| {
            settings.clients.insert("down".to_owned(), client_settings(format!("http://{}", down.addr)));
        },
        |_, ctx| {
            ctx.clients.get::<Users>("inventory")?;
            Ok(())
        },
    )
    .await;
    let error = outcome.err().expect("the app started without its client");
    let chain = format!("{error:#}");
    assert!(chain.contains("no client named \"inventory\"") && chain.contains("configured: down"), "{chain}");
    Ok(())
}
