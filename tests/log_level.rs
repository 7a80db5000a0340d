//! The log level at runtime, against the built binary (SIGHUP needs a real
//! process): `GET`/`PUT /log/level` on the admin port change what is logged
//! without a restart, a bad directive is a 400 that changes nothing, the
//! change is logged and exported, and SIGHUP puts the configured level
//! (from the config files, reread) back.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http::{Method, StatusCode};
use support::http::HttpClient;
use support::process::KeelProcess;

/// The debug line every accepted HTTP connection writes.
const DEBUG_LINE: &str = "connection accepted";

fn message(line: &str) -> Option<(String, String)> {
    let record: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((record["level"].as_str()?.to_owned(), record["message"].as_str()?.to_owned()))
}

/// Waits (bounded) until a log line after index `from` satisfies `want`;
/// returns its index.
fn wait_for_line(keel: &KeelProcess, from: usize, want: impl Fn(&str) -> bool) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = keel.logs().iter().enumerate().skip(from).find(|(_, l)| want(l)).map(|(i, _)| i) {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("no such log line after line {from}; logs:\n{}", keel.logs().join(""));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_change(line: &str, source: &str) -> bool {
    message(line).is_some_and(|(_, m)| m == "log level changed") && line.contains(&format!("\"source\":\"{source}\""))
}

/// The access line of a call (the REST GET of a missing user: NotFound, INFO).
fn is_access(line: &str) -> bool {
    message(line).is_some_and(|(level, m)| level == "INFO" && m == "rpc finished")
}

fn debug_lines(lines: &[String]) -> usize {
    lines.iter().filter(|l| message(l).is_some_and(|(level, m)| level == "DEBUG" && m == DEBUG_LINE)).count()
}

/// One request on a connection of its own, so the server accepts (and may
/// log) a new connection each time.
async fn fresh_get(addr: std::net::SocketAddr, path: &str) -> Result<support::http::HttpResponse> {
    HttpClient::new(addr).get(path).await
}

async fn put_level(keel: &KeelProcess, body: &str) -> Result<support::http::HttpResponse> {
    HttpClient::new(keel.admin).send(Method::PUT, "/log/level", &[("content-type", "text/plain")], Some(body)).await
}

async fn current_level(keel: &KeelProcess) -> Result<String> {
    let response = fresh_get(keel.admin, "/log/level").await?;
    anyhow::ensure!(response.status == StatusCode::OK, "GET /log/level: {}", response.status);
    Ok(response.json()?["level"].as_str().context("no level")?.to_owned())
}

#[tokio::test]
async fn put_changes_what_is_logged_a_bad_filter_is_refused_and_sighup_restores_the_config() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("keel-log-level-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("default.yaml");
    std::fs::write(&config, "log:\n  level: info\n")?;
    let config_dir = dir.to_string_lossy().into_owned();
    let mut keel = KeelProcess::start(&[("KEEL_CONFIG_DIR", &config_dir), ("KEEL__SHUTDOWN__DRAIN_DELAY", "0s")])?;

    assert_eq!(current_level(&keel).await?, "info");
    // Connections before the change write no debug line.
    fresh_get(keel.http, "/v1/users/nobody").await?;
    fresh_get(keel.admin, "/livez").await?;

    let changed = put_level(&keel, "info,keel::http_server=debug").await?;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.text());
    let body = changed.json()?;
    assert_eq!(body["level"], "info,keel::http_server=debug");
    assert_eq!(body["previous"], "info");
    let change_line = wait_for_line(&keel, 0, |l| is_change(l, "api"))?;
    let before = keel.logs()[..change_line].to_vec();
    assert_eq!(debug_lines(&before), 0, "debug lines before the change:\n{}", before.join(""));

    // A new connection after the change is logged at DEBUG.
    fresh_get(keel.http, "/v1/users/nobody").await?;
    wait_for_line(&keel, change_line, |l| message(l).is_some_and(|(level, m)| level == "DEBUG" && m == DEBUG_LINE))?;
    assert_eq!(current_level(&keel).await?, "info,keel::http_server=debug");

    // The filter in force and the number of changes are exported.
    let metrics = fresh_get(keel.admin, "/metrics").await?.text();
    assert!(metrics.contains("keel_log_level_info{filter=\"info,keel::http_server=debug\"} 1"), "{metrics}");
    assert!(metrics.contains("keel_log_level_changes_total 1"), "{metrics}");

    // A bad directive: 400 naming it, google.rpc.Status body, nothing changes.
    for bad in ["keel=loud", "", "info,[unclosed"] {
        let refused = put_level(&keel, bad).await?;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{bad:?}: {}", refused.text());
        let status = refused.json()?;
        assert_eq!(status["code"], 3, "{status}");
        let text = status["message"].as_str().unwrap_or_default();
        assert!(text.contains("log filter"), "{bad:?}: {text}");
        if !bad.is_empty() {
            assert!(text.contains(bad), "the message names the directive: {text}");
        }
        assert_eq!(current_level(&keel).await?, "info,keel::http_server=debug", "after {bad:?}");
    }
    // An access line at info first, so the access log has asked the filter.
    let before_call = keel.logs().len();
    fresh_get(keel.http, "/v1/users/nobody").await?;
    wait_for_line(&keel, before_call, is_access)?;
    let json = HttpClient::new(keel.admin)
        .send(Method::PUT, "/log/level", &[], Some(r#"{"level":"warn,keel::http_server=debug"}"#))
        .await?;
    assert_eq!(json.status, StatusCode::OK, "{}", json.text());
    assert_eq!(current_level(&keel).await?, "warn,keel::http_server=debug");
    // At warn, the access line of an ordinary call is gone at once.
    let at_warn = keel.logs().len();
    fresh_get(keel.http, "/v1/users/nobody").await?;

    // SIGHUP rereads the config files: back to their `info`.
    let seen = keel.logs().len();
    keel.signal("HUP")?;
    let restored = wait_for_line(&keel, seen, |l| is_change(l, "sighup"))?;
    assert_eq!(current_level(&keel).await?, "info");
    fresh_get(keel.http, "/v1/users/nobody").await?;
    // A later change marks the point by which that connection's line would
    // have been written: the log is one ordered queue.
    let marker = put_level(&keel, "info").await?;
    assert_eq!(marker.status, StatusCode::OK);
    let end = wait_for_line(&keel, restored + 1, |l| is_change(l, "api"))?;
    let after = keel.logs()[restored..end].to_vec();
    assert_eq!(debug_lines(&after), 0, "debug lines after SIGHUP restored info:\n{}", after.join(""));
    let warned = keel.logs()[at_warn..restored].to_vec();
    assert!(!warned.iter().any(|l| is_access(l)), "an access line at warn:\n{}", warned.join(""));
    assert_eq!(
        after.iter().filter(|l| is_access(l)).count(),
        1,
        "the access line is back at info:\n{}",
        after.join("")
    );

    // An edited config file is what SIGHUP applies.
    std::fs::write(&config, "log:\n  level: \"info,keel::http_server=debug\"\n")?;
    let seen = keel.logs().len();
    keel.signal("HUP")?;
    wait_for_line(&keel, seen, |l| is_change(l, "sighup"))?;
    assert_eq!(current_level(&keel).await?, "info,keel::http_server=debug");

    // A config file that no longer loads keeps the level in force.
    std::fs::write(&config, "log:\n  level: \"keel=loud\"\n")?;
    let seen = keel.logs().len();
    keel.signal("HUP")?;
    wait_for_line(&keel, seen, |l| l.contains("SIGHUP: the configuration does not load"))?;
    assert_eq!(current_level(&keel).await?, "info,keel::http_server=debug");
    assert!(keel.is_running(), "SIGHUP must not stop the process");

    keel.signal("TERM")?;
    let status = keel.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
