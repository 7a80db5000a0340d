//! Serving gateway requests: route match → JSON to protobuf → the call over
//! the shared channel → protobuf to JSON or a framed stream, plus
//! `/healthz` and `/openapi.json`. Every failure is a `google.rpc.Status`
//! body. gRPC-Web requests are recognised by their Content-Type first and
//! go to [`super::grpc_web`]; CORS, when configured, sits in front of all
//! of it ([`super::cors`]).
//!
//! As in grpc-gateway: `HEAD` is answered by every `GET` route; a body
//! with no Content-Type or an unknown one is read as JSON; a handler picks
//! the success status with `x-http-code` response metadata; a unary call's
//! trailers go out as `Grpc-Trailer-*` HTTP trailers when the client sent
//! `TE: trailers` (otherwise they are folded into the headers).

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

use http::HeaderName;
use http_body::Frame;
use http_body_util::StreamBody;
use tonic::metadata::MetadataMap;

use super::error::GatewayError;
use super::forward::{Forwarder, Timeouts, request_metadata, response_headers};
use super::grpc_web::GrpcWeb;
use super::route::{self, Lookup, RouteTable};
use super::routes::Binding;
use super::stream::{FramedStream, Framing};
use super::transcode::{self, RequestBody};
use crate::grpc::middleware::request_id::{self, RequestId};
use crate::metrics::{HttpMetrics, RouteMetrics};

/// Paths the gateway serves itself; annotations may not claim them.
pub(super) const HEALTH_PATH: &str = "/healthz";
pub(super) const OPENAPI_PATH: &str = "/openapi.json";
/// How long `/healthz` waits for the gRPC health service.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Response metadata that sets the success status; consumed, not forwarded.
const HTTP_CODE_KEY: &str = "x-http-code";
/// Prefix of trailers sent as HTTP trailers (grpc-gateway's
/// `MetadataTrailerPrefix`).
const TRAILER_PREFIX: &str = "grpc-trailer-";

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
    /// `http.body_read_timeout`, enforced by the server's body deadline;
    /// named in the 408 it causes.
    pub(super) body_read_timeout: Duration,
    /// How often SSE streams send a keep-alive comment.
    pub(super) sse_keepalive: Duration,
    /// `/openapi.json`, rendered once at startup.
    pub(super) openapi: Bytes,
    /// `http.permanent_headers`: each request header with the
    /// `grpcgateway-` metadata key it is sent as.
    pub(super) permanent_headers: Vec<(HeaderName, HeaderName)>,
    /// gRPC-Web, translated onto the same gRPC server.
    pub(super) grpc_web: GrpcWeb,
    pub(super) grpc_web_metrics: RouteMetrics,
    /// `http.cors`, when any origin is allowed.
    pub(super) cors: Option<tower_http::cors::CorsLayer>,
}

impl Gateway {
    /// The axum router serving the gateway.
    pub fn into_router(mut self) -> Router {
        let cors = self.cors.take();
        let router = Router::new()
            .fallback(dispatch)
            .with_state(Arc::new(self))
            .layer(tower::util::MapResponseLayer::new(security_headers));
        match cors {
            Some(cors) => router.layer(cors),
            None => router,
        }
    }

    /// Routes a request; also returns the series to record it in.
    async fn handle(&self, request: Request) -> (RouteMetrics, Result<Response, GatewayError>) {
        if GrpcWeb::accepts(request.headers()) {
            return (self.grpc_web_metrics.clone(), Ok(self.grpc_web.call(request).await));
        }
        let path = request.uri().path();
        // HEAD is GET without the body, as grpc-gateway's mux does.
        let head = request.method() == Method::HEAD;
        let method = if head { Method::GET } else { request.method().clone() };
        if method == Method::GET && path == HEALTH_PATH {
            return (self.health_metrics.clone(), Ok(without_body(head, self.healthz(request.uri().query()).await)));
        }
        if method == Method::GET && path == OPENAPI_PATH {
            let response = json_response(StatusCode::OK, self.openapi.clone());
            return (self.openapi_metrics.clone(), Ok(without_body(head, response)));
        }
        // A broken escape is a bad request, not a path that matches nothing.
        if let Err(reason) = route::check_escapes(path) {
            return (self.unmatched(request.method()), Err(GatewayError::InvalidArgument(reason)));
        }
        match self.routes.lookup(&method, path) {
            Lookup::Found { target, bindings } => {
                let outcome = self.call(target, &bindings, request).await;
                (target.metrics.clone(), outcome.map(|r| without_body(head, r)))
            }
            Lookup::MethodNotAllowed(mut allowed) => {
                if allowed.contains(&Method::GET) {
                    allowed.push(Method::HEAD);
                }
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
        let body = match binding.transcoding.body {
            transcode::BodyRule::None => RequestBody::Json(None),
            _ => self.read_body(&parts.headers, body, binding.transcoding.raw_request).await?,
        };
        let message = binding.transcoding.request_from(bindings, parts.uri.query(), body)?;
        let timeout = self.timeouts.for_request(&parts.headers, binding.streaming)?;
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        let metadata = self.metadata(&parts.headers, peer, parts.uri.authority().map(|a| a.as_str()));
        let mut extensions = tonic::Extensions::default();
        // The mTLS identity of the HTTP client reaches auth and handlers as
        // it would on a gRPC connection.
        if let Some(client) = parts.extensions.get::<std::sync::Arc<crate::tls::ClientIdentity>>() {
            extensions.insert(client.clone());
        }
        let mut call = tonic::Request::from_parts(metadata, extensions, message);
        call.set_timeout(timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let output = binding.transcoding.output.clone();
        let timed_out = |_| tonic::Status::deadline_exceeded("deadline exceeded");

        // Both kinds are called as a server stream, which keeps the
        // response headers apart from the trailers. A trailers-only answer
        // (the handler failed before sending anything) is an error here, so
        // it gets its HTTP status, for streams as for unary calls.
        let response =
            tokio::time::timeout_at(deadline, self.forwarder.server_streaming(binding.grpc_path.clone(), output, call))
                .await
                .map_err(timed_out)??;
        let (mut metadata, mut upstream, _) = response.into_parts();
        let status = success_status(&mut metadata);

        let with_headers = |status: tonic::Status| GatewayError::Upstream(merge_metadata(&metadata, status));
        if binding.streaming {
            let raw = binding.transcoding.raw_response;
            let framing = if raw { Framing::Raw } else { Framing::negotiate(&parts.headers) };
            let mut content_type = framing.content_type();
            let mut first = None;
            if raw {
                // An HttpBody stream's Content-Type is its first message's,
                // so that message is awaited before the headers go out.
                first = tokio::time::timeout_at(deadline, upstream.message())
                    .await
                    .map_err(timed_out)?
                    .map_err(with_headers)?;
                if let Some(message) = &first {
                    let (declared, _) = binding.transcoding.raw_response(message)?;
                    content_type = HeaderValue::from_str(&declared).ok();
                }
            }
            let body = FramedStream::new(upstream, binding.transcoding.clone(), framing, deadline, self.sse_keepalive)
                .starting_with(first);
            let mut response = Response::new(Body::from_stream(body));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            if let Some(content_type) = content_type {
                headers.insert(header::CONTENT_TYPE, content_type);
            }
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Ask reverse proxies not to buffer the stream.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response_headers(&metadata, headers);
            return Ok(response);
        }

        let message = tokio::time::timeout_at(deadline, upstream.message())
            .await
            .map_err(timed_out)?
            .map_err(with_headers)?
            .ok_or_else(|| with_headers(tonic::Status::internal("the server sent no response message")))?;
        let trailers = tokio::time::timeout_at(deadline, upstream.trailers())
            .await
            .map_err(timed_out)?
            .map_err(with_headers)?
            .unwrap_or_default();
        let mut response = if binding.transcoding.raw_response {
            let (content_type, data) = binding.transcoding.raw_response(&message)?;
            let mut response = (status, data).into_response();
            if let Ok(value) = HeaderValue::from_str(&content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            response
        } else if status == StatusCode::NO_CONTENT {
            Response::builder().status(status).body(Body::empty()).unwrap_or_default()
        } else {
            json_response(status, Bytes::from(binding.transcoding.response(&message)?))
        };
        response_headers(&metadata, response.headers_mut());
        if accepts_trailers(&parts.headers) && status != StatusCode::NO_CONTENT {
            Ok(with_http_trailers(response, &trailers))
        } else {
            response_headers(&trailers, response.headers_mut());
            Ok(response)
        }
    }

    /// The call's metadata: the mapped headers (see [`request_metadata`])
    /// and the permanent headers as `grpcgateway-*`, as grpc-gateway's
    /// `DefaultHeaderMatcher` sends them.
    fn metadata(&self, headers: &HeaderMap, peer: Option<SocketAddr>, authority: Option<&str>) -> MetadataMap {
        let mut out = request_metadata(headers, peer, authority).into_headers();
        // One walk over the request's headers, each checked against the
        // list: a request carries a handful of headers, and looking up each
        // of the 21 listed names instead hashed and probed the map 21 times
        // a call (the walk costs about 1,600 instructions less).
        for (name, value) in headers {
            if let Some((_, key)) = self.permanent_headers.iter().find(|(permanent, _)| permanent == name) {
                out.append(key.clone(), value.clone());
            }
        }
        MetadataMap::from_headers(out)
    }

    /// Reads a request body within the size limit: raw for a
    /// `google.api.HttpBody` binding, otherwise as JSON whatever the
    /// Content-Type says, as grpc-gateway does; bad JSON is a 400 naming
    /// the expected type.
    async fn read_body(&self, headers: &HeaderMap, body: Body, raw: bool) -> Result<RequestBody, GatewayError> {
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
            Err(error) if caused_by::<tower_http::timeout::TimeoutError>(&*error) => {
                return Err(GatewayError::BodyTimeout(self.body_read_timeout));
            }
            Err(error) => return Err(GatewayError::BodyRead(format!("{error:#}"))),
        };
        if raw {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            return Ok(RequestBody::Raw { content_type: content_type.to_owned(), data: bytes });
        }
        transcode::parse_body(&bytes).map(RequestBody::Json)
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
                if status != ServingStatus::Serving {
                    // A google.rpc.Status like every other failure: UNAVAILABLE.
                    let status = tonic::Status::unavailable(format!("not serving: {}", status.as_str_name()));
                    return GatewayError::Upstream(status).into_response(&self.pool);
                }
                let body = serde_json::json!({ "status": status.as_str_name() });
                json_response(StatusCode::OK, Bytes::from(body.to_string()))
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
    let id = RequestId::from_header(request.headers().get(&request_id::HEADER_NAME));
    let id_header = id.header().clone();
    request.headers_mut().insert(request_id::HEADER_NAME, id_header.clone());
    // A span only when something reads spans (see `telemetry::call_spans`);
    // the gateway's JSON log lines name the call from its `Caller`.
    let span = if crate::telemetry::call_spans() {
        let span = tracing::info_span!(
            "http",
            http.method = %request.method(),
            request_id = %id.as_str(),
            trace_id = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, request.headers());
        span
    } else {
        tracing::Span::none()
    };
    let caller =
        request_id::Caller { request_id: id, method: None, deadline: None, traceparent: None, authorization: None };
    let handled = request_id::scope(caller, gateway.handle(request));
    let (metrics, outcome) = tracing::Instrument::instrument(handled, span).await;
    let mut response = outcome.unwrap_or_else(|error| error.into_response(&gateway.pool));
    metrics.record(response.status().as_u16(), started.elapsed().as_secs_f64());
    response.headers_mut().insert(request_id::HEADER_NAME, id_header);
    response
}

/// The success status a handler chose with `x-http-code` metadata (removed
/// here, so it is not forwarded), or 200.
fn success_status(metadata: &mut MetadataMap) -> StatusCode {
    let chosen = metadata.remove(HTTP_CODE_KEY).and_then(|value| {
        let code = value.to_str().ok()?.trim().parse::<u16>().ok()?;
        StatusCode::from_u16(code).ok().filter(|s| s.is_success() || s.is_redirection())
    });
    chosen.unwrap_or(StatusCode::OK)
}

/// An error status with the response headers' metadata too, so they reach
/// the client as `Grpc-Metadata-*` on an error as on success.
fn merge_metadata(headers: &MetadataMap, mut status: tonic::Status) -> tonic::Status {
    let mut all = headers.clone().into_headers();
    for (name, value) in status.metadata().as_ref() {
        all.append(name.clone(), value.clone());
    }
    *status.metadata_mut() = MetadataMap::from_headers(all);
    status
}

fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("trailers"))
}

/// Re-sends a complete response with its gRPC trailers as HTTP trailers
/// named `Grpc-Trailer-*`, announced in a `Trailer` header (HTTP/1.1 sends
/// only announced trailers).
fn with_http_trailers(response: Response, trailers: &MetadataMap) -> Response {
    let mut fields = HeaderMap::new();
    response_headers(trailers, &mut fields);
    let mut renamed = HeaderMap::new();
    for (name, value) in &fields {
        let key = name.as_str().trim_start_matches("grpc-metadata-");
        if let Ok(name) = HeaderName::from_bytes(format!("{TRAILER_PREFIX}{key}").as_bytes()) {
            renamed.append(name, value.clone());
        }
    }
    if renamed.is_empty() {
        return response;
    }
    let announced = renamed.keys().map(HeaderName::as_str).collect::<Vec<_>>().join(", ");
    let (mut parts, body) = response.into_parts();
    if let Ok(value) = HeaderValue::from_str(&announced) {
        parts.headers.insert(header::TRAILER, value);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let frames = async_stream_frames(body, renamed);
    Response::from_parts(parts, Body::new(StreamBody::new(frames)))
}

/// The body's data, then one trailers frame.
fn async_stream_frames(
    body: Body,
    trailers: HeaderMap,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, axum::Error>> + Send {
    let data = body.into_data_stream();
    let data = tokio_stream::StreamExt::map(data, |chunk| chunk.map(Frame::data));
    tokio_stream::StreamExt::chain(data, tokio_stream::once(Ok(Frame::trailers(trailers))))
}

/// For HEAD: the same status and headers, no body; the length the body
/// would have had is kept when it is known.
fn without_body(head: bool, response: Response) -> Response {
    if !head {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    if let Some(length) = http_body::Body::size_hint(&body).exact()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Response::from_parts(parts, Body::empty())
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// True when `T` is anywhere in `error`'s cause chain (a body error arrives
/// wrapped by axum and by the size limit).
fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// `X-Content-Type-Options: nosniff` and `Cache-Control: no-store` on
/// every response that does not set its own: API answers (and errors) are
/// per caller and must neither be sniffed into HTML nor cached by a shared
/// proxy. Streams set `no-cache` themselves, and a handler's headers win.
fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key(header::X_CONTENT_TYPE_OPTIONS) {
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}
