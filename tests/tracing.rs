//! OpenTelemetry export: with `tracing.otlp_endpoint` set, a call through
//! the gateway is one trace, the gRPC server's span a child of the
//! gateway's, exported over OTLP/gRPC to a collector (an in-process fake
//! one here), and a caller's `traceparent` is continued.

#![cfg(feature = "otel")]

mod support;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use http::Method;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::spawn_app_with;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// Keeps every exported span.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().map_err(|_| tonic::Status::internal("poisoned"))?;
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_call_is_one_trace_exported_over_otlp() -> Result<()> {
    let collector = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (stop_collector, collector_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = collector_stopped.await;
        });
    let server = tokio::spawn(server);

    let tracing_settings = keel::config::TracingSettings {
        otlp_endpoint: endpoint.clone(),
        service_name: "keel-under-test".into(),
        sample_ratio: 1.0,
    };
    let telemetry = keel::telemetry::install(
        &keel::config::LogSettings::default(),
        &tracing_settings,
        Some("info"),
        std::io::sink(),
    )?;

    let app = spawn_app_with(|s| s.tracing = tracing_settings.clone()).await?;
    let http = app.http();
    let fresh = http.get("/v1/users/nobody").await?;
    assert_eq!(fresh.status, http::StatusCode::NOT_FOUND);
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let continued = http
        .send(
            Method::GET,
            "/v1/users/nobody",
            &[("traceparent", &format!("00-{caller_trace}-00f067aa0ba902b7-01"))],
            None,
        )
        .await?;
    assert_eq!(continued.status, http::StatusCode::NOT_FOUND);
    app.stop().await?;
    telemetry.shutdown(std::time::Duration::from_secs(5)).await;

    let spans = collector.spans.lock().map(|s| s.clone()).unwrap_or_default();
    let named = |name: &str| spans.iter().filter(|(_, s)| s.name == name).map(|(_, s)| s.clone()).collect::<Vec<_>>();
    let gateway = named("http");
    // The gRPC spans of the gateway's GetUser calls (the harness also
    // checks health over gRPC directly).
    let grpc: Vec<Span> = named("rpc")
        .into_iter()
        .filter(|s| {
            s.attributes.iter().any(|kv| kv.key == "grpc.method" && format!("{:?}", kv.value).contains("GetUser"))
        })
        .collect();
    assert!(
        gateway.len() >= 2 && grpc.len() >= 2,
        "spans: {:?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    assert!(spans.iter().all(|(service, _)| service.contains("keel-under-test")), "service.name is set");

    // Every gRPC span hangs off a gateway span of the same trace.
    for rpc in &grpc {
        let parent = gateway
            .iter()
            .find(|g| g.span_id == rpc.parent_span_id)
            .context("a gRPC span whose parent is not a gateway span")?;
        assert_eq!(parent.trace_id, rpc.trace_id, "one trace across the hop");
    }
    // The caller's trace is continued rather than replaced.
    let traces: Vec<String> = gateway.iter().map(|g| hex(&g.trace_id)).collect();
    assert!(traces.iter().any(|t| t == caller_trace), "{traces:?}");
    assert!(traces.iter().any(|t| t != caller_trace), "a call without traceparent starts its own trace");

    let _ = stop_collector.send(());
    server.await??;
    Ok(())
}
