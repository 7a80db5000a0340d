//! Graceful shutdown of the real binary under real signals (`kill`): NOT_SERVING
//! first, serving through the drain delay, streams ended with UNAVAILABLE,
//! in-flight work completed, a bound on the whole, and the signals that cut
//! it short. Each test owns one process; they run one at a time because
//! they measure time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use http::{Method, StatusCode};
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest, User, WatchUsersRequest};
use support::http::HttpClient;
use support::process::KeelProcess;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Serializes the tests of this file: they measure time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn channel(keel: &KeelProcess) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{}", keel.grpc))?.connect().await?)
}

fn user(id: &str) -> User {
    User { user_id: id.into(), display_name: id.into(), email: format!("{id}@example.com"), ..Default::default() }
}

async fn create_users(channel: &Channel, prefix: &str, n: usize) -> Result<()> {
    let mut users = UserServiceClient::new(channel.clone());
    for i in 0..n {
        users.create_user(CreateUserRequest { user: Some(user(&format!("{prefix}{i:05}"))) }).await?;
    }
    Ok(())
}

/// Unary calls in a loop until `stop`; each result with its time.
fn unary_load(channel: Channel, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<(Instant, Code)>> {
    tokio::spawn(async move {
        let mut users = UserServiceClient::new(channel);
        let mut results = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let outcome = users.get_user(GetUserRequest { user_id: "load".into() }).await;
            let code = match &outcome {
                Ok(_) => Code::Ok,
                // The client queued the call but its connection closed before
                // it was written: the server never saw it. tonic reports
                // this as CANCELLED; gRPC clients retry it as UNAVAILABLE.
                Err(status) if never_sent(status) => Code::Unavailable,
                Err(status) => {
                    if status.code() != Code::Unavailable {
                        eprintln!("unexpected status during shutdown: {status:?}");
                    }
                    status.code()
                }
            };
            results.push((Instant::now(), code));
            if results.len() % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        results
    })
}

/// Whether a failed call never reached the server's handlers, so a client
/// may retry it: hyper cancelled it on a connection that closed before it
/// was written (tonic says CANCELLED), or the server's GOAWAY refused it
/// (tonic says INTERNAL for h2's `GoAway(NO_ERROR, Remote)`). grpc-go
/// clients report or retry both as UNAVAILABLE.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return true;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = error.source();
    }
    false
}

/// Whether an HTTP request failed only because no connection could be made.
fn refused_connection(error: &anyhow::Error) -> bool {
    error.downcast_ref::<hyper_util::client::legacy::Error>().is_some_and(|e| e.is_connect())
}

/// Waits for the health `Watch` stream to report `status`.
async fn watch_health_until(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    status: ServingStatus,
) -> Result<()> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message()).await??.context("watch ended")?;
        if message.status == status as i32 {
            return Ok(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_turns_unready_drains_streams_and_exits_within_the_bound() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "1s"), ("KEEL__SHUTDOWN__TIMEOUT", "3s")])?;
    let grpc = channel(&keel).await?;
    UserServiceClient::new(grpc.clone()).create_user(CreateUserRequest { user: Some(user("load")) }).await?;

    let mut health =
        HealthClient::new(grpc.clone()).watch(HealthCheckRequest { service: String::new() }).await?.into_inner();
    watch_health_until(&mut health, ServingStatus::Serving).await?;

    let mut watchers = Vec::new();
    for _ in 0..5 {
        let mut stream = UserServiceClient::new(grpc.clone()).watch_users(WatchUsersRequest {}).await?.into_inner();
        watchers.push(tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(anyhow::anyhow!("watch ended without a status")),
                    Err(status) => return Ok(status),
                }
            }
        }));
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = unary_load(grpc.clone(), stop_load.clone());
    let admin = HttpClient::new(keel.admin);
    let gateway = HttpClient::new(keel.http);

    let signalled = Instant::now();
    keel.signal("TERM")?;
    watch_health_until(&mut health, ServingStatus::NotServing).await?;
    let flip = signalled.elapsed();
    assert!(flip < Duration::from_millis(250), "NOT_SERVING took {flip:?}");

    // Still in the drain delay: unready, alive, and serving.
    assert_eq!(admin.get("/readyz").await?.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(admin.get("/livez").await?.status, StatusCode::OK);
    assert_eq!(gateway.get("/healthz").await?.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(gateway.get("/v1/users/load").await?.status, StatusCode::OK, "the gateway serves through the delay");
    ensure!(
        signalled.elapsed() < Duration::from_secs(1),
        "the checks outlasted the drain delay; the test proves nothing"
    );

    let status =
        tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(10)).map(|s| (s, keel))).await??;
    let (exit, _keel) = status;
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0));
    assert!(took >= Duration::from_secs(1), "exited before the drain delay: {took:?}");
    assert!(took < Duration::from_millis(5000), "exceeded drain_delay + timeout + 1s: {took:?}");
    // Every stream obeyed, so the drain did not need its 3s bound.
    assert!(took < Duration::from_secs(3), "the drain waited for the timeout: {took:?}");
    let health_end = health.message().await.err().context("the health watch did not end with a status")?;
    assert_eq!(health_end.code(), Code::Unavailable, "{health_end:?}");

    for watcher in watchers {
        let status = watcher.await??;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "server shutting down");
    }
    stop_load.store(true, Ordering::Relaxed);
    let results = load.await?;
    let during_delay = results
        .iter()
        .filter(|(at, code)| {
            *code == Code::Ok && *at > signalled + flip && *at < signalled + Duration::from_millis(900)
        })
        .count();
    assert!(during_delay > 0, "no unary call succeeded during the drain delay");
    let unexpected: Vec<_> = results.iter().filter(|(_, c)| !matches!(c, Code::Ok | Code::Unavailable)).collect();
    assert!(unexpected.is_empty(), "codes other than OK/UNAVAILABLE: {unexpected:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_streams_end_with_an_error_line_and_rest_calls_in_flight_complete() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "200ms"), ("KEEL__SHUTDOWN__TIMEOUT", "5s")])?;
    let grpc = channel(&keel).await?;
    let total = 2000;
    create_users(&grpc, "g", total).await?;
    let gateway = HttpClient::new(keel.http);

    let mut watch = gateway.open(Method::GET, "/v1/users:watch", &[]).await?;
    assert_eq!(watch.status, StatusCode::OK);
    // A long listing, begun before the signal and read only after it.
    let mut listing = gateway.open(Method::GET, "/v1/users", &[]).await?;
    let first = listing.line().await?.context("no first line")?;
    assert!(first.starts_with("{\"result\""), "{first}");

    keel.signal("TERM")?;
    let last = watch.line().await?.context("the watch ended without an error line")?;
    let last: serde_json::Value = serde_json::from_str(&last)?;
    assert_eq!(last["error"]["code"], 14, "{last}");
    assert_eq!(last["error"]["message"], "server shutting down");
    assert_eq!(watch.line().await?, None);

    let rest = listing.lines().await?;
    assert_eq!(rest.len() + 1, total, "the in-flight listing was cut short");
    for line in &rest {
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("garbled line {line:?}"))?;
        ensure!(value.get("result").is_some(), "unexpected line {line}");
    }
    let exit = tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(10))).await??;
    assert_eq!(exit.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_will_not_finish_is_cut_off_at_the_timeout() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "0s"), ("KEEL__SHUTDOWN__TIMEOUT", "1s")])?;
    let grpc = channel(&keel).await?;
    create_users(&grpc, "s", 1500).await?;
    // A client that stops reading: its listing can never finish.
    let stuck = Endpoint::from_shared(format!("http://{}", keel.grpc))?
        .initial_stream_window_size(Some(4096))
        .initial_connection_window_size(Some(4096))
        .connect()
        .await?;
    let _listing = UserServiceClient::new(stuck).list_users(ListUsersRequest {}).await?.into_inner();

    let signalled = Instant::now();
    keel.signal("TERM")?;
    let exit = tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(10))).await??;
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0));
    assert!(took >= Duration::from_secs(1), "the stuck stream was not waited for: {took:?}");
    assert!(took < Duration::from_secs(2), "exceeded timeout + 1s: {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_exits_at_once_and_sigquit_does_not_drain() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "10s")])?;
    let admin = HttpClient::new(keel.admin);
    keel.signal("TERM")?;
    support::eventually(Duration::from_secs(5), || async {
        admin.get("/readyz").await.is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await?;
    let second = Instant::now();
    keel.signal("INT")?;
    let exit = tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(5)).map(|s| (s, keel))).await??;
    assert!(second.elapsed() < Duration::from_secs(1), "took {:?}", second.elapsed());
    assert_eq!(exit.0.code(), Some(130));
    assert!(exit.1.logs().iter().any(|l| l.contains("second signal")), "the forced exit is logged");

    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "10s")])?;
    let quit = Instant::now();
    keel.signal("QUIT")?;
    let exit = tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(5))).await??;
    assert!(quit.elapsed() < Duration::from_secs(1));
    assert_eq!(exit.code(), Some(131));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_process_without_a_drain_delay_stops_in_milliseconds() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "0s")])?;
    let signalled = Instant::now();
    keel.signal("TERM")?;
    let exit =
        tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(10)).map(|s| (s, keel))).await??;
    let took = signalled.elapsed();
    assert_eq!(exit.0.code(), Some(0));
    assert!(took < Duration::from_millis(500), "idle shutdown took {took:?}");
    let steps = exit.1.logs().iter().filter(|l| l.contains("\"shutdown ")).count();
    assert!(steps >= 3, "each shutdown step is logged ({steps})");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_start_load_stop_cycles_lose_nothing() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cycles: usize = std::env::var("KEEL_SHUTDOWN_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    for cycle in 0..cycles {
        let mut keel =
            KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "150ms"), ("KEEL__SHUTDOWN__TIMEOUT", "3s")])?;
        let grpc = channel(&keel).await?;
        UserServiceClient::new(grpc.clone()).create_user(CreateUserRequest { user: Some(user("load")) }).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let grpc_load: Vec<_> = (0..2).map(|_| unary_load(grpc.clone(), stop.clone())).collect();
        let gateway = HttpClient::new(keel.http);
        let rest_load = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    outcomes.push(gateway.get("/v1/users/load").await.map(|r| (r.status, r.body)));
                }
                outcomes
            })
        };
        // Let the load get going on every connection before the signal.
        support::eventually(Duration::from_secs(5), || async {
            HttpClient::new(keel.http).get("/v1/users/load").await.is_ok()
        })
        .await?;
        keel.signal("TERM")?;
        let exit = tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(10))).await??;
        stop.store(true, Ordering::Relaxed);
        assert_eq!(exit.code(), Some(0), "cycle {cycle}");

        let mut ok = 0;
        for load in grpc_load {
            for (_, code) in load.await? {
                match code {
                    Code::Ok => ok += 1,
                    Code::Unavailable => {}
                    other => bail!("cycle {cycle}: gRPC call ended {other:?}"),
                }
            }
        }
        ensure!(ok > 0, "cycle {cycle}: no gRPC call succeeded");
        let mut rest_ok = 0;
        for outcome in rest_load.await? {
            // A request the closed listener never accepted fails to connect;
            // any other failure is a lost request. Every response that did
            // come must be whole.
            let (status, body) = match outcome {
                Ok(response) => response,
                Err(error) if refused_connection(&error) => continue,
                Err(error) => bail!("cycle {cycle}: REST call failed: {error:#}"),
            };
            match status {
                StatusCode::OK => {
                    let value: serde_json::Value =
                        serde_json::from_slice(&body).with_context(|| format!("cycle {cycle}: garbled body"))?;
                    ensure!(value["user_id"] == "load", "cycle {cycle}: wrong body {value}");
                    rest_ok += 1;
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    let value: serde_json::Value = serde_json::from_slice(&body)?;
                    ensure!(value["code"] == 14, "cycle {cycle}: {value}");
                }
                other => bail!("cycle {cycle}: REST call answered {other}"),
            }
        }
        ensure!(rest_ok > 0, "cycle {cycle}: no REST call succeeded");
    }
    Ok(())
}

/// The access log is written off the request path; a clean exit still
/// writes out every line of every call that completed.
#[tokio::test]
async fn every_completed_call_is_in_the_access_log_after_sigterm() -> Result<()> {
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "0s"), ("KEEL__SHUTDOWN__TIMEOUT", "2s")])?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", keel.grpc))?.connect().await?;
    let mut users = UserServiceClient::new(channel);
    let calls = 300;
    for n in 0..calls {
        let mut request = tonic::Request::new(GetUserRequest { user_id: format!("missing-{n}") });
        request.metadata_mut().insert("x-request-id", format!("access-{n}").parse()?);
        let status = users.get_user(request).await.err().map(|s| s.code());
        assert_eq!(status, Some(tonic::Code::NotFound));
    }
    keel.signal("TERM")?;
    let status = keel.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0));
    let logs = keel.all_logs()?;
    let logged = logs
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "rpc finished" && line["grpc.code"] == "NotFound")
        .filter_map(|line| line["request_id"].as_str().map(str::to_owned))
        .filter(|id| id.starts_with("access-"))
        .collect::<std::collections::HashSet<_>>();
    assert_eq!(logged.len(), calls, "access lines missing after exit");
    Ok(())
}

/// GOAWAY no longer waits for the gateway: with a gateway stream that is
/// still draining (a long listing its client does not read), an existing
/// gRPC connection stops taking new calls as soon as draining begins,
/// while the process is still running because of that stream.
#[tokio::test]
async fn goaway_does_not_wait_for_a_draining_gateway_stream() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut keel = KeelProcess::start(&[("KEEL__SHUTDOWN__DRAIN_DELAY", "0s"), ("KEEL__SHUTDOWN__TIMEOUT", "10s")])?;
    let grpc = channel(&keel).await?;
    create_users(&grpc, "w", 3000).await?;
    let gateway = HttpClient::new(keel.http);
    let mut listing = gateway.open(Method::GET, "/v1/users", &[]).await?;
    listing.line().await?.context("no first line")?;
    let mut users = UserServiceClient::new(grpc.clone());
    users.get_user(GetUserRequest { user_id: "w00000".into() }).await?;

    keel.signal("TERM")?;
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match users.get_user(GetUserRequest { user_id: "w00000".into() }).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(status) => return status,
            }
        }
    })
    .await
    .context("the existing gRPC connection kept taking new calls")?;
    // Refused by the GOAWAY (Unavailable), or, for a call the client sent
    // as the server closed the idle connection after it, cancelled with
    // "connection closed": either way the call never ran.
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
        "{refused:?}"
    );
    assert!(keel.is_running(), "the unread gateway listing should still hold the drain");
    drop(listing);
    let exit = tokio::task::spawn_blocking(move || keel.wait_exit(Duration::from_secs(15))).await??;
    assert_eq!(exit.code(), Some(0));
    Ok(())
}
