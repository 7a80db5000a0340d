//! A real PostgreSQL for tests: the URL of a server from
//! `KEEL_TEST_DATABASE_URL` (`scripts/postgres.sh start` prints it), and a
//! fresh database per test on it, so tests run in parallel.
//!
//! Without the variable, a local `cargo test` skips these tests and says
//! why; with `CI=true` a missing URL is a failure, so CI can never pass by
//! skipping them.

use anyhow::{Context, Result};
use sqlx::Connection;

/// The variable holding the test server's URL (any database on it).
pub const URL_VAR: &str = "KEEL_TEST_DATABASE_URL";

/// The server's URL, or `None` (after printing why) when the test should
/// skip. Panics under `CI=true` without one.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "{test}: CI=true but {URL_VAR} is not set: run `eval \"$(scripts/postgres.sh start)\"` first");
            // Past the test harness's capture, so the skip is always seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED {test}: {URL_VAR} is not set (`eval \"$(scripts/postgres.sh start)\"` starts a throwaway PostgreSQL)"
            );
            None
        }
    }
}

/// Creates an empty database on the server and returns its URL.
pub async fn fresh_database(server: &str) -> Result<String> {
    let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(server).await.context("cannot connect to the test server")?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
    admin.close().await?;
    Ok(with_database(server, &name))
}

/// `server` with its database (the URL path) replaced by `name`.
pub fn with_database(server: &str, name: &str) -> String {
    let (head, query) = match server.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (server, None),
    };
    let authority_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[authority_end..].find('/') {
        Some(slash) => &head[..authority_end + slash],
        None => head,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}
