//! Every `google.api.http` binding rule, checked end to end: a test-only
//! `echo.v1.EchoService` (tests/proto) behind the real gateway, with a raw
//! gRPC backend that echoes each request, so what comes back shows exactly
//! what the gateway bound. Also: header mapping both ways, streams that
//! fail mid-way, route conflicts, and a randomized robustness check.

mod support;

use std::convert::Infallible;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result, anyhow};
use http::{Method, StatusCode};
use keel::config::HttpSettings;
use keel::gateway::forward::Forwarder;
use keel::gateway::{BuildError, Gateway};
use keel::grpc::middleware::method::MethodTable;
use keel::grpc::middleware::metrics::GrpcMetricsLayer;
use keel::metrics::Metrics;
use prost::Message;
use serde_json::{Value, json};
use std::sync::Arc;
use support::echo::EchoBody;
use support::echo_gateway::{EchoGateway, registry_of};
use tonic::server::NamedService;
use tonic::transport::Endpoint;

fn compile(file: &str) -> Result<Vec<u8>> {
    support::compile_test_proto(file)
}

mod binding {
    use super::*;

    #[tokio::test]
    async fn body_star_binds_everything_and_the_path_wins() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let body = json!({ "id": "from-body", "name": "n", "number": 5, "tags": ["a"], "nested": { "inner_id": "i" } });
        let echoed = gw.ok_json(Method::POST, "/v1/echo/from-path", Some(&body.to_string())).await?;
        assert_eq!(echoed["id"], "from-path");
        assert_eq!(echoed["name"], "n");
        assert_eq!(echoed["number"], 5);
        assert_eq!(echoed["tags"], json!(["a"]));
        assert_eq!(echoed["nested"]["innerId"], "i", "output uses the default json_name");
        // Unpopulated fields are emitted with their zero values.
        assert_eq!(echoed["flag"], false);
        assert_eq!(echoed["path"], "");
        assert_eq!(echoed["kind"], "KIND_UNSPECIFIED");
        gw.stop().await
    }

    #[tokio::test]
    async fn query_parameters_bind_nested_repeated_and_typed_fields() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let query = "name=n%20m&number=7&flag=true&tags=a&tags=b&nested.inner_id=x&nested.value=3\
                     &kind=KIND_A&when=2024-01-02T03:04:05Z&big=9007199254740993&camelCaseField=c";
        let echoed = gw.ok_json(Method::GET, &format!("/v1/echo/q1?{query}"), None).await?;
        assert_eq!(echoed["id"], "q1");
        assert_eq!(echoed["name"], "n m");
        assert_eq!(echoed["number"], 7);
        assert_eq!(echoed["flag"], true);
        assert_eq!(echoed["tags"], json!(["a", "b"]));
        assert_eq!(echoed["nested"], json!({ "innerId": "x", "value": 3 }));
        assert_eq!(echoed["kind"], "KIND_A");
        assert_eq!(echoed["when"], "2024-01-02T03:04:05Z");
        assert_eq!(echoed["big"], "9007199254740993", "64-bit integers are strings");
        assert_eq!(echoed["camelCaseField"], "c", "output uses json_name");

        let by_proto_name = gw.ok_json(Method::GET, "/v1/echo/q2?camel_case_field=p", None).await?;
        assert_eq!(by_proto_name["camelCaseField"], "p");
        gw.stop().await
    }

    #[tokio::test]
    async fn bad_query_parameters_are_400s_naming_them() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        for (query, mention) in [
            ("flag=maybe", "flag"),
            ("number=seven", "number"),
            ("name=a&name=b", "name"),
            ("nested=x", "nested"),
            ("nope=1", "nope"),
            ("id=other", "id"),
        ] {
            let response = gw.http.get(&format!("/v1/echo/q?{query}")).await?;
            assert_eq!(response.status, StatusCode::BAD_REQUEST, "{query}: {}", response.text());
            let body = response.json()?;
            assert_eq!(body["code"], 3);
            assert!(body["message"].as_str().unwrap_or_default().contains(mention), "{query}: {body}");
        }
        gw.stop().await
    }

    #[tokio::test]
    async fn json_names_and_proto_names_are_both_accepted_in_bodies() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let a = gw.ok_json(Method::POST, "/v1/echo/j", Some(r#"{"camel_case_field": "proto"}"#)).await?;
        assert_eq!(a["camelCaseField"], "proto");
        let b = gw.ok_json(Method::POST, "/v1/echo/j", Some(r#"{"camelCaseField": "json"}"#)).await?;
        assert_eq!(b["camelCaseField"], "json");
        let unknown = gw.http.send(Method::POST, "/v1/echo/j", &[], Some(r#"{"camelcasefield": 1}"#)).await?;
        assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
        assert!(unknown.text().contains("camelcasefield"));
        gw.stop().await
    }

    #[tokio::test]
    async fn segment_patterns_bind_the_whole_matched_path() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let echoed =
            gw.ok_json(Method::PUT, "/v1/shelves/s1/books/b2", Some(r#"{"inner_id": "in", "value": 9}"#)).await?;
        assert_eq!(echoed["name"], "shelves/s1/books/b2");
        assert_eq!(echoed["nested"], json!({ "innerId": "in", "value": 9 }), "a named body binds that field");
        let short = gw.http.send(Method::PUT, "/v1/shelves/s1/books", &[], Some("{}")).await?;
        assert_eq!(short.status, StatusCode::NOT_FOUND);
        gw.stop().await
    }

    #[tokio::test]
    async fn double_wildcards_take_the_rest_of_the_path() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let echoed = gw.ok_json(Method::GET, "/v1/files/a/b/c.txt", None).await?;
        assert_eq!(echoed["path"], "a/b/c.txt");
        gw.stop().await
    }

    #[tokio::test]
    async fn custom_methods_and_verbs_route() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let method = Method::from_bytes(b"SEARCH")?;
        let echoed = gw.ok_json(method, "/v1/echo:search?name=q", None).await?;
        assert_eq!(echoed["name"], "q");
        gw.stop().await
    }

    #[tokio::test]
    async fn response_body_returns_one_field() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let echoed = gw.ok_json(Method::GET, "/v1/echo/r/nested?nested.value=4", None).await?;
        assert_eq!(echoed, json!({ "innerId": "", "value": 4 }));
        gw.stop().await
    }

    #[tokio::test]
    async fn nested_path_fields_bind() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let echoed = gw.ok_json(Method::GET, "/v1/nested/inner-7", None).await?;
        assert_eq!(echoed["nested"]["innerId"], "inner-7");
        gw.stop().await
    }

    #[tokio::test]
    async fn unannotated_methods_are_reachable_only_when_switched_on() -> Result<()> {
        let settings = HttpSettings { unannotated_routes: true, ..HttpSettings::default() };
        let gw = EchoGateway::start(settings).await?;
        let echoed = gw.ok_json(Method::POST, "/echo.v1.EchoService/Unannotated", Some(r#"{"name": "u"}"#)).await?;
        assert_eq!(echoed["name"], "u");
        gw.stop().await?;

        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let response = gw.http.send(Method::POST, "/echo.v1.EchoService/Unannotated", &[], Some("{}")).await?;
        assert_eq!(response.status, StatusCode::NOT_FOUND);
        gw.stop().await
    }
}

mod headers {
    use super::*;

    #[tokio::test]
    async fn headers_become_metadata_and_metadata_comes_back_as_headers() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let response = gw
            .http
            .send(
                Method::GET,
                "/v1/echo/h",
                &[
                    ("authorization", "Bearer secret"),
                    ("x-request-id", "req-42"),
                    ("grpc-metadata-tenant", "acme"),
                    ("x-forwarded-for", "10.1.1.1"),
                    ("cookie", "never-forwarded"),
                ],
                None,
            )
            .await?;
        assert_eq!(response.status, StatusCode::OK);
        let header = |name: &str| response.header(name).map(str::to_owned);
        assert_eq!(header("grpc-metadata-echo-authorization").as_deref(), Some("Bearer secret"));
        assert_eq!(header("grpc-metadata-echo-x-request-id").as_deref(), Some("req-42"));
        assert_eq!(header("grpc-metadata-echo-tenant").as_deref(), Some("acme"));
        assert_eq!(header("grpc-metadata-echo-x-forwarded-for").as_deref(), Some("10.1.1.1, 127.0.0.1"));
        assert!(header("grpc-metadata-echo-x-forwarded-host").is_some_and(|h| h.starts_with("127.0.0.1:")));
        assert_eq!(header("grpc-metadata-trailer-note").as_deref(), Some("done"), "trailers are mapped too");
        assert!(header("grpc-metadata-echo-cookie").is_none());
        assert!(header("grpc-metadata-grpc-status").is_none());
        gw.stop().await
    }
}

mod streaming {
    use super::*;

    #[tokio::test]
    async fn a_stream_that_fails_mid_way_ends_with_an_error_line() -> Result<()> {
        let gw = EchoGateway::start(HttpSettings::default()).await?;
        let mut ok = gw.http.open(Method::GET, "/v1/echo:stream?number=3&name=s", &[]).await?;
        let lines = ok.lines().await?;
        assert_eq!(lines.len(), 3, "{lines:?}");
        for line in &lines {
            let value: Value = serde_json::from_str(line)?;
            assert_eq!(value["result"]["name"], "s");
        }

        let mut failing = gw.http.open(Method::GET, "/v1/echo:stream?number=2&flag=true", &[]).await?;
        assert_eq!(failing.status, StatusCode::OK);
        let lines = failing.lines().await?;
        assert_eq!(lines.len(), 3, "{lines:?}");
        let last: Value = serde_json::from_str(&lines[2])?;
        assert_eq!(last, json!({ "error": { "code": 13, "message": "boom", "details": [] } }));

        let mut sse =
            gw.http.open(Method::GET, "/v1/echo:stream?number=1&flag=true", &[("accept", "text/event-stream")]).await?;
        let lines = sse.lines().await?;
        let event_at = lines.iter().position(|l| l == "event: error").context("no error event")?;
        let data: Value = serde_json::from_str(lines[event_at + 1].trim_start_matches("data: "))?;
        assert_eq!(data["code"], 13);
        gw.stop().await
    }
}

#[tokio::test]
async fn conflicting_routes_fail_the_build() -> Result<()> {
    let descriptors = compile("conflict.proto")?;
    let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let metrics = Metrics::new()?;
    let forwarder = Forwarder::new(channel, GrpcMetricsLayer::client(Arc::new(MethodTable::empty())));
    let services = registry_of(&descriptors, ConflictStub)?;
    let built = Gateway::build(&services, forwarder, &HttpSettings::default(), &metrics.http);
    match built {
        Err(BuildError::Conflict(conflict)) => {
            assert_eq!(conflict.first, "conflict.v1.ConflictService.First");
            assert_eq!(conflict.second, "conflict.v1.ConflictService.Second");
        }
        Err(other) => return Err(anyhow!("expected a conflict, got {other}")),
        Ok(_) => return Err(anyhow!("conflicting routes were accepted")),
    }
    Ok(())
}

/// Stands in for `conflict.v1.ConflictService`, which is never called.
#[derive(Clone)]
struct ConflictStub;

impl NamedService for ConflictStub {
    const NAME: &'static str = "conflict.v1.ConflictService";
}

impl tower::Service<http::Request<EchoBody>> for ConflictStub {
    type Response = http::Response<EchoBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<EchoBody>) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unimplemented("stub").into_http()))
    }
}

/// Deterministic pseudo-random input, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn text(&mut self, alphabet: &[&str], max: usize) -> String {
        (0..self.below(max + 1)).map(|_| self.pick(alphabet)).collect()
    }
}

#[tokio::test]
async fn arbitrary_requests_always_get_json_and_never_break_the_gateway() -> Result<()> {
    let gw = EchoGateway::start(HttpSettings::default()).await?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let shapes = [
        "/v1/echo/{}",
        "/v1/echo/{}/nested",
        "/v1/files/{}/{}",
        "/v1/shelves/{}/books/{}",
        "/v1/nested/{}",
        "/v1/echo:search",
        "/v1/echo:stream",
        "/echo.v1.EchoService/Unannotated",
        "/{}/{}",
    ];
    let segment_parts = ["a", "Z9", "%2F", "%", "%zz", "%C3%A9", "é", ":", "..", "-", "_", "~", "*"];
    let query_parts = [
        "name",
        "=",
        "&",
        "tags",
        "number",
        "flag",
        "nested.value",
        "1",
        "-",
        "%",
        "true",
        "x.y.z",
        "KIND_A",
        "[]",
        "==",
    ];
    let body_parts = [
        "{",
        "}",
        "\"name\"",
        ":",
        "1",
        ",",
        "[",
        "]",
        "null",
        "\"nested\"",
        "{\"value\":",
        "true",
        "\"x\"",
        "1e999",
        "\\u0000",
    ];
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "SEARCH"];
    let (mut results, mut errors) = (0, 0);
    for case in 0..400 {
        let mut path = rng.pick(&shapes).to_owned();
        while path.contains("{}") {
            let segment = rng.text(&segment_parts, 3);
            path = path.replacen("{}", &segment, 1);
        }
        let query = if rng.below(2) == 0 { String::new() } else { rng.text(&query_parts, 8) };
        let body = rng.text(&body_parts, 10);
        let method = Method::from_bytes(rng.pick(&methods).as_bytes())?;
        let uri = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
        let sent_body = match rng.below(3) {
            0 => None,
            1 => Some("{}"),
            _ => Some(body.as_str()),
        };
        let response = match gw.http.send(method.clone(), &uri, &[], sent_body).await {
            Ok(response) => response,
            Err(e) if e.to_string().contains("invalid uri") || e.to_string().contains("InvalidUri") => continue,
            Err(e) => return Err(e.context(format!("case {case}: {method} {uri} {body:?}"))),
        };
        let ndjson = response.header("content-type") == Some("application/x-ndjson");
        if ndjson {
            for line in response.text().lines() {
                serde_json::from_str::<Value>(line)
                    .with_context(|| format!("case {case}: bad NDJSON line {line:?}"))?;
            }
            continue;
        }
        let body = response.json().with_context(|| format!("case {case}: {method} {uri}"))?;
        if response.status == StatusCode::OK {
            results += 1;
        } else {
            errors += 1;
            assert!(body["code"].is_i64() && body["message"].is_string(), "case {case}: {method} {uri}: {body}");
            assert!(response.status.is_client_error(), "case {case}: {method} {uri} gave {}: {body}", response.status);
        }
    }
    eprintln!("{results} results, {errors} errors");
    assert!(results > 0 && errors > 0, "the inputs exercised too little: {results} results, {errors} errors");
    // Still healthy afterwards.
    let echoed = gw.ok_json(Method::GET, "/v1/echo/after", None).await?;
    assert_eq!(echoed["id"], "after");
    gw.stop().await
}

#[test]
fn echo_descriptors_compile() -> Result<()> {
    let bytes = compile("echo/v1/echo.proto")?;
    let set = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;
    assert!(set.file.iter().any(|f| f.name() == "echo/v1/echo.proto"));
    Ok(())
}
