//! gRPC-Web on the gateway port, for browsers: requests whose Content-Type
//! is `application/grpc-web*` are translated by tonic-web into plain gRPC
//! and sent into the gRPC server through the gateway's channel, so they run
//! the same layer stack as any gRPC call (auth, limits, metrics, logging)
//! and reach every registered service, unary and server streaming.
//!
//! This is the only place that knows how gRPC-Web reaches the server: when
//! the gateway calls the layer stack directly instead of over a channel,
//! only [`GrpcWeb::new`]'s argument changes.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Request, header};
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower::{Layer, ServiceExt};

use super::forward::GatewayChannel;

/// Serves gRPC-Web by translating it onto the gRPC server.
#[derive(Clone)]
pub struct GrpcWeb {
    /// tonic-web's translation, over the channel into the gRPC server.
    service: GrpcWebService<GatewayChannel>,
}

impl GrpcWeb {
    pub fn new(channel: GatewayChannel) -> Self {
        Self { service: GrpcWebLayer::new().layer(channel) }
    }

    /// Whether a request is gRPC-Web; checked before any JSON route, since
    /// its paths are the `POST /{package.Service}/{Method}` form.
    pub fn accepts(headers: &HeaderMap) -> bool {
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/grpc-web"))
    }

    /// Answers one gRPC-Web call. Failing to reach the server is a gRPC-Web
    /// UNAVAILABLE, in the status headers a trailers-only response carries.
    pub async fn call(&self, request: Request<Body>) -> Response {
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        match self.service.clone().oneshot(request).await {
            Ok(response) => response.map(Body::new),
            Err(error) => {
                tracing::warn!(error = %error, "gRPC-Web call could not reach the gRPC server");
                let mut response = tonic::Status::unavailable("the gRPC server is unreachable").into_http::<Body>();
                let content_type = content_type.unwrap_or(HeaderValue::from_static("application/grpc-web+proto"));
                response.headers_mut().insert(header::CONTENT_TYPE, content_type);
                response
            }
        }
    }
}
