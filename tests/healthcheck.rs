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
