//! Serving gateway requests: route match → JSON to protobuf → the call over
//! the shared channel → protobuf to JSON or a framed stream, plus
//! `/healthz` and `/openapi.json`. Every failure is a `google.rpc.Status`
//! body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use prost_reflect::DescriptorPool;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::error::GatewayError;
use super::forward::{Forwarder, Timeouts, request_metadata, response_headers};
use super::route::{Lookup, RouteTable};
use super::routes::Binding;
use super::stream::{FramedStream, Framing};
use super::transcode;
use crate::grpc::middleware::request_id::{self, RequestId};
use crate::metrics::{HttpMetrics, RouteMetrics};

/// Paths the gateway serves itself; annotations may not claim them.
pub(super) const HEALTH_PATH: &str = "/healthz";
pub(super) const OPENAPI_PATH: &str = "/openapi.json";
/// How long `/healthz` waits for the gRPC health service.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The built gateway: routes, the forwarder and the rendered OpenAPI.
pub struct Gateway {
    /// The registry's descriptor pool, for rendering error details.
    pub(super) pool: DescriptorPool,
    /// Every binding, most specific template first.
    pub(super) routes: RouteTable<Arc<Binding>>,
    /// For the `unmatched` series, resolved per method on demand.
    pub(super) http_metrics: HttpMetrics,
    pub(super) health_metrics: RouteMetrics,
    pub(super) openapi_metrics: RouteMetrics,
    /// The one channel into the gRPC server, measured as `grpc_client_*`.
    pub(super) forwarder: Forwarder,
    /// Call deadlines when the request sets none, and their cap.
    pub(super) timeouts: Timeouts,
    /// `http.max_body_size`.
    pub(super) max_body: usize,
    /// How often SSE streams send a keep-alive comment.
    pub(super) sse_keepalive: Duration,
    /// `/openapi.json`, rendered once at startup.
    pub(super) openapi: Bytes,
}

impl Gateway {
    /// The axum router serving the gateway.
    pub fn into_router(self) -> Router {
        Router::new().fallback(dispatch).with_state(Arc::new(self))
    }

    /// Routes a request; also returns the series to record it in.
    async fn handle(&self, request: Request) -> (RouteMetrics, Result<Response, GatewayError>) {
        let path = request.uri().path();
        if request.method() == Method::GET && path == HEALTH_PATH {
            return (self.health_metrics.clone(), Ok(self.healthz(request.uri().query()).await));
        }
        if request.method() == Method::GET && path == OPENAPI_PATH {
            return (self.openapi_metrics.clone(), Ok(json_response(StatusCode::OK, self.openapi.clone())));
        }
        match self.routes.lookup(request.method(), path) {
            Lookup::Found { target, bindings } => (target.metrics.clone(), self.call(target, &bindings, request).await),
            Lookup::MethodNotAllowed(allowed) => {
                let method = request.method().clone();
                (self.unmatched(&method), Err(GatewayError::MethodNotAllowed { method, allowed }))
            }
            Lookup::NotFound => {
                let error = GatewayError::NotFound(format!("{} {path}", request.method()));
                (self.unmatched(request.method()), Err(error))
            }
        }
    }

    /// Series for requests no route matched: one label value, never the
    /// raw path, and known methods only, so cardinality stays bounded.
    fn unmatched(&self, method: &Method) -> RouteMetrics {
        let method = match *method {
            Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::HEAD
            | Method::OPTIONS => method.as_str(),
            _ => "OTHER",
        };
        self.http_metrics.route(method, "unmatched")
    }

    /// Transcodes and forwards one call.
    async fn call(
        &self,
        binding: &Binding,
        bindings: &[(&str, String)],
        request: Request,
    ) -> Result<Response, GatewayError> {
        let (parts, body) = request.into_parts();
        let json = match binding.transcoding.body {
            transcode::BodyRule::None => None,
            _ => self.read_json(&parts.headers, body).await?,
        };
        let message = binding.transcoding.request(bindings, parts.uri.query(), json)?;
        let timeout = self.timeouts.for_request(&parts.headers, binding.streaming)?;
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        let mut call =
            tonic::Request::from_parts(request_metadata(&parts.headers, peer), tonic::Extensions::default(), message);
        call.set_timeout(timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let output = binding.transcoding.output.clone();

        if binding.streaming {
            let framing = Framing::negotiate(&parts.headers);
            let response = tokio::time::timeout_at(
                deadline,
                self.forwarder.server_streaming(binding.grpc_path.clone(), output, call),
            )
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("deadline exceeded"))??;
            let (metadata, upstream, _) = response.into_parts();
            let body = FramedStream::new(upstream, binding.transcoding.clone(), framing, deadline, self.sse_keepalive);
            let mut response = Response::new(Body::from_stream(body));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, framing.content_type());
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Ask reverse proxies not to buffer the stream.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response_headers(&metadata, headers);
            Ok(response)
        } else {
            let response =
                tokio::time::timeout_at(deadline, self.forwarder.unary(binding.grpc_path.clone(), output, call))
                    .await
                    .map_err(|_| tonic::Status::deadline_exceeded("deadline exceeded"))??;
            let (metadata, message, _) = response.into_parts();
            let mut response = json_response(StatusCode::OK, Bytes::from(binding.transcoding.response(&message)?));
            response_headers(&metadata, response.headers_mut());
            Ok(response)
        }
    }

    /// Reads a JSON body within the size limit.
    async fn read_json(&self, headers: &HeaderMap, body: Body) -> Result<Option<serde_json::Value>, GatewayError> {
        if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
            let text = content_type.to_str().unwrap_or_default();
            let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(GatewayError::UnsupportedMediaType(text.to_owned()));
            }
        }
        let declared =
            headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body as u64) {
            return Err(GatewayError::PayloadTooLarge(self.max_body));
        }
        let bytes = match Limited::new(body, self.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::PayloadTooLarge(self.max_body));
            }
            Err(error) => return Err(GatewayError::BodyRead(error.to_string())),
        };
        transcode::parse_body(&bytes)
    }

    /// `GET /healthz[?service=NAME]`: the gRPC health check over HTTP.
    async fn healthz(&self, query: Option<&str>) -> Response {
        let service = query
            .into_iter()
            .flat_map(|q| form_urlencoded::parse(q.as_bytes()))
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let mut client = HealthClient::new(self.forwarder.channel());
        let mut request = tonic::Request::new(HealthCheckRequest { service });
        request.set_timeout(HEALTH_TIMEOUT);
        let outcome = tokio::time::timeout(HEALTH_TIMEOUT, client.check(request)).await;
        match outcome {
            Ok(Ok(response)) => {
                let status = ServingStatus::try_from(response.get_ref().status).unwrap_or(ServingStatus::Unknown);
                let code =
                    if status == ServingStatus::Serving { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                let body = serde_json::json!({ "status": status.as_str_name() });
                json_response(code, Bytes::from(body.to_string()))
            }
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                GatewayError::Upstream(status).into_response(&self.pool)
            }
            Ok(Err(status)) => {
                let mut response = GatewayError::Upstream(status).into_response(&self.pool);
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
            }
            Err(_) => {
                GatewayError::Upstream(tonic::Status::unavailable("health check timed out")).into_response(&self.pool)
            }
        }
    }
}

async fn dispatch(State(gateway): State<Arc<Gateway>>, mut request: Request) -> Response {
    let started = std::time::Instant::now();
    // Every call gets an id here, passed on to gRPC as metadata and echoed
    // back, so one id follows the request through both servers' logs.
    let id = RequestId::from_header(request.headers().get(request_id::HEADER));
    let id_header = HeaderValue::from_str(id.as_str()).ok();
    if let Some(value) = &id_header {
        request.headers_mut().insert(request_id::HEADER, value.clone());
    }
    let span = tracing::info_span!(
        "http",
        http.method = %request.method(),
        request_id = %id.as_str(),
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(&span, request.headers());
    let (metrics, outcome) = tracing::Instrument::instrument(gateway.handle(request), span).await;
    let mut response = outcome.unwrap_or_else(|error| error.into_response(&gateway.pool));
    metrics.record(response.status().as_u16(), started.elapsed().as_secs_f64());
    if let Some(value) = id_header {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
