//! The PostgreSQL store against a real server (`KEEL_TEST_DATABASE_URL`;
//! see tests/support/postgres.rs), each test in its own database:
//! one conformance suite run against both stores, and two keel processes
//! sharing one database (data, unique ids, watches across replicas).

mod support;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Method, StatusCode};
use keel::config::DatabaseSettings;
use keel::database::Database;
use keel::metrics::Metrics;
use keel::proto::user::v1::user_event::Kind;
use keel::proto::user::v1::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest, User, UserEvent,
    WatchUsersRequest,
};
use keel::users::postgres::PgStore;
use keel::users::store::{MemoryStore, Store, StoreError};
use support::postgres::{fresh_database, server_url};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tonic::Code;

fn user(id: &str) -> User {
    User {
        user_id: id.to_owned(),
        display_name: format!("name of {id}"),
        email: format!("{id}@example.com"),
        roles: vec!["reader".to_owned()],
        create_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_456_000 }),
        update_time: Some(prost_types::Timestamp { seconds: 1_700_000_001, nanos: 0 }),
    }
}

async fn next_event(events: &mut broadcast::Receiver<UserEvent>) -> Result<UserEvent> {
    Ok(tokio::time::timeout(Duration::from_secs(5), events.recv()).await.context("no event within 5s")??)
}

/// The behaviour every store must have.
async fn conformance<S: Store>(store: &S) -> Result<()> {
    let mut events = store.subscribe();

    // CRUD and the error mapping.
    let ada = store.create(user("ada")).await?;
    assert_eq!(ada, user("ada"));
    assert_eq!(store.get("ada").await?, ada);
    assert!(matches!(store.create(user("ada")).await, Err(StoreError::AlreadyExists(id)) if id == "ada"));
    assert!(matches!(store.get("nobody").await, Err(StoreError::NotFound(_))));
    let updated = store
        .update("ada", |old| {
            let mut new = old.clone();
            new.display_name = "Ada L.".to_owned();
            Ok(new)
        })
        .await?;
    assert_eq!(updated.display_name, "Ada L.");
    assert_eq!(store.get("ada").await?, updated);
    assert!(matches!(store.update("nobody", |u| Ok(u.clone())).await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.delete("nobody").await, Err(StoreError::NotFound(_))));
    assert_eq!(store.delete("ada").await?, updated);
    assert!(matches!(store.get("ada").await, Err(StoreError::NotFound(_))));

    // The watch sees every change, in order.
    for (kind, name) in [(Kind::Created, "name of ada"), (Kind::Updated, "Ada L."), (Kind::Deleted, "Ada L.")] {
        let event = next_event(&mut events).await?;
        assert_eq!(event.kind, kind as i32);
        assert_eq!(event.user.map(|u| u.display_name).as_deref(), Some(name));
    }

    // Byte order of ids (as the memory store's BTreeMap), across pages.
    let ids = ["b", "B", "a", "_x", "Z", "é", "a0", "A", "~"];
    for id in ids {
        store.create(user(id)).await?;
    }
    let mut expected: Vec<&str> = ids.to_vec();
    expected.sort_unstable();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_after(after.as_deref(), 2).await?;
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|u| u.user_id.clone());
        listed.extend(page.into_iter().map(|u| u.user_id));
    }
    assert_eq!(listed, expected);
    for id in &expected {
        let event = next_event(&mut events).await?;
        assert_eq!(event.kind, Kind::Created as i32);
        assert!(ids.contains(&event.user.map(|u| u.user_id).unwrap_or_default().as_str()), "{id}");
    }
    Ok(())
}

#[tokio::test]
async fn memory_store_conforms() -> Result<()> {
    conformance(&MemoryStore::new(64)).await
}

fn database_settings(url: String) -> DatabaseSettings {
    DatabaseSettings { url, migrate_on_start: true, ..DatabaseSettings::default() }
}

async fn pg_store(url: String) -> Result<(PgStore, Database)> {
    let settings = database_settings(url);
    let database = Database::connect(&settings, &Metrics::new()?).await?.context("no database")?;
    let store = PgStore::start(&database, &settings, 64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.feed_connected() {
        if tokio::time::Instant::now() > deadline {
            bail!("the change feed never connected");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((store, database))
}

#[tokio::test]
async fn postgres_store_conforms() -> Result<()> {
    let Some(server) = server_url("postgres_store_conforms") else { return Ok(()) };
    let (store, database) = pg_store(fresh_database(&server).await?).await?;
    conformance(&store).await?;
    // Readiness follows the pool.
    store.ready().await?;
    database.close().await;
    assert!(matches!(store.get("a").await, Err(StoreError::Unavailable(_))), "a closed pool is UNAVAILABLE");
    Ok(())
}

#[tokio::test]
async fn migrations_are_idempotent() -> Result<()> {
    let Some(server) = server_url("migrations_are_idempotent") else { return Ok(()) };
    let settings = database_settings(fresh_database(&server).await?);
    keel::database::migrate_url(&settings).await?;
    keel::database::migrate_url(&settings).await?;
    Ok(())
}

#[tokio::test]
async fn a_statement_past_the_bound_is_deadline_exceeded() -> Result<()> {
    let Some(server) = server_url("a_statement_past_the_bound_is_deadline_exceeded") else { return Ok(()) };
    let mut settings = database_settings(fresh_database(&server).await?);
    settings.statement_timeout = Duration::from_millis(50);
    let database = Database::connect(&settings, &Metrics::new()?).await?.context("no database")?;
    let store = PgStore::start(&database, &settings, 64);
    // Hold the row lock from another connection: the update waits on it
    // until the statement timeout cancels it.
    let mut blocker = database.pool().begin().await?;
    store.create(user("held")).await?;
    sqlx::query("SELECT 1 FROM users WHERE user_id = 'held' FOR UPDATE").execute(&mut *blocker).await?;
    let outcome = store.update("held", |u| Ok(u.clone())).await;
    assert!(matches!(outcome, Err(StoreError::DeadlineExceeded)), "{outcome:?}");
    blocker.rollback().await?;
    database.close().await;
    Ok(())
}

/// Two keel processes on one database, as two replicas behind a Service.
#[tokio::test]
async fn two_replicas_share_data_ids_and_watches() -> Result<()> {
    let Some(server) = server_url("two_replicas_share_data_ids_and_watches") else { return Ok(()) };
    let url = fresh_database(&server).await?;
    let configure = |url: String| {
        move |settings: &mut keel::config::Settings| {
            settings.database = database_settings(url);
        }
    };
    let a = support::spawn_app_with(configure(url.clone())).await?;
    let b = support::spawn_app_with(configure(url)).await?;
    a.wait_until_serving("user.v1.UserService").await?;
    b.wait_until_serving("user.v1.UserService").await?;

    let mut b_users = b.users()?;
    // B's watch, opened once its feed listens (it is UNAVAILABLE before).
    let mut watch = None;
    for _ in 0..100 {
        let mut stream = b_users.watch_users(WatchUsersRequest {}).await?.into_inner();
        match tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
            Err(_) => {
                watch = Some(stream);
                break;
            }
            Ok(Some(Err(status))) if status.code() == Code::Unavailable => {}
            Ok(other) => bail!("unexpected first watch item: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut watch = watch.context("B's watch never started")?;

    // Create through A's gateway, read through B's gRPC.
    let created = a
        .http()
        .send(
            Method::POST,
            "/v1/users",
            &[("content-type", "application/json")],
            Some(r#"{"user_id": "alan", "display_name": "Alan", "email": "alan@example.com"}"#),
        )
        .await?;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());
    let read = b_users.get_user(GetUserRequest { user_id: "alan".into() }).await?.into_inner();
    assert_eq!(read.display_name, "Alan");

    // Unique ids hold across both.
    let again = b_users.create_user(CreateUserRequest { user: Some(user("alan")) }).await;
    assert_eq!(again.map(|_| ()).unwrap_err().code(), Code::AlreadyExists);

    // Update and delete through A; B's watch sees all three, in order.
    let mut a_users = a.users()?;
    let mut patch = read.clone();
    patch.display_name = "Alan T.".into();
    a_users
        .update_user(UpdateUserRequest {
            user: Some(patch),
            update_mask: Some(prost_types::FieldMask { paths: vec!["display_name".into()] }),
        })
        .await?;
    a_users.delete_user(DeleteUserRequest { user_id: "alan".into() }).await?;
    for (kind, name) in [(Kind::Created, "Alan"), (Kind::Updated, "Alan T."), (Kind::Deleted, "Alan T.")] {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .context("B saw no event within 5s")?
            .context("B's watch ended")??;
        assert_eq!(event.kind, kind as i32);
        assert_eq!(event.user.map(|u| u.display_name).as_deref(), Some(name));
    }

    // ListUsers on B sees A's writes, in id order.
    for id in ["c", "a", "b"] {
        a_users.create_user(CreateUserRequest { user: Some(user(id)) }).await?;
    }
    let listed: Vec<String> = b_users
        .list_users(ListUsersRequest {})
        .await?
        .into_inner()
        .map(|u| u.map(|u| u.user_id))
        .collect::<Result<_, _>>()
        .await?;
    assert_eq!(listed, ["a", "b", "c"]);

    // Readiness includes the database check; the pool is measured.
    let ready = a.admin().get("/readyz?verbose").await?;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert!(ready.text().contains("database"), "{}", ready.text());
    let scrape = a.admin().get("/metrics").await?.text();
    for metric in [
        "keel_db_pool_connections{state=\"idle\"}",
        "keel_db_pool_max_connections 10",
        "keel_db_pool_acquire_seconds_count",
    ] {
        assert!(scrape.contains(metric), "{metric} missing");
    }
    drop(watch);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}
