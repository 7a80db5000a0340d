//! The HTTP/JSON gateway: REST routes derived at startup from the
//! `google.api.http` annotations of every registered service, transcoded to
//! gRPC and forwarded over one shared channel, so auth, metrics and logging
//! run once per call, on the gRPC side.
//!
//! Request path: route match ([`route`]) → JSON to protobuf ([`transcode`])
//! → the call ([`forward`]) → protobuf to JSON, or a framed stream
//! ([`stream`]). Every failure is a `google.rpc.Status` body ([`error`]).

pub mod error;
pub mod forward;
pub mod openapi;
pub mod route;
pub mod server;
pub mod stream;
pub mod transcode;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use prost_reflect::{DescriptorPool, ExtensionDescriptor, MethodDescriptor, Value as ProtoValue};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::HttpSettings;
use crate::grpc::middleware::request_id::{self, RequestId};
use crate::metrics::{HttpMetrics, RouteMetrics};
use crate::proto::google::api::HttpRule;
use crate::proto::google::api::http_rule::Pattern;
use error::GatewayError;
use forward::{Forwarder, Timeouts, request_metadata, response_headers};
use route::{Lookup, PathTemplate, RouteTable};
use stream::{FramedStream, Framing};
use transcode::Transcoding;

/// Paths the gateway serves itself; annotations may not claim them.
const HEALTH_PATH: &str = "/healthz";
const OPENAPI_PATH: &str = "/openapi.json";
/// How long `/healthz` waits for the gRPC health service.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the gateway could not be built. Each is a defect in the protos.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read the descriptor set: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("service {0} is not in the descriptor set")]
    UnknownService(String),
    #[error("{method}: {reason}")]
    Binding { method: String, reason: String },
    #[error(transparent)]
    Conflict(#[from] route::RouteConflict),
}

/// One HTTP binding of one gRPC method.
#[derive(Debug)]
pub struct Binding {
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: PathAndQuery,
    pub http_method: Method,
    pub template: PathTemplate,
    pub streaming: bool,
    pub transcoding: Arc<Transcoding>,
    /// 0 for the main binding, then 1.. for `additional_bindings`.
    pub index: usize,
    /// Series labelled by this route's template.
    pub metrics: RouteMetrics,
}

/// The built gateway: routes, the forwarder and the rendered OpenAPI.
pub struct Gateway {
    routes: RouteTable<Arc<Binding>>,
    http_metrics: HttpMetrics,
    health_metrics: RouteMetrics,
    openapi_metrics: RouteMetrics,
    forwarder: Forwarder,
    timeouts: Timeouts,
    max_body: usize,
    sse_keepalive: Duration,
    openapi: Bytes,
}

impl Gateway {
    /// Derives every route of `services` from the descriptors.
    pub fn build(
        descriptors: &[u8],
        services: &[&str],
        forwarder: Forwarder,
        settings: &HttpSettings,
        metrics: &HttpMetrics,
    ) -> Result<Self, BuildError> {
        let pool = DescriptorPool::decode(descriptors)?;
        let http_extension = pool.get_extension_by_name("google.api.http");
        let mut routes = RouteTable::default();
        for name in services {
            let service =
                pool.get_service_by_name(name).ok_or_else(|| BuildError::UnknownService((*name).to_owned()))?;
            for method in service.methods() {
                let fail = |reason: String| BuildError::Binding { method: method.full_name().to_owned(), reason };
                if method.is_client_streaming() {
                    tracing::warn!(method = method.full_name(), "client-streaming methods have no HTTP route");
                    continue;
                }
                let rules = http_rules(&method, http_extension.as_ref());
                let rules = if rules.is_empty() && settings.unannotated_routes {
                    vec![HttpRule {
                        pattern: Some(Pattern::Post(format!("/{}/{}", service.full_name(), method.name()))),
                        body: "*".to_owned(),
                        ..Default::default()
                    }]
                } else {
                    rules
                };
                for (index, rule) in rules.into_iter().enumerate() {
                    let binding = binding(&method, &rule, index, metrics).map_err(fail)?;
                    for reserved in [HEALTH_PATH, OPENAPI_PATH] {
                        if binding.template.matches(reserved).is_some() {
                            return Err(fail(format!(
                                "its route {} shadows the gateway's {reserved}",
                                binding.template
                            )));
                        }
                    }
                    let http_method = binding.http_method.clone();
                    let template = binding.template.clone();
                    routes.insert(http_method, template, Arc::new(binding), |b: &Arc<Binding>| {
                        b.method.full_name().to_owned()
                    })?;
                }
            }
        }
        let openapi = openapi::document(routes.iter().map(|(_, _, b)| b.as_ref()));
        Ok(Self {
            routes,
            http_metrics: metrics.clone(),
            health_metrics: metrics.route("GET", HEALTH_PATH),
            openapi_metrics: metrics.route("GET", OPENAPI_PATH),
            forwarder,
            timeouts: Timeouts {
                unary: settings.default_timeout,
                stream: settings.default_stream_timeout,
                max: settings.max_timeout,
            },
            max_body: settings.max_body_size.0,
            sse_keepalive: settings.sse_keepalive,
            openapi: Bytes::from(openapi.to_string()),
        })
    }

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
            Lookup::Found { target, bindings, .. } => {
                (target.metrics.clone(), self.call(target, &bindings, request).await)
            }
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
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => GatewayError::Upstream(status).into_response(),
            Ok(Err(status)) => {
                let mut response = GatewayError::Upstream(status).into_response();
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
            }
            Err(_) => GatewayError::Upstream(tonic::Status::unavailable("health check timed out")).into_response(),
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
    let mut response = outcome.unwrap_or_else(IntoResponse::into_response);
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

/// The method's `google.api.http` rule and its additional bindings.
fn http_rules(method: &MethodDescriptor, extension: Option<&ExtensionDescriptor>) -> Vec<HttpRule> {
    let Some(extension) = extension else { return Vec::new() };
    let options = method.options();
    if !options.has_extension(extension) {
        return Vec::new();
    }
    let rule = match options.get_extension(extension).as_ref() {
        ProtoValue::Message(message) => message.transcode_to::<HttpRule>().ok(),
        _ => None,
    };
    let Some(mut rule) = rule else { return Vec::new() };
    let additional = std::mem::take(&mut rule.additional_bindings);
    std::iter::once(rule).chain(additional).collect()
}

fn binding(method: &MethodDescriptor, rule: &HttpRule, index: usize, metrics: &HttpMetrics) -> Result<Binding, String> {
    if index > 0 && !rule.additional_bindings.is_empty() {
        return Err("additional_bindings must not nest".to_owned());
    }
    let (http_method, path) = match &rule.pattern {
        Some(Pattern::Get(p)) => (Method::GET, p.as_str()),
        Some(Pattern::Put(p)) => (Method::PUT, p.as_str()),
        Some(Pattern::Post(p)) => (Method::POST, p.as_str()),
        Some(Pattern::Delete(p)) => (Method::DELETE, p.as_str()),
        Some(Pattern::Patch(p)) => (Method::PATCH, p.as_str()),
        Some(Pattern::Custom(custom)) => (
            Method::from_bytes(custom.kind.as_bytes()).map_err(|_| format!("invalid HTTP method {:?}", custom.kind))?,
            custom.path.as_str(),
        ),
        None => return Err("an http rule needs a pattern".to_owned()),
    };
    let template = PathTemplate::parse(path).map_err(|e| e.to_string())?;
    let transcoding = Transcoding::new(
        method.input(),
        method.output(),
        &rule.body,
        &rule.response_body,
        template.field_paths(),
        http_method == Method::PATCH,
    )
    .map_err(|e| e.to_string())?;
    let grpc_path = PathAndQuery::try_from(format!("/{}/{}", method.parent_service().full_name(), method.name()))
        .map_err(|e| e.to_string())?;
    Ok(Binding {
        metrics: metrics.route(http_method.as_str(), template.as_str()),
        method: method.clone(),
        grpc_path,
        http_method,
        template,
        streaming: method.is_server_streaming(),
        transcoding: Arc::new(transcoding),
        index,
    })
}

pub use server::serve;
