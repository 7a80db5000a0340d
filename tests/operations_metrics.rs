//! The series the dashboard and the alerts are drawn from, beyond the gRPC
//! and HTTP families: calls in flight against `max_concurrent_requests`,
//! shed calls, readiness as a gauge; and `/log/level` when keel did not
//! install the subscriber (this test binary installs none).

mod support;

use anyhow::{Context, Result};
use http::{Method, StatusCode};
use keel::proto::user::v1::{GetUserRequest, WatchUsersRequest};
use support::{READY_BOUND, eventually, sample, spawn_app, spawn_app_with};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn in_flight_calls_the_limit_and_shed_calls_are_exported() -> Result<()> {
    let app = spawn_app_with(|s| s.grpc.max_concurrent_requests = 2).await?;
    let scrape = app.scrape().await?;
    assert_eq!(sample(&scrape, "keel_grpc_max_concurrent_requests", &[]), Some(2.0));
    assert_eq!(sample(&scrape, "keel_grpc_requests_in_flight", &[]), Some(0.0));
    assert_eq!(sample(&scrape, "keel_grpc_requests_shed_total", &[]), Some(0.0));

    // Two watches hold both slots.
    let mut users = app.users()?;
    let mut watches = Vec::new();
    for _ in 0..2 {
        watches.push(users.watch_users(WatchUsersRequest {}).await?.into_inner());
    }
    eventually(READY_BOUND, || async {
        app.scrape().await.ok().and_then(|s| sample(&s, "keel_grpc_requests_in_flight", &[])) == Some(2.0)
    })
    .await
    .context("in flight never reached 2")?;

    let refused = users.get_user(GetUserRequest { user_id: "x".into() }).await.err().map(|s| s.code());
    assert_eq!(refused, Some(Code::ResourceExhausted));
    let refused = users.get_user(GetUserRequest { user_id: "x".into() }).await.err().map(|s| s.code());
    assert_eq!(refused, Some(Code::ResourceExhausted));
    // Health checks are exempt: neither shed nor counted in flight.
    app.health()?.check(HealthCheckRequest { service: String::new() }).await?;
    let scrape = app.scrape().await?;
    assert_eq!(sample(&scrape, "keel_grpc_requests_shed_total", &[]), Some(2.0));
    assert_eq!(sample(&scrape, "keel_grpc_requests_in_flight", &[]), Some(2.0));

    drop(watches);
    eventually(READY_BOUND, || async {
        app.scrape().await.ok().and_then(|s| sample(&s, "keel_grpc_requests_in_flight", &[])) == Some(0.0)
    })
    .await
    .context("the slots were not returned")?;
    app.stop().await
}

#[tokio::test]
async fn keel_ready_follows_readiness() -> Result<()> {
    let app = spawn_app().await?;
    // The store's readiness check has passed once within a second of start.
    eventually(READY_BOUND, || async { ready(&app).await == Some(1.0) }).await.context("never ready")?;
    app.health_state.set_not_serving().await;
    assert_eq!(ready(&app).await, Some(0.0));
    assert_eq!(app.admin().get("/readyz").await?.status, StatusCode::SERVICE_UNAVAILABLE);
    app.health_state.set_serving().await;
    assert_eq!(ready(&app).await, Some(1.0));
    app.stop().await
}

async fn ready(app: &support::TestApp) -> Option<f64> {
    app.scrape().await.ok().and_then(|s| sample(&s, "keel_ready", &[]))
}

#[tokio::test]
async fn log_level_without_keels_subscriber_is_a_clear_501() -> Result<()> {
    let app = spawn_app().await?;
    for response in [
        app.admin().get("/log/level").await?,
        app.admin().send(Method::PUT, "/log/level", &[("content-type", "text/plain")], Some("debug")).await?,
    ] {
        assert_eq!(response.status, StatusCode::NOT_IMPLEMENTED, "{}", response.text());
        let status = response.json()?;
        assert_eq!(status["code"], 12, "{status}");
        assert!(status["message"].as_str().is_some_and(|m| m.contains("no reloadable subscriber")), "{status}");
    }
    app.stop().await
}
