//! The service registry, proven with a second service: a test-only
//! `echo.v1.EchoService` (one unary and one server-streaming RPC, both
//! annotated for HTTP) registered with one line, and no gateway, metrics,
//! health or reflection code written for it. It gets REST routes, OpenAPI
//! paths, pre-initialised metric series, a health status, a reflection
//! entry and auth. A proto that is only in the pool (no service registered
//! for it) gets none of these.

mod support;

use anyhow::{Result, anyhow};
use http::{Method, StatusCode};
use prost_reflect::DescriptorPool;
use support::echo::EchoBackend;
use support::{TestApp, compile_test_proto, sample, spawn_app_prepared};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

const TOKEN: &str = "registry-token";
const BEARER: &str = "Bearer registry-token";

/// The app with auth on, plus the echo service registered in one line, and
/// the conflict protos added to the pool without a service (as a proto the
/// app only calls as a client would be).
async fn spawn_with_echo() -> Result<TestApp> {
    let echo = compile_test_proto("echo/v1/echo.proto")?;
    let client_only = compile_test_proto("conflict.proto")?;
    let pool = DescriptorPool::decode(echo.as_slice())?;
    spawn_app_prepared(
        |settings| settings.auth.tokens = vec![TOKEN.to_owned()],
        move |services, _| {
            services.add_descriptors(&client_only);
            services.add_descriptors(&echo).add(EchoBackend { pool });
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn rest_routes_and_openapi_come_from_the_annotations() -> Result<()> {
    let app = spawn_with_echo().await?;
    let http = app.http();
    let auth = [("authorization", BEARER), ("content-type", "application/json")];

    let unary = http.send(Method::POST, "/v1/echo/abc", &auth, Some(r#"{"name": "n1", "number": 3}"#)).await?;
    assert_eq!(unary.status, StatusCode::OK, "{}", unary.text());
    let body = unary.json()?;
    assert_eq!(body["id"], "abc");
    assert_eq!(body["name"], "n1");
    assert_eq!(body["number"], 3);

    let mut stream = http.open(Method::GET, "/v1/echo:stream?id=s&number=2", &auth).await?;
    let lines = stream.lines().await?;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let frame: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(frame["result"]["id"], "s", "{line}");
    }

    let openapi = http.get("/openapi.json").await?.json()?;
    let paths = openapi["paths"].as_object().ok_or_else(|| anyhow!("no paths"))?;
    for path in ["/v1/echo/{id}", "/v1/echo:stream", "/v1/users/{user_id}"] {
        assert!(paths.contains_key(path), "{path} missing from {:?}", paths.keys().collect::<Vec<_>>());
    }
    // The client-only proto's annotated methods are neither routed nor
    // documented.
    assert!(!paths.keys().any(|p| p.starts_with("/v1/things")), "{:?}", paths.keys().collect::<Vec<_>>());
    let unrouted = http.get("/v1/things/1").await?;
    assert_eq!(unrouted.status, StatusCode::NOT_FOUND, "{}", unrouted.text());
    app.stop().await
}

#[tokio::test]
async fn metric_series_exist_at_zero_before_the_first_call() -> Result<()> {
    let app = spawn_with_echo().await?;
    let scrape = app.scrape().await?;
    for (side, grpc_type, method) in [
        ("grpc_server", "unary", "Echo"),
        ("grpc_server", "server_stream", "EchoStream"),
        ("grpc_client", "unary", "Echo"),
        ("grpc_client", "server_stream", "EchoStream"),
    ] {
        let labels = [("grpc_service", "echo.v1.EchoService"), ("grpc_method", method), ("grpc_type", grpc_type)];
        assert_eq!(sample(&scrape, &format!("{side}_started_total"), &labels), Some(0.0), "{side} {method}");
        let handled = [labels[0], labels[1], labels[2], ("grpc_code", "Unauthenticated")];
        assert_eq!(sample(&scrape, &format!("{side}_handled_total"), &handled), Some(0.0), "{side} {method}");
    }
    // A REST route of its own, labelled by its template.
    let route = [("route", "/v1/echo/{id}"), ("method", "POST"), ("code", "200")];
    assert_eq!(sample(&scrape, "http_requests_total", &route), Some(0.0));

    let mut client = tonic::client::Grpc::new(app.channel()?);
    client.ready().await?;
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert("authorization", BEARER.parse()?);
    let path = http::uri::PathAndQuery::from_static("/echo.v1.EchoService/Echo");
    client.unary::<(), (), _>(request, path, tonic_prost::ProstCodec::default()).await?;
    let scrape = app.scrape().await?;
    let ok =
        [("grpc_service", "echo.v1.EchoService"), ("grpc_method", "Echo"), ("grpc_type", "unary"), ("grpc_code", "OK")];
    assert_eq!(sample(&scrape, "grpc_server_handled_total", &ok), Some(1.0));
    app.stop().await
}

#[tokio::test]
async fn health_reports_it_and_flips_it_with_the_rest() -> Result<()> {
    let app = spawn_with_echo().await?;
    let mut health = app.health()?;
    let ask = |service: &str| HealthCheckRequest { service: service.to_owned() };
    let status = health.check(ask("echo.v1.EchoService")).await?.into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    // Health is open even with auth on.
    let missing = health.check(ask("conflict.v1.ConflictService")).await.err().map(|s| s.code());
    assert_eq!(missing, Some(Code::NotFound), "a client-only proto has no health status");

    app.health_state.set_not_serving().await;
    let status = health.check(ask("echo.v1.EchoService")).await?.into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let gateway = app.http().get("/healthz?service=echo.v1.EchoService").await?;
    assert_eq!(gateway.status, StatusCode::SERVICE_UNAVAILABLE);
    app.stop().await
}

#[tokio::test]
async fn reflection_lists_it_in_both_versions_and_not_client_only_protos() -> Result<()> {
    use tonic_reflection::pb::{v1, v1alpha};

    let app = spawn_with_echo().await?;
    let list_v1 = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel()?);
    let mut responses = client.server_reflection_info(tokio_stream::iter([list_v1])).await?.into_inner();
    let names_v1: Vec<String> = match responses.message().await?.and_then(|r| r.message_response) {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => return Err(anyhow!("expected a service list, got {other:?}")),
    };
    drop(responses);

    let list_v1alpha = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel()?);
    let mut responses = client.server_reflection_info(tokio_stream::iter([list_v1alpha])).await?.into_inner();
    let names_v1alpha: Vec<String> = match responses.message().await?.and_then(|r| r.message_response) {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => return Err(anyhow!("expected a service list, got {other:?}")),
    };
    drop(responses);

    let mut sorted_v1 = names_v1.clone();
    sorted_v1.sort();
    let mut sorted_v1alpha = names_v1alpha.clone();
    sorted_v1alpha.sort();
    assert_eq!(sorted_v1, sorted_v1alpha, "both versions list the same services");
    for expected in [
        "echo.v1.EchoService",
        "user.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names_v1.iter().any(|n| n == expected), "{expected} missing from {names_v1:?}");
    }
    assert!(!names_v1.iter().any(|n| n.starts_with("conflict.")), "client-only proto listed: {names_v1:?}");
    app.stop().await
}

#[tokio::test]
async fn auth_applies_to_it_on_grpc_and_rest() -> Result<()> {
    let app = spawn_with_echo().await?;
    let json = [("content-type", "application/json")];
    let refused = app.http().send(Method::POST, "/v1/echo/abc", &json, Some("{}")).await?;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.text());
    assert_eq!(refused.json()?["code"], Code::Unauthenticated as i32);

    let mut client = tonic::client::Grpc::new(app.channel()?);
    client.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/echo.v1.EchoService/Echo");
    let denied = client.unary::<(), (), _>(tonic::Request::new(()), path, tonic_prost::ProstCodec::default()).await;
    assert_eq!(denied.err().map(|s| s.code()), Some(Code::Unauthenticated));
    app.stop().await
}

#[tokio::test]
async fn a_service_without_descriptors_fails_the_build_naming_it() -> Result<()> {
    let pool = DescriptorPool::decode(compile_test_proto("echo/v1/echo.proto")?.as_slice())?;
    let built = keel::app::App::build_with(support::test_settings(), move |services, _| {
        // The descriptors are never added.
        services.add(EchoBackend { pool });
        Ok(())
    })
    .await;
    match built {
        Err(error) => {
            let text = error.to_string();
            assert!(text.contains("registry"), "{text}");
            let cause = std::error::Error::source(&error).map(ToString::to_string).unwrap_or_default();
            assert!(cause.contains("echo.v1.EchoService"), "{cause}");
        }
        Ok(_) => return Err(anyhow!("a service without descriptors was accepted")),
    }
    Ok(())
}
