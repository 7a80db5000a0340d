//! `keel healthcheck`, the probe built into the binary: 0 against a live
//! server, non-zero once it has stopped.

mod support;

use std::process::Command;

use anyhow::Result;
use support::spawn_app;

fn healthcheck(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_keel")).arg("healthcheck").args(args).env_clear().output()?)
}

#[tokio::test]
async fn passes_against_a_live_server_and_fails_after_it_stops() -> Result<()> {
    let app = spawn_app().await?;
    let addr = app.grpc_addr.to_string();
    let live = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || healthcheck(&["--addr", &addr])
    })
    .await??;
    assert_eq!(live.status.code(), Some(0), "{}", String::from_utf8_lossy(&live.stderr));

    let named = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || healthcheck(&["--addr", &addr, "--service", "user.v1.UserService"])
    })
    .await??;
    assert_eq!(named.status.code(), Some(0));

    let unknown = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || healthcheck(&["--addr", &addr, "--service", "no.such.Service"])
    })
    .await??;
    assert_eq!(unknown.status.code(), Some(1));

    app.stop().await?;
    let stopped = tokio::task::spawn_blocking(move || healthcheck(&["--addr", &addr, "--timeout", "1s"])).await??;
    assert_eq!(stopped.status.code(), Some(1));
    let reason = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(reason.trim().lines().count(), 1, "one-line reason: {reason}");
    assert!(reason.contains("cannot connect"), "{reason}");
    Ok(())
}

/// A loopback port with nothing listening on it.
fn closed_port() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

#[test]
fn a_refused_connection_is_explained_once() -> Result<()> {
    let addr = closed_port()?;
    let output = healthcheck(&["--addr", &addr, "--timeout", "2s"])?;
    assert_eq!(output.status.code(), Some(1));
    let reason = String::from_utf8_lossy(&output.stderr);
    assert!(reason.contains("Connection refused"), "the root cause is shown: {reason}");
    let parts: Vec<&str> = reason.trim().split(": ").collect();
    assert!(parts.windows(2).all(|w| w[0] != w[1]), "no message repeated: {reason}");
    Ok(())
}

#[test]
fn the_probe_runs_in_production_without_tokens() -> Result<()> {
    // As the chart's test pod does: the production image, no tokens. The
    // probe serves nothing, so it must get as far as connecting rather than
    // stop with the server's config error (78). No KEEL_CONFIG_DIR: the
    // shipped config/ of the working directory is used.
    let addr = closed_port()?;
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["healthcheck", "--addr", &addr, "--timeout", "2s"])
        .env_clear()
        .env("KEEL_ENV", "production")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    let reason = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{reason}");
    assert!(reason.contains("cannot connect"), "{reason}");
    Ok(())
}
