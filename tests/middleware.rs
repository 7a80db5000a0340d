//! The gRPC layer stack, exercised through the running app: auth (gRPC and
//! gateway), panic recovery, deadlines, load shedding and size limits. A
//! test-only `test.v1.Faulty` service, added behind the same stack, panics
//! or waits on demand.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::proto::user::v1::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest, User, WatchUsersRequest,
};
use support::{READY_BOUND, TestApp, eventually, spawn_app_prepared, spawn_app_with};
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A raw gRPC service that misbehaves on request.
#[derive(Clone)]
struct Faulty {
    /// Calls to `Wait` block until the test adds permits.
    gate: Arc<Semaphore>,
    /// How many calls are inside `Wait` now.
    waiting: Arc<AtomicUsize>,
}

impl NamedService for Faulty {
    const NAME: &'static str = "test.v1.Faulty";
}

impl tower::Service<http::Request<tonic::body::Body>> for Faulty {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        if method == "PanicInCall" {
            panic!("boom in call");
        }
        let gate = self.gate.clone();
        let waiting = self.waiting.clone();
        Box::pin(async move {
            match method.as_str() {
                "PanicInFuture" => panic!("boom in future"),
                "Wait" => {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let permit = gate.acquire().await;
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
                _ => {}
            }
            // One empty message, then OK.
            let body = http_body_util::StreamBody::new(tokio_stream::iter([
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                Ok(hyper::body::Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                    t
                })),
            ]));
            let mut response = http::Response::new(tonic::body::Body::new(body));
            response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
            Ok(response)
        })
    }
}

impl Faulty {
    fn new() -> Self {
        Self { gate: Arc::new(Semaphore::new(0)), waiting: Arc::new(AtomicUsize::new(0)) }
    }
}

/// Calls `test.v1.Faulty/{method}` with an empty message.
async fn call_faulty(channel: Channel, method: &str, timeout: Option<Duration>) -> Result<(), tonic::Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::try_from(format!("/test.v1.Faulty/{method}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut request = tonic::Request::new(());
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    client.unary::<(), (), _>(request, path, tonic_prost::ProstCodec::default()).await.map(|_| ())
}

async fn spawn_with_faulty(adjust: impl FnOnce(&mut keel::config::Settings)) -> Result<(TestApp, Faulty)> {
    let faulty = Faulty::new();
    let service = faulty.clone();
    let descriptors = support::compile_test_proto("faulty.proto")?;
    let app = spawn_app_prepared(adjust, move |services, _| {
        services.add_descriptors(&descriptors).add(service).without_rest();
        Ok(())
    })
    .await?;
    Ok((app, faulty))
}

mod auth {
    use super::*;

    const TOKEN: &str = "s3cret-token";

    fn authed<T>(message: T, token: Option<&str>) -> Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
        }
        Ok(request)
    }

    /// Calls every UserService method; returns each call's code.
    async fn every_method(
        client: &mut UserServiceClient<Channel>,
        token: Option<&str>,
    ) -> Result<Vec<(&'static str, Code)>> {
        let user =
            || User { user_id: "auth-u".into(), display_name: "A".into(), email: "a@b".into(), ..Default::default() };
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
        Ok(vec![
            (
                "CreateUser",
                code(client.create_user(authed(CreateUserRequest { user: Some(user()) }, token)?).await.map(drop)),
            ),
            (
                "GetUser",
                code(client.get_user(authed(GetUserRequest { user_id: "auth-u".into() }, token)?).await.map(drop)),
            ),
            (
                "UpdateUser",
                code(
                    client
                        .update_user(authed(UpdateUserRequest { user: Some(user()), update_mask: None }, token)?)
                        .await
                        .map(drop),
                ),
            ),
            ("ListUsers", code(client.list_users(authed(ListUsersRequest {}, token)?).await.map(drop))),
            ("WatchUsers", code(client.watch_users(authed(WatchUsersRequest {}, token)?).await.map(drop))),
            (
                "DeleteUser",
                code(
                    client.delete_user(authed(DeleteUserRequest { user_id: "auth-u".into() }, token)?).await.map(drop),
                ),
            ),
        ])
    }

    #[tokio::test]
    async fn grpc_needs_a_valid_bearer_token_except_for_health_and_reflection() -> Result<()> {
        let app = spawn_app_with(|s| s.auth.tokens = vec![TOKEN.into(), "other".into()]).await?;
        let mut client = app.users()?;
        for (token, label) in [(None, "missing"), (Some("wrong"), "wrong")] {
            for (method, code) in every_method(&mut client, token).await? {
                assert_eq!(code, Code::Unauthenticated, "{method} with a {label} token");
            }
        }
        let unauthenticated =
            client.get_user(GetUserRequest { user_id: "x".into() }).await.err().context("accepted")?;
        assert_eq!(unauthenticated.message(), "missing or invalid credentials");
        let wrong = client
            .get_user(authed(GetUserRequest { user_id: "x".into() }, Some("nope"))?)
            .await
            .err()
            .context("accepted")?;
        assert_eq!(wrong.message(), unauthenticated.message(), "missing and wrong look the same");

        for (method, code) in every_method(&mut client, Some(TOKEN)).await? {
            assert_eq!(code, Code::Ok, "{method} with the right token");
        }

        let mut health = HealthClient::new(app.channel()?);
        health.check(HealthCheckRequest { service: String::new() }).await?;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut reflection = ServerReflectionClient::new(app.channel()?);
        let mut answers = reflection.server_reflection_info(tokio_stream::iter([request])).await?.into_inner();
        assert!(answers.message().await?.is_some(), "reflection answered without a token");
        drop(answers);
        app.stop().await
    }

    #[tokio::test]
    async fn the_gateway_answers_401_for_missing_or_wrong_tokens() -> Result<()> {
        let app = spawn_app_with(|s| s.auth.tokens = vec![TOKEN.into()]).await?;
        let http = app.http();
        let body = r#"{"user_id": "gw", "display_name": "G", "email": "g@example.com"}"#;
        let routes: [(Method, &str, Option<&str>); 6] = [
            (Method::POST, "/v1/users", Some(body)),
            (Method::GET, "/v1/users/gw", None),
            (Method::PATCH, "/v1/users/gw", Some(r#"{"display_name": "H"}"#)),
            (Method::GET, "/v1/users", None),
            (Method::GET, "/v1/users:watch", None),
            (Method::DELETE, "/v1/users/gw", None),
        ];
        let bearer = format!("Bearer {TOKEN}");
        for (method, path, body) in &routes {
            for headers in [vec![], vec![("authorization", "Bearer wrong")]] {
                let response = http.send(method.clone(), path, &headers, *body).await?;
                assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{method} {path} {headers:?}");
                assert_eq!(response.json()?["code"], 16);
            }
        }
        for (method, path, body) in &routes {
            let headers = [("authorization", bearer.as_str()), ("grpc-timeout", "200m")];
            let response = http.send(method.clone(), path, &headers, *body).await?;
            assert_eq!(response.status, StatusCode::OK, "{method} {path}: {}", response.text());
        }
        assert_eq!(http.get("/healthz").await?.status, StatusCode::OK, "health needs no token");
        assert_eq!(app.admin().get("/metrics").await?.status, StatusCode::OK, "admin is never behind auth");
        app.stop().await
    }

    fn keel_config(env: &[(&str, &str)]) -> Result<std::process::Output> {
        let dir = std::env::temp_dir().join(format!("keel-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // KEEL_ENV must name an overlay that exists; an empty one adds nothing.
        std::fs::write(dir.join("production.yaml"), "")?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.arg("config").env_clear().env("KEEL_CONFIG_DIR", &dir).env("KEEL_ENV", "production");
        for (k, v) in env {
            command.env(k, v);
        }
        Ok(command.output()?)
    }

    #[test]
    fn production_refuses_to_start_without_tokens() -> Result<()> {
        let refused = keel_config(&[])?;
        assert_eq!(refused.status.code(), Some(78));
        assert!(String::from_utf8_lossy(&refused.stderr).contains("auth.tokens"));
        assert!(keel_config(&[("KEEL__AUTH__DISABLED", "true")])?.status.success(), "explicitly disabled is allowed");
        assert!(keel_config(&[("KEEL__AUTH__TOKENS", "t1")])?.status.success());
        Ok(())
    }
}

#[tokio::test]
async fn a_panicking_handler_answers_internal_and_the_server_keeps_serving() -> Result<()> {
    let (app, _faulty) = spawn_with_faulty(|_| {}).await?;
    for method in ["PanicInCall", "PanicInFuture"] {
        let status = call_faulty(app.channel()?, method, None).await.err().context("no error")?;
        assert_eq!(status.code(), Code::Internal, "{method}: {status:?}");
        assert_eq!(status.message(), "internal error", "no panic details leak to clients");
        call_faulty(app.channel()?, "Fine", None).await?;
    }
    app.users()?.list_users(ListUsersRequest {}).await?;
    app.stop().await
}

mod deadlines {
    use super::*;

    #[tokio::test]
    async fn unary_calls_without_a_deadline_get_the_default() -> Result<()> {
        let (app, _faulty) = spawn_with_faulty(|s| s.grpc.default_timeout = Duration::from_millis(200)).await?;
        let status = call_faulty(app.channel()?, "Wait", None).await.err().context("no error")?;
        assert_eq!(status.code(), Code::DeadlineExceeded);
        app.stop().await
    }

    #[tokio::test]
    async fn a_longer_deadline_than_the_maximum_is_capped() -> Result<()> {
        let (app, _faulty) = spawn_with_faulty(|s| s.grpc.max_timeout = Duration::from_millis(300)).await?;
        let started = tokio::time::Instant::now();
        let status =
            call_faulty(app.channel()?, "Wait", Some(Duration::from_secs(3600))).await.err().context("no error")?;
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(started.elapsed() < Duration::from_secs(30), "the hour-long deadline was not capped");

        // Streams without a deadline get the maximum too.
        let mut watch = app.users()?.watch_users(WatchUsersRequest {}).await?.into_inner();
        let status = watch.message().await.err().context("the watch did not end")?;
        assert_eq!(status.code(), Code::DeadlineExceeded);
        app.stop().await
    }
}

#[tokio::test]
async fn a_burst_past_the_concurrency_limit_is_shed_at_once() -> Result<()> {
    let limit = 4;
    let (app, faulty) = spawn_with_faulty(|s| s.grpc.max_concurrent_requests = limit).await?;
    let channel = app.channel()?;
    let burst: Vec<_> = (0..20).map(|_| tokio::spawn(call_faulty(channel.clone(), "Wait", None))).collect();
    eventually(READY_BOUND, || async { faulty.waiting.load(Ordering::SeqCst) == limit })
        .await
        .context("the calls within the limit never arrived")?;
    // Probes still pass while the server is full.
    HealthClient::new(app.channel()?).check(HealthCheckRequest { service: String::new() }).await?;
    let refused = app.users()?.get_user(GetUserRequest { user_id: "x".into() }).await.err().context("not shed")?;
    assert_eq!(refused.code(), Code::ResourceExhausted);

    faulty.gate.add_permits(1000);
    let mut codes = Vec::new();
    for call in burst {
        codes.push(call.await?.err().map_or(Code::Ok, |s| s.code()));
    }
    assert_eq!(codes.iter().filter(|c| **c == Code::Ok).count(), limit);
    assert_eq!(codes.iter().filter(|c| **c == Code::ResourceExhausted).count(), 20 - limit);
    // With the burst over, calls are admitted again.
    call_faulty(app.channel()?, "Fine", None).await?;
    app.stop().await
}

mod size_limits {
    use super::*;

    #[tokio::test]
    async fn oversized_requests_and_responses_are_resource_exhausted() -> Result<()> {
        let app = spawn_app_with(|s| {
            s.grpc.max_decoding_message_size = keel::config::ByteSize(1024);
            s.grpc.max_encoding_message_size = keel::config::ByteSize(250);
        })
        .await?;
        let mut users = app.users()?;
        let user = |name: String| User {
            user_id: "big".into(),
            display_name: name,
            email: "b@example.com".into(),
            ..Default::default()
        };
        let status = users
            .create_user(CreateUserRequest { user: Some(user("x".repeat(2000))) })
            .await
            .err()
            .context("accepted")?;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("grpc.max_decoding_message_size"), "{}", status.message());

        users.create_user(CreateUserRequest { user: Some(user("y".repeat(100))) }).await?;
        let small = users.get_user(GetUserRequest { user_id: "big".into() }).await?;
        assert_eq!(small.get_ref().display_name.len(), 100);
        // The update is stored, but its response is over the limit.
        let status = users
            .update_user(UpdateUserRequest { user: Some(user("z".repeat(250))), update_mask: None })
            .await
            .err()
            .context("an over-limit response was sent")?;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let status = users.get_user(GetUserRequest { user_id: "big".into() }).await.err().context("sent")?;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("grpc.max_encoding_message_size"), "{}", status.message());

        let huge = format!(r#"{{"display_name": "{}", "email": "h@example.com"}}"#, "h".repeat(2000));
        let through_gateway = app.http().send(Method::POST, "/v1/users", &[], Some(&huge)).await?;
        assert_eq!(through_gateway.status, StatusCode::TOO_MANY_REQUESTS);
        app.stop().await
    }
}

#[tokio::test]
async fn a_handler_that_ignores_cancellation_is_abandoned_at_the_drain_bound() -> Result<()> {
    let (app, faulty) = spawn_with_faulty(|s| {
        s.shutdown.timeout = Duration::from_millis(500);
        s.grpc.default_timeout = Duration::from_secs(3600);
    })
    .await?;
    // The call never finishes: the gate is never opened.
    let stuck = tokio::spawn(call_faulty(app.channel()?, "Wait", None));
    eventually(READY_BOUND, || async { faulty.waiting.load(Ordering::SeqCst) == 1 }).await?;
    let started = tokio::time::Instant::now();
    app.stop().await?;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "did not wait for the call: {took:?}");
    assert!(took < Duration::from_millis(1500), "exceeded timeout + 1s: {took:?}");
    stuck.abort();
    Ok(())
}

#[tokio::test]
async fn connections_past_their_max_age_are_sent_away() -> Result<()> {
    let age = Duration::from_millis(300);
    let app = spawn_app_with(|s| {
        s.grpc.max_connection_age = age;
        s.grpc.max_connection_age_grace = Duration::from_millis(300);
    })
    .await?;
    // A raw HTTP/2 client, so the connection's own end is observable.
    let tcp = tokio::net::TcpStream::connect(app.grpc_addr).await?;
    let opened = tokio::time::Instant::now();
    let (_client, connection) = h2::client::handshake(tcp).await?;
    let closed = tokio::time::timeout(READY_BOUND, connection).await.context("the connection was never sent away")?;
    let lived = opened.elapsed();
    assert!(closed.is_ok(), "a GOAWAY is a clean end: {closed:?}");
    assert!(lived >= age, "closed before its maximum age: {lived:?}");
    app.stop().await
}

/// A call the client abandons (RST_STREAM CANCEL) is `Canceled`, not a
/// server error: it must not inflate error-ratio dashboards and alerts.
#[tokio::test]
async fn a_call_the_client_cancels_is_recorded_as_canceled() -> Result<()> {
    let (app, faulty) = spawn_with_faulty(|_| {}).await?;
    let call = tokio::spawn(call_faulty(app.channel()?, "Wait", None));
    eventually(READY_BOUND, || async { faulty.waiting.load(Ordering::SeqCst) == 1 }).await?;
    // Dropping the call's future resets its HTTP/2 stream.
    call.abort();
    let labels =
        |code: &'static str| [("grpc_service", "test.v1.Faulty"), ("grpc_method", "Wait"), ("grpc_code", code)];
    eventually(READY_BOUND, || async {
        app.scrape()
            .await
            .is_ok_and(|s| support::sample(&s, "grpc_server_handled_total", &labels("Canceled")) == Some(1.0))
    })
    .await
    .context("the cancelled call was not recorded as Canceled")?;
    let scrape = app.scrape().await?;
    assert_eq!(support::sample(&scrape, "grpc_server_handled_total", &labels("Internal")), Some(0.0));
    faulty.gate.add_permits(10);
    app.stop().await
}

/// A client that closes its connection in the middle of a request (as a
/// load tool does when its run ends) went away: `Canceled`, never `Unknown`,
/// which the error-budget alert counts as a server fault.
#[tokio::test]
async fn a_request_cut_off_by_the_client_is_canceled_not_unknown() -> Result<()> {
    let app = support::spawn_app().await?;
    let tcp = tokio::net::TcpStream::connect(app.grpc_addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await?;
    let request = support::raw_grpc_request(app.grpc_addr, "user.v1.UserService/GetUser")?;
    let (_response, mut send) = client.send_request(request, false)?;
    // A prefix announcing 100 bytes, then 3 of them, then the connection
    // goes away.
    let mut partial = vec![0u8];
    partial.extend_from_slice(&100u32.to_be_bytes());
    partial.extend_from_slice(b"abc");
    send.send_data(Bytes::from(partial), false)?;
    let labels =
        |code: &'static str| [("grpc_service", "user.v1.UserService"), ("grpc_method", "GetUser"), ("grpc_code", code)];
    // The server has the call once it is counted as started.
    eventually(READY_BOUND, || async {
        app.scrape().await.is_ok_and(|s| {
            support::sample(&s, "grpc_server_started_total", &[("grpc_method", "GetUser")]).is_some_and(|n| n >= 1.0)
        })
    })
    .await?;
    drop(send);
    drop(client);
    connection.abort();
    let canceled = eventually(READY_BOUND, || async {
        app.scrape()
            .await
            .is_ok_and(|s| support::sample(&s, "grpc_server_handled_total", &labels("Canceled")) == Some(1.0))
    })
    .await;
    let scrape = app.scrape().await?;
    let recorded: Vec<_> = ["Canceled", "Unknown", "Internal"]
        .into_iter()
        .map(|code| (code, support::sample(&scrape, "grpc_server_handled_total", &labels(code))))
        .collect();
    assert!(canceled.is_ok(), "the cut-off request was not recorded as Canceled: {recorded:?}");
    assert_eq!(recorded[1..], [("Unknown", Some(0.0)), ("Internal", Some(0.0))]);
    app.stop().await
}

/// A unary call that sends two request messages is a protocol violation:
/// INTERNAL, as grpc-go answers, never OK. Sent over a raw HTTP/2 client,
/// since no gRPC client will send it.
#[tokio::test]
async fn a_unary_call_with_two_request_messages_is_rejected() -> Result<()> {
    use prost::Message as _;

    let app = support::spawn_app().await?;
    let tcp = tokio::net::TcpStream::connect(app.grpc_addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    let request = support::raw_grpc_request(app.grpc_addr, "user.v1.UserService/GetUser")?;
    let (response, mut send) = client.send_request(request, false)?;
    let message = GetUserRequest { user_id: "nobody".into() }.encode_to_vec();
    let body = support::grpc_frame(&message)?.repeat(2);
    send.send_data(Bytes::from(body), true)?;
    let response = tokio::time::timeout(READY_BOUND, response).await??;
    let headers_status = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk?;
    }
    let trailers = body.trailers().await?;
    let status = headers_status.or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()));
    assert_eq!(status.as_ref().map(|v| v.as_bytes()), Some(&b"13"[..]), "{status:?}");
    app.stop().await
}

/// A stream whose client never reads (a window of 1, never a
/// WINDOW_UPDATE) cannot keep its load-shedding slot past its deadline:
/// hyper never finishes such a body, so a timer gives the slot back.
#[tokio::test]
async fn unread_streams_past_their_deadline_release_their_shedding_slots() -> Result<()> {
    use prost::Message as _;

    let app = spawn_app_with(|s| {
        s.grpc.max_concurrent_requests = 2;
        s.grpc.max_timeout = Duration::from_millis(500);
    })
    .await?;
    let mut users = app.users()?;
    for n in 0..20 {
        let user = User {
            user_id: format!("u{n:02}"),
            display_name: "x".repeat(200),
            email: format!("u{n}@example.com"),
            ..Default::default()
        };
        users.create_user(CreateUserRequest { user: Some(user) }).await?;
    }
    // Two ListUsers streams on a raw connection that never reads.
    let tcp = tokio::net::TcpStream::connect(app.grpc_addr).await?;
    let (client, connection) = h2::client::Builder::new().initial_window_size(1).handshake(tcp).await?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    let message = ListUsersRequest {}.encode_to_vec();
    let frame = support::grpc_frame(&message)?;
    let mut pending = Vec::new();
    for _ in 0..2 {
        let request = support::raw_grpc_request(app.grpc_addr, "user.v1.UserService/ListUsers")?;
        let (response, mut send) = client.send_request(request, false)?;
        send.send_data(Bytes::from(frame.clone()), true)?;
        pending.push(response);
        client = client.ready().await?;
    }
    // Until the deadline passes, the two streams hold both slots; shortly
    // after, calls are admitted again although the streams never finished.
    eventually(READY_BOUND, || {
        let mut users = users.clone();
        async move {
            let status = users.get_user(GetUserRequest { user_id: "nobody".into() }).await.err().map(|s| s.code());
            status == Some(Code::NotFound)
        }
    })
    .await
    .context("calls were still shed after the unread streams' deadline")?;
    drop(pending);
    app.stop().await
}
