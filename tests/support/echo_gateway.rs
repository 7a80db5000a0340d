//! The test-only echo backend with the real gateway in front of it, both on
//! ephemeral ports, for the binding and conformance tests.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use http::{Method, StatusCode};
use keel::config::HttpSettings;
use keel::gateway::Gateway;
use keel::gateway::forward::Forwarder;
use keel::grpc::middleware::method::MethodTable;
use keel::grpc::middleware::metrics::GrpcMetricsLayer;
use keel::metrics::Metrics;
use prost_reflect::DescriptorPool;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;

use super::echo::EchoBackend;
use super::http::HttpClient;

/// A registry holding only `service`, with the test protos' descriptors.
pub fn registry_of<S: keel::registry::GrpcService>(descriptors: &[u8], service: S) -> Result<keel::registry::Services> {
    let mut registry = keel::registry::ServiceRegistry::new()?;
    registry.add_descriptors(descriptors).add(service);
    Ok(registry.finish()?)
}

/// The echo backend and a gateway in front of it, both on ephemeral ports.
pub struct EchoGateway {
    pub http: HttpClient,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EchoGateway {
    pub async fn start(settings: HttpSettings) -> Result<Self> {
        let descriptors = super::compile_test_proto("echo/v1/echo.proto")?;
        let pool = DescriptorPool::decode(descriptors.as_slice())?;

        let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
        let grpc_addr = grpc_listener.local_addr()?;
        let (grpc_stop, grpc_stopped) = oneshot::channel::<()>();
        let backend = tonic::transport::Server::builder()
            .add_service(EchoBackend { pool: pool.clone() })
            .serve_with_incoming_shutdown(TcpIncoming::from(grpc_listener), async {
                let _ = grpc_stopped.await;
            });
        let grpc_task = tokio::spawn(async move {
            let _ = backend.await;
        });

        let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))?.connect_lazy();
        let metrics = Metrics::new()?;
        let forwarder = Forwarder::new(channel, GrpcMetricsLayer::client(Arc::new(MethodTable::empty())));
        let services = registry_of(&descriptors, EchoBackend { pool: pool.clone() })?;
        let gateway = Gateway::build(&services, forwarder, &settings, &metrics.http)?;
        let limits = keel::http_server::HttpLimits::gateway(&settings, &metrics);
        let http_listener = TcpListener::bind("127.0.0.1:0").await?;
        let http_addr: SocketAddr = http_listener.local_addr()?;
        let (http_stop, http_stopped) = oneshot::channel::<()>();
        let http_task = tokio::spawn(async move {
            let _ = keel::http_server::serve(http_listener, gateway.into_router(), limits, async {
                let _ = http_stopped.await;
            })
            .await;
        });
        Ok(Self {
            http: HttpClient::new(http_addr),
            stops: vec![http_stop, grpc_stop],
            tasks: vec![http_task, grpc_task],
        })
    }

    pub async fn stop(self) -> Result<()> {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for task in self.tasks {
            tokio::time::timeout(std::time::Duration::from_secs(10), task).await??;
        }
        Ok(())
    }

    pub async fn ok_json(&self, method: Method, path: &str, body: Option<&str>) -> Result<Value> {
        let response = self.http.send(method.clone(), path, &[], body).await?;
        if response.status != StatusCode::OK {
            return Err(anyhow!("{method} {path}: {} {}", response.status, response.text()));
        }
        response.json()
    }
}
