//! Fault injection against a real PostgreSQL of the test's own (started
//! with scripts/postgres.sh in a private directory, so stopping it touches
//! no other test): the database stops mid-load and comes back.
//! Needs `KEEL_TEST_DATABASE_URL` like tests/postgres.rs (only as the sign
//! that PostgreSQL tests should run; its server is not used).

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::StatusCode;
use keel::config::DatabaseSettings;
use keel::proto::user::v1::{CreateUserRequest, GetUserRequest, User, WatchUsersRequest};
use support::eventually;
use support::postgres::server_url;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// A private cluster, deleted on drop.
struct Cluster {
    dir: String,
    url: String,
}

impl Cluster {
    fn start() -> Result<Self> {
        let dir = format!("/tmp/keel-pg-outage-{}", uuid::Uuid::new_v4().simple());
        let out = script(&dir, "start")?;
        let url = out
            .lines()
            .find_map(|l| l.strip_prefix("export KEEL_TEST_DATABASE_URL="))
            .context("postgres.sh printed no URL")?
            .to_owned();
        Ok(Self { dir, url })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = script(&self.dir, "stop");
    }
}

fn script(dir: &str, action: &str) -> Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
    let out = Command::new("bash").arg(path).arg(action).env("KEEL_PG_DIR", dir).output()?;
    if !out.status.success() {
        bail!("postgres.sh {action} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn user(id: &str) -> User {
    User { user_id: id.to_owned(), display_name: id.to_owned(), email: format!("{id}@example.com"), ..User::default() }
}

#[tokio::test]
async fn a_database_outage_is_unavailable_and_unready_then_recovers() -> Result<()> {
    let Some(_) = server_url("a_database_outage_is_unavailable_and_unready_then_recovers") else { return Ok(()) };
    let cluster = tokio::task::spawn_blocking(Cluster::start).await??;
    let url = cluster.url.clone();
    let app = support::spawn_app_with(move |settings| {
        settings.database = DatabaseSettings {
            url,
            migrate_on_start: true,
            acquire_timeout: Duration::from_secs(1),
            ..DatabaseSettings::default()
        };
    })
    .await?;
    app.wait_until_serving("user.v1.UserService").await?;
    let users = app.users()?;
    let health = app.health()?;
    let admin = app.admin();

    // A watch, once the feed listens.
    let mut watch = None;
    for _ in 0..100 {
        let mut stream = users.clone().watch_users(WatchUsersRequest {}).await?.into_inner();
        if tokio::time::timeout(Duration::from_millis(100), stream.next()).await.is_err() {
            watch = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut watch = watch.context("the watch never started")?;

    // Load: creates in a loop; every acknowledged id must survive.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let codes = Arc::new(Mutex::new(Vec::<Code>::new()));
    let stop_load = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn({
        let (mut users, acknowledged, codes, stop) =
            (users.clone(), acknowledged.clone(), codes.clone(), stop_load.clone());
        async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let id = format!("load-{n}");
                let call = users.create_user(CreateUserRequest { user: Some(user(&id)) });
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(_)) => acknowledged.lock().unwrap().push(id),
                    Ok(Err(status)) => codes.lock().unwrap().push(status.code()),
                    Err(_) => panic!("a create hung for 10s"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    // Some creates land before the outage, so it interrupts a running load.
    let acked = |at_least: usize| {
        let acknowledged = acknowledged.clone();
        move || {
            let acknowledged = acknowledged.clone();
            async move { acknowledged.lock().unwrap().len() >= at_least }
        }
    };
    eventually(Duration::from_secs(10), acked(5)).await.context("no create succeeded before the outage")?;

    // The outage.
    tokio::task::spawn_blocking({
        let dir = cluster.dir.clone();
        move || script(&dir, "pause")
    })
    .await??;
    let started = tokio::time::Instant::now();
    // The load's events, then the end.
    let ending = async {
        loop {
            match watch.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), ending).await.context("the watch did not end")?;
    match ended {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("missed"), "{}", status.message());
        }
        other => bail!("the watch should end with UNAVAILABLE, got {other:?}"),
    }
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        users.clone().get_user(GetUserRequest { user_id: "load-1".into() }),
    )
    .await
    .context("a get hung during the outage")?;
    assert_eq!(outcome.map(drop).unwrap_err().code(), Code::Unavailable);
    eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move { admin.get("/readyz").await.is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE) }
    })
    .await
    .context("readiness never turned 503")?;
    let verbose = admin.get("/readyz?verbose").await?.text();
    assert!(verbose.contains("[-]database"), "{verbose}");
    assert_eq!(admin.get("/livez").await?.status, StatusCode::OK, "liveness stays up");
    for service in ["user.v1.UserService", ""] {
        eventually(Duration::from_secs(10), || {
            let mut health = health.clone();
            async move {
                let r = health.check(HealthCheckRequest { service: service.into() }).await;
                r.is_ok_and(|r| r.get_ref().status == ServingStatus::NotServing as i32)
            }
        })
        .await
        .with_context(|| format!("gRPC health of {service:?} never turned NOT_SERVING"))?;
    }
    let outage_detected = started.elapsed();

    // The recovery, with no keel restart.
    tokio::task::spawn_blocking({
        let dir = cluster.dir.clone();
        move || script(&dir, "resume")
    })
    .await??;
    eventually(Duration::from_secs(15), || {
        let admin = admin.clone();
        async move { admin.get("/readyz").await.is_ok_and(|r| r.status == StatusCode::OK) }
    })
    .await
    .context("readiness never recovered")?;
    eventually(Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let r = health.check(HealthCheckRequest { service: "user.v1.UserService".into() }).await;
            r.is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32)
        }
    })
    .await
    .context("gRPC health never recovered")?;
    // The load runs on until creates succeed again after the outage.
    let before = acknowledged.lock().unwrap().len();
    eventually(Duration::from_secs(10), acked(before + 5)).await.context("creates never succeeded again")?;
    stop_load.cancel();
    load.await?;

    let acknowledged = acknowledged.lock().unwrap().clone();
    let codes = codes.lock().unwrap().clone();
    assert!(!acknowledged.is_empty());
    assert!(codes.iter().all(|c| *c == Code::Unavailable), "only UNAVAILABLE during the outage: {codes:?}");
    let mut users = users.clone();
    for id in &acknowledged {
        users.get_user(GetUserRequest { user_id: id.clone() }).await.with_context(|| format!("{id} was lost"))?;
    }
    eprintln!(
        "outage: detected in {outage_detected:?}; {} creates acknowledged, {} failed with UNAVAILABLE",
        acknowledged.len(),
        codes.len()
    );
    let stopping = tokio::time::Instant::now();
    app.stop().await?;
    assert!(stopping.elapsed() < Duration::from_secs(6), "shutdown took {:?}", stopping.elapsed());
    drop(cluster);
    Ok(())
}
