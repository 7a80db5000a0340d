//! The HTTP/JSON gateway in front of the real service, over real sockets:
//! the CRUD flow, the error mapping, NDJSON and SSE streams, cancellation,
//! /healthz and /openapi.json.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::http::HttpClient;
use support::{READY_BOUND, TestApp, eventually, spawn_app, spawn_app_with};

async fn create(http: &HttpClient, id: &str, name: &str, email: &str) -> Result<Value> {
    let body = json!({ "user_id": id, "display_name": name, "email": email }).to_string();
    let response = http.send(Method::POST, "/v1/users", &[], Some(&body)).await?;
    ensure!(response.status == StatusCode::OK, "create failed: {} {}", response.status, response.text());
    response.json()
}

fn assert_status_body(body: &Value, code: i64) {
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert!(body["details"].is_array(), "{body}");
}

mod crud {
    use super::*;

    #[tokio::test]
    async fn the_json_face_matches_the_proto() -> Result<()> {
        let app = spawn_app().await?;
        let http = app.http();
        let created = create(&http, "ada", "Ada", "ada@example.com").await?;
        let keys: Vec<&str> = created.as_object().context("not an object")?.keys().map(String::as_str).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ["create_time", "display_name", "email", "roles", "update_time", "user_id"]);
        assert_eq!(created["roles"], json!([]), "empty repeated fields are emitted as []");
        let stamp = created["create_time"].as_str().context("create_time is not a string")?;
        assert!(is_rfc3339(stamp), "{stamp} is not RFC 3339");

        let fetched = http.get("/v1/users/ada").await?;
        assert_eq!(fetched.status, StatusCode::OK);
        assert_eq!(fetched.header("content-type"), Some("application/json"));
        assert_eq!(fetched.json()?, created);
        app.stop().await
    }

    #[tokio::test]
    async fn patch_changes_only_the_keys_sent() -> Result<()> {
        let app = spawn_app().await?;
        let http = app.http();
        let created = create(&http, "u1", "Ada", "ada@example.com").await?;
        let response = http.send(Method::PATCH, "/v1/users/u1", &[], Some(r#"{"display_name": "Bob"}"#)).await?;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let patched = response.json()?;
        assert_eq!(patched["display_name"], "Bob");
        assert_eq!(patched["email"], "ada@example.com");
        assert_eq!(patched["create_time"], created["create_time"]);

        // An explicit mask in the query wins over the body's keys.
        let response = http
            .send(
                Method::PATCH,
                "/v1/users/u1?update_mask=email",
                &[],
                Some(r#"{"display_name": "Ignored", "email": "bob@example.com"}"#),
            )
            .await?;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let patched = response.json()?;
        assert_eq!(
            (patched["display_name"].as_str(), patched["email"].as_str()),
            (Some("Bob"), Some("bob@example.com"))
        );
        app.stop().await
    }

    #[tokio::test]
    async fn delete_returns_an_empty_object() -> Result<()> {
        let app = spawn_app().await?;
        let http = app.http();
        create(&http, "gone", "G", "g@example.com").await?;
        let response = http.send(Method::DELETE, "/v1/users/gone", &[], None).await?;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json()?, json!({}));
        let again = http.send(Method::DELETE, "/v1/users/gone", &[], None).await?;
        assert_eq!(again.status, StatusCode::NOT_FOUND);
        app.stop().await
    }

    fn is_rfc3339(text: &str) -> bool {
        let bytes = text.as_bytes();
        bytes.len() >= 20
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && bytes[13] == b':'
            && bytes[16] == b':'
            && (text.ends_with('Z') || text[19..].contains(['+', '-']))
    }
}

mod errors {
    use super::*;

    #[tokio::test]
    async fn upstream_statuses_map_to_http() -> Result<()> {
        let app = spawn_app().await?;
        let http = app.http();
        create(&http, "dup", "D", "d@example.com").await?;

        let missing = http.get("/v1/users/ghost").await?;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_status_body(&missing.json()?, 5);

        let dup = json!({ "user_id": "dup", "display_name": "D", "email": "d@example.com" }).to_string();
        let conflict = http.send(Method::POST, "/v1/users", &[], Some(&dup)).await?;
        assert_eq!(conflict.status, StatusCode::CONFLICT);
        assert_status_body(&conflict.json()?, 6);

        let bad = http.send(Method::POST, "/v1/users", &[], Some(r#"{"display_name": "X", "email": "nope"}"#)).await?;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        let body = bad.json()?;
        assert_status_body(&body, 3);
        assert!(body["message"].as_str().unwrap_or_default().contains("email"), "{body}");
        app.stop().await
    }

    #[tokio::test]
    async fn the_gateway_rejects_bad_requests_with_status_bodies() -> Result<()> {
        let app = spawn_app_with(|s| s.http.max_body_size = keel::config::ByteSize(1024)).await?;
        let http = app.http();

        let unknown = http
            .send(Method::POST, "/v1/users", &[], Some(r#"{"display_name": "X", "email": "x@y", "shoe_size": 44}"#))
            .await?;
        assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
        let body = unknown.json()?;
        assert_status_body(&body, 3);
        assert!(body["message"].as_str().unwrap_or_default().contains("shoe_size"), "{body}");

        let malformed = http.send(Method::POST, "/v1/users", &[], Some(r#"{"display_name": "#)).await?;
        assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
        let body = malformed.json()?;
        assert_status_body(&body, 3);
        assert!(body["message"].as_str().unwrap_or_default().contains("not valid JSON"), "{body}");

        // Any Content-Type is read as JSON, as grpc-gateway does; what is not
        // JSON is a 400 that names the type expected.
        let wrong_type = http.send(Method::POST, "/v1/users", &[("content-type", "text/plain")], Some("hi")).await?;
        assert_eq!(wrong_type.status, StatusCode::BAD_REQUEST);
        let body = wrong_type.json()?;
        assert_status_body(&body, 3);
        assert!(body["message"].as_str().unwrap_or_default().contains("application/json"), "{body}");

        let huge = json!({ "display_name": "x".repeat(2000), "email": "a@b" }).to_string();
        let too_large = http.send(Method::POST, "/v1/users", &[], Some(&huge)).await?;
        assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_status_body(&too_large.json()?, 8);

        let no_route = http.get("/v2/elsewhere").await?;
        assert_eq!(no_route.status, StatusCode::NOT_FOUND);
        assert_status_body(&no_route.json()?, 5);

        let wrong_method = http.send(Method::PUT, "/v1/users/x", &[], None).await?;
        assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_status_body(&wrong_method.json()?, 12);
        let allow = wrong_method.header("allow").unwrap_or_default().to_owned();
        assert!(allow.contains("GET") && allow.contains("PATCH") && allow.contains("DELETE"), "{allow}");

        let unknown_param = http.get("/v1/users/x?colour=red").await?;
        assert_eq!(unknown_param.status, StatusCode::BAD_REQUEST);
        assert!(unknown_param.text().contains("colour"));

        let bad_timeout = http.send(Method::GET, "/v1/users/x", &[("grpc-timeout", "soon")], None).await?;
        assert_eq!(bad_timeout.status, StatusCode::BAD_REQUEST);
        app.stop().await
    }
}

mod streams {
    use super::*;

    async fn seeded(ids: &[&str]) -> Result<TestApp> {
        let app = spawn_app().await?;
        let http = app.http();
        for id in ids {
            create(&http, id, id, &format!("{id}@example.com")).await?;
        }
        Ok(app)
    }

    #[tokio::test]
    async fn list_users_is_newline_delimited_json_by_default() -> Result<()> {
        let app = seeded(&["c", "a", "b"]).await?;
        let mut response = app.http().open(Method::GET, "/v1/users", &[]).await?;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/x-ndjson"));
        let lines = response.lines().await?;
        let ids: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).map(|v| v["result"]["user_id"].as_str().unwrap_or("?").to_owned())
            })
            .collect::<Result<_, _>>()?;
        assert_eq!(ids, ["a", "b", "c"]);
        app.stop().await
    }

    #[tokio::test]
    async fn list_users_is_server_sent_events_on_request() -> Result<()> {
        let app = seeded(&["b", "a"]).await?;
        let mut response = app.http().open(Method::GET, "/v1/users", &[("accept", "text/event-stream")]).await?;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
        let lines = response.lines().await?;
        let data: Vec<Value> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let ids: Vec<&str> = data.iter().filter_map(|v| v["user_id"].as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(lines.iter().all(|l| l.is_empty() || l.starts_with("data: ")), "{lines:?}");
        app.stop().await
    }

    #[tokio::test]
    async fn sse_sends_keep_alive_comments() -> Result<()> {
        let app = spawn_app_with(|s| s.http.sse_keepalive = Duration::from_millis(50)).await?;
        let mut response = app.http().open(Method::GET, "/v1/users:watch", &[("accept", "text/event-stream")]).await?;
        let line = response.line().await?.context("stream ended")?;
        assert_eq!(line, ": keep-alive");
        drop(response);
        app.stop().await
    }

    #[tokio::test]
    async fn watch_streams_events_then_ends_with_the_deadline_error() -> Result<()> {
        let app = spawn_app().await?;
        let http = app.http();
        let mut watch = http.open(Method::GET, "/v1/users:watch", &[("grpc-timeout", "1S")]).await?;
        assert_eq!(watch.status, StatusCode::OK);
        create(&http, "w1", "W", "w@example.com").await?;

        let first: Value = serde_json::from_str(&watch.line().await?.context("no event")?)?;
        assert_eq!(first["result"]["kind"], "KIND_CREATED");
        assert_eq!(first["result"]["user"]["user_id"], "w1");
        let last: Value = serde_json::from_str(&watch.line().await?.context("no final line")?)?;
        assert_eq!(last["error"]["code"], 4, "{last}");
        assert!(last["error"]["details"].is_array());
        assert_eq!(watch.line().await?, None, "nothing after the error line");
        app.stop().await
    }

    #[tokio::test]
    async fn a_disconnecting_http_client_cancels_the_upstream_stream() -> Result<()> {
        let app = spawn_app().await?;
        let watch = app.http().open(Method::GET, "/v1/users:watch", &[]).await?;
        eventually(READY_BOUND, || async { app.live_streams.get() == 1 }).await.context("no upstream stream")?;
        drop(watch);
        eventually(READY_BOUND, || async { app.live_streams.get() == 0 })
            .await
            .context("the server-side stream outlived its HTTP client")?;
        app.stop().await
    }
}

mod in_process {
    use super::*;

    /// The gateway calls the gRPC stack in process, so open REST streams
    /// use none of the gRPC server's HTTP/2 stream slots: with more watches
    /// open than `grpc.max_concurrent_streams`, a unary call still gets its
    /// real answer rather than waiting out its deadline.
    #[tokio::test]
    async fn open_watches_beyond_the_grpc_stream_limit_do_not_block_rest_calls() -> Result<()> {
        let app = spawn_app_with(|s| s.grpc.max_concurrent_streams = 2).await?;
        let http = app.http();
        let mut watches = Vec::new();
        for _ in 0..6 {
            watches.push(http.open(Method::GET, "/v1/users:watch", &[]).await?);
        }
        eventually(READY_BOUND, || async { app.live_streams.get() == 6 }).await.context("watches did not open")?;
        let missing = http.send(Method::GET, "/v1/users/nobody", &[("grpc-timeout", "2S")], None).await?;
        assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
        drop(watches);
        app.stop().await
    }
}

mod headers {
    use super::*;

    #[tokio::test]
    async fn grpc_timeout_is_capped_by_the_maximum() -> Result<()> {
        let app = spawn_app_with(|s| s.http.max_timeout = Duration::from_millis(300)).await?;
        let started = tokio::time::Instant::now();
        let mut watch = app.http().open(Method::GET, "/v1/users:watch", &[("grpc-timeout", "1H")]).await?;
        let last: Value = serde_json::from_str(&watch.line().await?.context("no final line")?)?;
        assert_eq!(last["error"]["code"], 4, "{last}");
        assert!(started.elapsed() < Duration::from_secs(10), "the cap did not apply");
        app.stop().await
    }
}

mod probes {
    use super::*;

    #[tokio::test]
    async fn healthz_forwards_to_the_grpc_health_service() -> Result<()> {
        let app = spawn_app().await?;
        let http = app.http();
        let ok = http.get("/healthz").await?;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.json()?["status"], "SERVING");
        let named = http.get("/healthz?service=user.v1.UserService").await?;
        assert_eq!(named.status, StatusCode::OK);
        let unknown = http.get("/healthz?service=no.such.Service").await?;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_status_body(&unknown.json()?, 5);

        app.health_state.set_not_serving().await;
        let down = http.get("/healthz").await?;
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = down.json()?;
        assert_status_body(&body, 14);
        assert!(body["message"].as_str().unwrap_or_default().contains("NOT_SERVING"), "{body}");
        app.stop().await
    }

    #[tokio::test]
    async fn openapi_describes_every_route() -> Result<()> {
        let app = spawn_app().await?;
        let doc = app.http().get("/openapi.json").await?.json()?;
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().context("no paths")?;
        for (path, method) in [
            ("/v1/users", "post"),
            ("/v1/users", "get"),
            ("/v1/users/{user_id}", "get"),
            ("/v1/users/{user_id}", "delete"),
            ("/v1/users/{user.user_id}", "patch"),
            ("/v1/users:watch", "get"),
        ] {
            assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} missing");
        }
        let user = &doc["components"]["schemas"]["user.v1.User"]["properties"];
        assert_eq!(user["create_time"]["format"], "date-time");
        assert_eq!(user["roles"]["type"], "array");
        let watch = &paths["/v1/users:watch"]["get"]["responses"]["200"]["content"];
        assert!(watch.get("application/x-ndjson").is_some() && watch.get("text/event-stream").is_some());
        app.stop().await
    }
}
