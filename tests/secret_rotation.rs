//! Secrets mounted as files, rotated under a running app the way the kubelet
//! does it (a new timestamped directory, then the `..data` symlink swapped):
//! `auth.tokens_file` takes the new token without a restart and refuses the
//! old one after the reload, over gRPC and through the HTTP gateway; a bad
//! file keeps the tokens in force and is counted.

mod support;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use http::{Method, StatusCode};
use keel::proto::user::v1::GetUserRequest;
use support::exposition::Exposition;
use support::{READY_BOUND, TestApp, eventually, sample, spawn_app_with};
use tonic::Code;

/// A directory laid out like a mounted Secret volume: `tokens` is a symlink
/// to `..data/tokens`, and `..data` a symlink to the current version.
struct SecretVolume {
    root: PathBuf,
    version: usize,
}

impl SecretVolume {
    fn new(name: &str, tokens: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("keel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let mut volume = Self { root, version: 0 };
        volume.publish(tokens)?;
        std::os::unix::fs::symlink("..data/tokens", volume.root.join("tokens"))?;
        Ok(volume)
    }

    fn file(&self) -> PathBuf {
        self.root.join("tokens")
    }

    /// Writes a new version and swaps `..data` to it atomically (rename of
    /// a symlink), as the kubelet's atomic writer does.
    fn publish(&mut self, tokens: &str) -> Result<()> {
        self.version += 1;
        let dir = format!("..2026_12_01_00_00_{:02}.{}", self.version, std::process::id());
        std::fs::create_dir(self.root.join(&dir))?;
        std::fs::write(self.root.join(&dir).join("tokens"), tokens)?;
        let staged = self.root.join("..data_tmp");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(&dir, &staged)?;
        std::fs::rename(&staged, self.root.join("..data"))?;
        Ok(())
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The gRPC code of GetUser with `token` (NOT_FOUND means it got past auth).
async fn grpc_code(app: &TestApp, token: &str) -> Result<Code> {
    let mut request = tonic::Request::new(GetUserRequest { user_id: "nobody".into() });
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(match app.users()?.get_user(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    })
}

async fn http_status(app: &TestApp, token: &str) -> Result<StatusCode> {
    let bearer = format!("Bearer {token}");
    let response =
        app.http().send(Method::GET, "/v1/users/nobody", &[("authorization", bearer.as_str())], None).await?;
    Ok(response.status)
}

async fn reload_errors(app: &TestApp) -> Result<f64> {
    let text = app.admin().get("/metrics").await?.text();
    let scrape = Exposition::parse(&text)?;
    Ok(sample(&scrape, "keel_secret_reloads_total", &[("secret", "auth.tokens_file"), ("result", "error")])
        .unwrap_or(0.0))
}

fn path_string(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test]
async fn a_rotated_tokens_file_takes_effect_without_a_restart() -> Result<()> {
    let mut volume = SecretVolume::new("tokens-rotation", "old-token-1f3a\n")?;
    let file = path_string(&volume.file());
    let app = spawn_app_with(|s| s.auth.tokens_file = file).await?;

    assert_eq!(grpc_code(&app, "old-token-1f3a").await?, Code::NotFound, "the token at start is accepted");
    assert_eq!(grpc_code(&app, "new-token-9c2e").await?, Code::Unauthenticated);
    assert_eq!(http_status(&app, "old-token-1f3a").await?, StatusCode::NOT_FOUND);

    // Rotation: the new token, a comma-separated second one, the old gone.
    volume.publish("new-token-9c2e,second-token-77d0")?;
    eventually(READY_BOUND, || async { grpc_code(&app, "new-token-9c2e").await.ok() == Some(Code::NotFound) })
        .await
        .context("the rotated token was never accepted")?;
    assert_eq!(
        grpc_code(&app, "old-token-1f3a").await?,
        Code::Unauthenticated,
        "the old token is refused after the reload"
    );
    assert_eq!(grpc_code(&app, "second-token-77d0").await?, Code::NotFound);
    assert_eq!(http_status(&app, "old-token-1f3a").await?, StatusCode::UNAUTHORIZED, "the gateway refuses it too");
    assert_eq!(http_status(&app, "new-token-9c2e").await?, StatusCode::NOT_FOUND);

    // A version with no token is refused: the tokens in force stay, and the
    // failed reload is counted.
    let errors_before = reload_errors(&app).await?;
    volume.publish(" ,\n")?;
    eventually(READY_BOUND, || async { reload_errors(&app).await.is_ok_and(|n| n > errors_before) })
        .await
        .context("the failed reload was never counted")?;
    assert_eq!(grpc_code(&app, "new-token-9c2e").await?, Code::NotFound, "a bad file keeps the old tokens");
    assert_eq!(grpc_code(&app, "old-token-1f3a").await?, Code::Unauthenticated);

    // One token per line works as well.
    volume.publish("third-token-0b8d\nnew-token-9c2e\n")?;
    eventually(READY_BOUND, || async { grpc_code(&app, "third-token-0b8d").await.ok() == Some(Code::NotFound) })
        .await
        .context("the newline-separated file was never loaded")?;
    app.stop().await
}

#[test]
fn a_missing_or_empty_tokens_file_stops_keel_with_exit_78() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("keel-tokens-file-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("production.yaml"), "")?;
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n,\n")?;
    let good = dir.join("good");
    std::fs::write(&good, "a,b\n")?;
    let run = |env: &[(&str, &str)]| -> Result<std::process::Output> {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keel"));
        command.arg("config").env_clear().env("KEEL_CONFIG_DIR", &dir).env("KEEL_ENV", "production");
        for (k, v) in env {
            command.env(k, v);
        }
        Ok(command.output()?)
    };
    for (label, env) in [
        ("missing", vec![("KEEL__AUTH__TOKENS_FILE", "/nonexistent/keel/tokens")]),
        ("no token", vec![("KEEL__AUTH__TOKENS_FILE", empty.to_str().context("path")?)]),
        (
            "both tokens and tokens_file",
            vec![("KEEL__AUTH__TOKENS_FILE", good.to_str().context("path")?), ("KEEL__AUTH__TOKENS", "c")],
        ),
    ] {
        let output = run(&env)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{label}: {stderr}");
        assert!(stderr.contains("auth.tokens_file"), "{label}: the key is named: {stderr}");
    }
    let output = run(&[("KEEL__AUTH__TOKENS_FILE", good.to_str().context("path")?)])?;
    assert!(output.status.success(), "a tokens file satisfies production: {}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("tokens_file") && !printed.contains("\"a,b"), "the path is shown, never the tokens");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
