//! Layered configuration: the order of the layers, and every kind of bad
//! value stopping the binary with exit code 78 and the key named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use keel::config::{ConfigError, ConfigSources, LogFormat, Settings};

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("keel-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn each_layer_overrides_the_one_before() -> Result<()> {
    let scratch = Scratch::new("layers")?;
    scratch.write(
        "default.yaml",
        "grpc:\n  addr: 127.0.0.1:1001\nhttp:\n  addr: 127.0.0.1:2001\nadmin:\n  addr: 127.0.0.1:3001\nlog:\n  level: debug\n",
    )?;
    scratch.write("staging.yaml", "http:\n  addr: 127.0.0.1:2002\nadmin:\n  addr: 127.0.0.1:3002\n")?;
    let file = scratch.write("extra.yaml", "admin:\n  addr: 127.0.0.1:3003\nshutdown:\n  drain_delay: 250ms\n")?;
    let sources = ConfigSources {
        dir: scratch.0.clone(),
        environment: Some("staging".into()),
        file: Some(file),
        env_vars: vars(&[
            ("KEEL__SHUTDOWN__DRAIN_DELAY", "1s"),
            ("KEEL__AUTH__TOKENS", "alpha, beta"),
            ("KEEL_ENV", "ignored-here"),
            ("OTHER__GRPC__ADDR", "not ours"),
        ]),
        dir_from_env: true,
        probe: false,
    };
    let settings = Settings::load(&sources)?;
    let addr = |s: &str| s.parse::<SocketAddr>();
    assert_eq!(settings.grpc.addr, addr("127.0.0.1:1001")?, "default.yaml");
    assert_eq!(settings.http.addr, addr("127.0.0.1:2002")?, "staging.yaml over default.yaml");
    assert_eq!(settings.admin.addr, addr("127.0.0.1:3003")?, "--config over staging.yaml");
    assert_eq!(settings.shutdown.drain_delay, Duration::from_secs(1), "env over --config");
    assert_eq!(settings.auth.tokens, vec!["alpha".to_owned(), "beta".to_owned()]);
    assert_eq!(settings.log.level, "debug");
    // Untouched keys keep their built-in defaults.
    assert_eq!(settings.shutdown.timeout, Duration::from_secs(20));
    assert_eq!(settings.log.format, LogFormat::Json);
    Ok(())
}

#[test]
fn built_in_defaults_apply_without_any_file() -> Result<()> {
    let scratch = Scratch::new("empty")?;
    let settings = Settings::load(&ConfigSources { dir: scratch.0.clone(), ..Default::default() })?;
    assert_eq!(settings, Settings::default());
    assert_eq!(settings.grpc.addr, "127.0.0.1:9000".parse::<SocketAddr>()?);
    // drain_delay 5s + timeout 20s + the 0.5s abort grace + flush_timeout 1s.
    assert_eq!(settings.shutdown.max_duration(), Duration::from_millis(26_500));
    Ok(())
}

fn bound(settings: &Settings) -> [String; 3] {
    [settings.grpc.addr, settings.http.addr, settings.admin.addr].map(|a| a.to_string())
}

#[test]
fn defaults_bind_loopback_and_production_binds_every_interface() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let loopback = ["127.0.0.1:9000", "127.0.0.1:8080", "127.0.0.1:8081"];
    assert_eq!(bound(&Settings::default()), loopback, "built-in defaults");
    let shipped = Settings::load(&ConfigSources { dir: dir.clone(), ..Default::default() })?;
    assert_eq!(bound(&shipped), loopback, "config/default.yaml");

    let production = Settings::load(&ConfigSources {
        dir,
        environment: Some("production".into()),
        env_vars: vars(&[("KEEL__AUTH__TOKENS", "t1")]),
        ..Default::default()
    })?;
    assert_eq!(bound(&production), ["0.0.0.0:9000", "0.0.0.0:8080", "0.0.0.0:8081"], "config/production.yaml");
    Ok(())
}

#[test]
fn sizes_take_their_unit_in_any_case() -> Result<()> {
    let scratch = Scratch::new("sizes")?;
    for (text, bytes) in [("4mb", 4_000_000), ("4MB", 4_000_000), ("4mib", 4 << 20), ("4MiB", 4 << 20), ("4KB", 4000)] {
        let sources = ConfigSources {
            dir: scratch.0.clone(),
            env_vars: vars(&[("KEEL__HTTP__MAX_BODY_SIZE", text)]),
            ..Default::default()
        };
        assert_eq!(Settings::load(&sources)?.http.max_body_size.0, bytes, "{text}");
    }
    Ok(())
}

#[test]
fn a_missing_overlay_is_an_error_that_lists_the_ones_there() -> Result<()> {
    let scratch = Scratch::new("overlay")?;
    scratch.write("default.yaml", "")?;
    scratch.write("production.yaml", "")?;
    scratch.write("staging.yaml", "")?;
    let sources = ConfigSources { dir: scratch.0.clone(), environment: Some("prod".into()), ..Default::default() };
    match Settings::load(&sources) {
        Err(error @ ConfigError::MissingOverlay { .. }) => {
            let message = error.to_string();
            let path = scratch.0.join("prod.yaml");
            assert!(
                message.contains(&format!("KEEL_ENV=prod selects the config overlay {}", path.display())),
                "{message}"
            );
            assert!(message.ends_with(": production, staging"), "{message}");
        }
        other => panic!("expected a missing overlay error, got {other:?}"),
    }
    let sources = ConfigSources { dir: scratch.0.clone(), environment: Some("../prod".into()), ..Default::default() };
    assert!(matches!(Settings::load(&sources), Err(ConfigError::Environment { .. })), "a path is not an environment");
    Ok(())
}

#[test]
fn only_the_default_config_dir_may_be_missing() -> Result<()> {
    let scratch = Scratch::new("no-dir")?;
    let missing = scratch.0.join("absent");
    let default_dir = ConfigSources { dir: missing.clone(), ..Default::default() };
    assert_eq!(Settings::load(&default_dir)?, Settings::default(), "the built-in defaults are complete");

    let chosen = ConfigSources { dir: missing.clone(), dir_from_env: true, ..Default::default() };
    match Settings::load(&chosen) {
        Err(ConfigError::MissingDir { path }) => assert_eq!(path, missing.display().to_string()),
        other => panic!("expected a missing directory error, got {other:?}"),
    }

    let with_overlay = ConfigSources { environment: Some("production".into()), ..default_dir };
    assert!(
        matches!(Settings::load(&with_overlay), Err(ConfigError::MissingOverlay { .. })),
        "KEEL_ENV asks for an overlay even when the default directory is absent"
    );
    Ok(())
}

#[test]
fn an_unknown_nested_section_names_the_layer_that_set_it() -> Result<()> {
    let scratch = Scratch::new("nested")?;
    let sources = ConfigSources {
        dir: scratch.0.clone(),
        env_vars: vars(&[("KEEL__GRPC__QUIC__CERT_FILE", "x")]),
        ..Default::default()
    };
    match Settings::load(&sources) {
        Err(ConfigError::UnknownKey { key, origin }) => {
            assert_eq!(key, "grpc.quic");
            assert_eq!(origin, "environment variable KEEL__GRPC__QUIC__CERT_FILE");
        }
        other => panic!("expected an unknown key error, got {other:?}"),
    }

    let file = scratch.write("nested.yaml", "grpc:\n  quic:\n    cert_file: x\n")?;
    let sources = ConfigSources { dir: scratch.0.clone(), file: Some(file.clone()), ..Default::default() };
    match Settings::load(&sources) {
        Err(ConfigError::UnknownKey { key, origin }) => {
            assert_eq!(key, "grpc.quic");
            assert_eq!(origin, format!("file {}", file.display()));
        }
        other => panic!("expected an unknown key error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn the_shipped_default_file_matches_the_built_in_defaults() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let settings = Settings::load(&ConfigSources { dir, ..Default::default() })?;
    assert_eq!(settings, Settings::default());
    Ok(())
}

#[test]
fn errors_name_the_key_and_its_layer() -> Result<()> {
    let scratch = Scratch::new("errors")?;
    let file = scratch.write("bad.yaml", "grpc:\n  adress: 127.0.0.1:1\n")?;
    let sources = ConfigSources { dir: scratch.0.clone(), file: Some(file.clone()), ..Default::default() };
    match Settings::load(&sources) {
        Err(ConfigError::UnknownKey { key, origin }) => {
            assert_eq!(key, "grpc.adress");
            assert!(origin.contains("bad.yaml"), "{origin}");
        }
        other => panic!("expected an unknown key error, got {other:?}"),
    }

    let sources = ConfigSources {
        dir: scratch.0.clone(),
        env_vars: vars(&[("KEEL__SHUTDOWN__TIMEOUT", "soon")]),
        ..Default::default()
    };
    match Settings::load(&sources) {
        Err(ConfigError::Invalid { key, origin, .. }) => {
            assert_eq!(key, "shutdown.timeout");
            assert_eq!(origin, "environment variable KEEL__SHUTDOWN__TIMEOUT");
        }
        other => panic!("expected an invalid value error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn keepalive_settings_are_checked_against_the_kernels_bounds() -> Result<()> {
    let scratch = Scratch::new("keepalive")?;
    let load = |pairs: &[(&str, &str)]| {
        Settings::load(&ConfigSources { dir: scratch.0.clone(), env_vars: vars(pairs), ..Default::default() })
    };
    for (pairs, bad_key) in [
        (&[("KEEL__GRPC__TCP_KEEPALIVE_PROBES", "0")][..], "grpc.tcp_keepalive_probes"),
        (&[("KEEL__GRPC__TCP_KEEPALIVE_PROBES", "128")][..], "grpc.tcp_keepalive_probes"),
        (&[("KEEL__GRPC__TCP_KEEPALIVE", "500ms")][..], "grpc.tcp_keepalive"),
        (&[("KEEL__GRPC__TCP_KEEPALIVE", "10h")][..], "grpc.tcp_keepalive"),
        (&[("KEEL__GRPC__TCP_KEEPALIVE_INTERVAL", "0s")][..], "grpc.tcp_keepalive_interval"),
        (
            &[("KEEL__GRPC__KEEPALIVE_INTERVAL", "20s"), ("KEEL__GRPC__KEEPALIVE_TIMEOUT", "0s")][..],
            "grpc.keepalive_timeout",
        ),
    ] {
        match load(pairs) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, bad_key, "{pairs:?}"),
            other => panic!("{pairs:?}: expected an invalid value error, got {other:?}"),
        }
    }
    // Off is off: no probe settings are checked then, and `0s` turns the
    // HTTP/2 PINGs off whatever their timeout.
    let settings = load(&[
        ("KEEL__GRPC__TCP_KEEPALIVE", "0s"),
        ("KEEL__GRPC__TCP_KEEPALIVE_PROBES", "0"),
        ("KEEL__GRPC__KEEPALIVE_TIMEOUT", "0s"),
    ])?;
    assert!(settings.grpc.tcp_keepalive.is_zero() && settings.grpc.keepalive_interval.is_zero());
    Ok(())
}

#[test]
fn tls_and_jwt_settings_are_validated_and_named() -> Result<()> {
    let scratch = Scratch::new("security")?;
    let load = |env: &[(&str, &str)]| {
        Settings::load(&ConfigSources { dir: scratch.0.clone(), env_vars: vars(env), ..Default::default() })
    };
    let jwt = [
        ("KEEL__AUTH__JWT__ISSUER", "https://idp.example.com"),
        ("KEEL__AUTH__JWT__AUDIENCES", "api,other"),
        ("KEEL__AUTH__JWT__JWKS_URL", "https://idp.example.com/jwks"),
    ];
    let settings = load(&jwt)?;
    assert_eq!(settings.auth.jwt.audiences, ["api", "other"]);
    assert!(settings.auth.configured());

    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("KEEL__GRPC__TLS__CERT_FILE", "/tls.crt")], "grpc.tls.cert_file"),
        (&[("KEEL__HTTP__TLS__CLIENT_CA_FILE", "/ca.crt")], "http.tls.client_ca_file"),
        (&[("KEEL__AUTH__JWT__AUDIENCES", "api")], "auth.jwt.issuer"),
        (&[jwt[0], jwt[1], ("KEEL__AUTH__JWT__JWKS_URL", "http://idp.example.com/jwks")], "auth.jwt.jwks_url"),
        (&[jwt[0], jwt[1], jwt[2], ("KEEL__AUTH__JWT__ALGORITHMS", "RS256,HS256")], "auth.jwt.algorithms"),
        (&[jwt[0], jwt[1], jwt[2], ("KEEL__AUTH__JWT__ALGORITHMS", "none")], "auth.jwt.algorithms"),
    ];
    for (env, expected) in cases {
        match load(env) {
            Err(ConfigError::Invalid { key, origin, .. }) => {
                assert_eq!(key, expected, "{env:?}");
                assert!(origin.starts_with("environment variable"), "{origin}");
            }
            other => panic!("{env:?}: expected an error naming {expected}, got {other:?}"),
        }
    }

    // Method names are map keys, case and dots kept.
    let file = scratch.write(
        "scopes.yaml",
        "auth:\n  jwt:\n    required_scopes:\n      /user.v1.UserService/DeleteUser: [users.admin]\n",
    )?;
    let sources =
        ConfigSources { dir: scratch.0.clone(), file: Some(file), env_vars: vars(&jwt), ..Default::default() };
    let settings = Settings::load(&sources)?;
    assert_eq!(
        settings.auth.jwt.required_scopes.get("/user.v1.UserService/DeleteUser").map(Vec::as_slice),
        Some(&["users.admin".to_owned()][..])
    );
    let production = ConfigSources {
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
        environment: Some("production".into()),
        env_vars: vars(&jwt),
        ..Default::default()
    };
    let settings = Settings::load(&production).context("production with auth.jwt and no static token")?;
    assert!(!settings.grpc.reflection, "production turns reflection off");
    Ok(())
}

mod binary {
    use super::*;

    fn keel(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Result<Output> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.args(args).env_clear().env("KEEL_CONFIG_DIR", dir);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().context("cannot run keel")
    }

    /// Exit code 78 and one line on stderr containing every one of `parts`.
    fn assert_exits_78_saying(output: &Output, parts: &[&str]) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "stderr: {stderr}");
        for part in parts {
            assert!(stderr.contains(part), "stderr should say {part:?}: {stderr}");
        }
        assert_eq!(stderr.trim().lines().count(), 1, "one clear message: {stderr}");
    }

    #[test]
    fn a_keel_env_without_its_overlay_exits_78() -> Result<()> {
        let scratch = Scratch::new("bin-env-typo")?;
        scratch.write("production.yaml", "")?;
        let output = keel(&["config"], &[("KEEL_ENV", "prod")], &scratch.0)?;
        let missing = scratch.0.join("prod.yaml");
        assert_exits_78_saying(&output, &["KEEL_ENV=prod", &missing.display().to_string(), "production"]);
        assert!(output.stdout.is_empty(), "no settings printed");
        Ok(())
    }

    #[test]
    fn a_missing_keel_config_dir_exits_78() -> Result<()> {
        let output = keel(&["config"], &[], Path::new("/nonexistent"))?;
        assert_exits_78_saying(&output, &["/nonexistent", "KEEL_CONFIG_DIR"]);
        Ok(())
    }

    #[test]
    fn an_absolute_config_path_is_reported_as_given() -> Result<()> {
        let scratch = Scratch::new("bin-abs")?;
        let file = scratch.write("bad.yaml", "grpc:\n  adress: 127.0.0.1:1\n")?;
        let file = file.to_string_lossy().into_owned();
        assert!(Path::new(&file).is_absolute());
        // Run from the file's own directory, where a path relative to the
        // current directory would be just `bad.yaml`.
        let output = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["--config", &file, "config"])
            .env_clear()
            .env("KEEL_CONFIG_DIR", &scratch.0)
            .current_dir(&scratch.0)
            .output()?;
        assert_exits_78_saying(&output, &["`grpc.adress`", &format!("(from file {file})")]);
        Ok(())
    }

    #[test]
    fn an_unknown_nested_env_key_names_its_variable() -> Result<()> {
        let scratch = Scratch::new("bin-nested")?;
        let output = keel(&["config"], &[("KEEL__GRPC__QUIC__CERT_FILE", "x")], &scratch.0)?;
        assert_config_error(&output, "grpc.quic", "environment variable KEEL__GRPC__QUIC__CERT_FILE");
        Ok(())
    }

    #[test]
    fn config_into_a_closed_pipe_exits_quietly() -> Result<()> {
        let scratch = Scratch::new("bin-pipe")?;
        // The read end is closed before keel starts, as after `| head -3`
        // has exited, so every write fails with EPIPE.
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("config")
            .env_clear()
            .env("KEEL_CONFIG_DIR", &scratch.0)
            .stdout(writer)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
        assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
        Ok(())
    }

    fn assert_config_error(output: &Output, key: &str, origin: &str) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "stderr: {stderr}");
        assert!(stderr.contains(&format!("`{key}`")), "stderr should name {key}: {stderr}");
        assert!(stderr.contains(origin), "stderr should name {origin}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear message: {stderr}");
    }

    #[test]
    fn an_unparseable_address_exits_78() -> Result<()> {
        let scratch = Scratch::new("bin-addr")?;
        scratch.write("default.yaml", "grpc:\n  addr: not-an-address\n")?;
        let output = keel(&["config"], &[], &scratch.0)?;
        assert_config_error(&output, "grpc.addr", "default.yaml");
        Ok(())
    }

    #[test]
    fn an_unknown_log_format_exits_78() -> Result<()> {
        let scratch = Scratch::new("bin-format")?;
        let output = keel(&["config"], &[("KEEL__LOG__FORMAT", "xml")], &scratch.0)?;
        assert_config_error(&output, "log.format", "KEEL__LOG__FORMAT");
        Ok(())
    }

    #[test]
    fn an_unparseable_duration_exits_78() -> Result<()> {
        let scratch = Scratch::new("bin-duration")?;
        let file = scratch.write("override.yaml", "shutdown:\n  drain_delay: five seconds\n")?;
        let file = file.to_string_lossy().into_owned();
        let output = keel(&["--config", &file, "config"], &[], &scratch.0)?;
        assert_config_error(&output, "shutdown.drain_delay", "override.yaml");
        Ok(())
    }

    #[test]
    fn a_misspelt_key_in_a_file_exits_78() -> Result<()> {
        let scratch = Scratch::new("bin-typo")?;
        scratch.write("production.yaml", "http:\n  adress: 0.0.0.0:8080\n")?;
        let output = keel(&["config"], &[("KEEL_ENV", "production")], &scratch.0)?;
        assert_config_error(&output, "http.adress", "production.yaml");
        Ok(())
    }

    #[test]
    fn a_missing_config_file_exits_78() -> Result<()> {
        let scratch = Scratch::new("bin-missing")?;
        let output = keel(&["--config", "/nonexistent/keel.yaml"], &[], &scratch.0)?;
        assert_eq!(output.status.code(), Some(78));
        assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/keel.yaml"));
        Ok(())
    }

    #[test]
    fn env_beats_file_and_tokens_are_never_printed() -> Result<()> {
        let scratch = Scratch::new("bin-print")?;
        scratch.write("default.yaml", "grpc:\n  addr: 127.0.0.1:7000\nauth:\n  tokens: [file-secret-token]\n")?;
        let output = keel(
            &["config"],
            &[("KEEL__GRPC__ADDR", "127.0.0.1:7100"), ("KEEL__AUTH__TOKENS", "env-secret-1,env-secret-2")],
            &scratch.0,
        )?;
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let printed = String::from_utf8(output.stdout)?;
        let effective: serde_json::Value = serde_json::from_str(&printed)?;
        assert_eq!(effective["grpc"]["addr"], "127.0.0.1:7100");
        assert_eq!(effective["auth"]["tokens"].as_array().map(Vec::len), Some(2));
        for secret in ["file-secret-token", "env-secret-1", "env-secret-2"] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
        Ok(())
    }

    #[test]
    fn a_port_in_use_exits_1_naming_the_address() -> Result<()> {
        let scratch = Scratch::new("bin-port")?;
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = taken.local_addr()?.to_string();
        let output = keel(
            &["serve"],
            &[("KEEL__GRPC__ADDR", &addr), ("KEEL__HTTP__ADDR", "127.0.0.1:0"), ("KEEL__ADMIN__ADDR", "127.0.0.1:0")],
            &scratch.0,
        )?;
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&addr), "stderr should name {addr}: {stderr}");
        let parts: Vec<&str> = stderr.trim().split(": ").collect();
        assert!(parts.windows(2).all(|w| w[0] != w[1]), "each cause once: {stderr}");
        drop(taken);
        Ok(())
    }
}
