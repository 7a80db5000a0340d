//! Calls into the gRPC layer stack (in process, or over any tonic-compatible
//! service such as a `Channel` in tests): a codec for dynamic messages,
//! HTTP headers → gRPC metadata on the way in, metadata → `Grpc-Metadata-*`
//! headers on the way out, and the call deadline.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tower::Layer;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use super::error::GatewayError;
use crate::grpc::middleware::deadline::{GRPC_TIMEOUT, parse_grpc_timeout};
use crate::grpc::middleware::logging::X_FORWARDED_FOR;
use crate::grpc::middleware::metrics::{GrpcMetrics, GrpcMetricsLayer};
use crate::grpc::middleware::request_id;
use crate::telemetry::TRACEPARENT;
use crate::telemetry::access::push_ip;

/// What the gateway calls, measured as `grpc_client_*`. Transport errors
/// (only a `Channel` has them) are statuses by then: a concrete error type
/// keeps the tonic client's futures provably `Send`.
pub type GatewayChannel =
    BoxCloneSyncService<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>, Status>;

/// Deadlines for calls made through the gateway.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For unary calls without a `Grpc-Timeout` header.
    pub unary: Duration,
    /// For streaming calls without a `Grpc-Timeout` header.
    pub stream: Duration,
    /// No call may ask for more.
    pub max: Duration,
}

impl Timeouts {
    /// The deadline a request asked for (`Grpc-Timeout`), or the default,
    /// capped by the maximum.
    pub fn for_request(&self, headers: &HeaderMap, streaming: bool) -> Result<Duration, GatewayError> {
        let asked = match headers.get(&GRPC_TIMEOUT) {
            Some(value) => Some(value.to_str().ok().and_then(parse_grpc_timeout).ok_or_else(|| {
                GatewayError::InvalidArgument(format!(
                    "invalid Grpc-Timeout header {value:?}: expected e.g. 2S, 500m or 1M"
                ))
            })?),
            None => None,
        };
        let default = if streaming { self.stream } else { self.unary };
        Ok(asked.unwrap_or(default).min(self.max))
    }
}

/// Forwards calls to the local gRPC server.
#[derive(Clone, Debug)]
pub struct Forwarder {
    /// Cloned per call; clones share one HTTP/2 connection.
    channel: GatewayChannel,
}

impl Forwarder {
    /// Forwards to `service` (the in-process stack, or a `Channel`),
    /// measured by `metrics`.
    pub fn new<S, B>(service: S, metrics: GrpcMetricsLayer) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let measured: GrpcMetrics<S> = metrics.layer(service);
        let service = ServiceBuilder::new()
            .map_err(|error: S::Error| Status::from_error(error.into()))
            .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new))
            .service(measured);
        Self { channel: BoxCloneSyncService::new(service) }
    }

    pub async fn server_streaming(
        &self,
        path: PathAndQuery,
        output: MessageDescriptor,
        request: Request<DynamicMessage>,
    ) -> Result<Response<Streaming<DynamicMessage>>, Status> {
        let mut client = tonic::client::Grpc::new(self.channel.clone());
        client.ready().await.map_err(|e| Status::unavailable(format!("gRPC server unreachable: {e}")))?;
        client.server_streaming(request, path, DynamicCodec { output }).await
    }

    /// The service, for other clients of the same server (health checks).
    pub fn channel(&self) -> GatewayChannel {
        self.channel.clone()
    }
}

// Header names are made at compile time: looked up or inserted by `&str`,
// a name is parsed, checked and hashed each time, and a gateway call made
// about a dozen such lookups (some 2,000 instructions).

/// Request headers that become gRPC metadata, besides `Grpc-Metadata-*`.
static FORWARDED: [HeaderName; 4] =
    [http::header::AUTHORIZATION, request_id::HEADER_NAME, TRACEPARENT, HeaderName::from_static("tracestate")];
const METADATA_PREFIX: &str = "grpc-metadata-";
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The echoed request id's header on the HTTP side, which every gateway
/// response carries: made once rather than prefixed and parsed each time.
const GRPC_METADATA_X_REQUEST_ID: HeaderName = HeaderName::from_static("grpc-metadata-x-request-id");

/// Builds the outgoing metadata from the HTTP request headers; `authority`
/// is the request URI's (HTTP/2 sends `:authority` instead of `Host`).
pub fn request_metadata(headers: &HeaderMap, peer: Option<SocketAddr>, authority: Option<&str>) -> MetadataMap {
    let mut out = HeaderMap::with_capacity(8);
    for name in &FORWARDED {
        if let Some(value) = headers.get(name) {
            out.insert(name.clone(), value.clone());
        }
    }
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_PREFIX) else { continue };
        if is_reserved(key) {
            continue;
        }
        if let Ok(key) = HeaderName::from_bytes(key.as_bytes()) {
            out.append(key, value.clone());
        }
    }
    // X-Forwarded-For: what earlier proxies said (every header line, in
    // order, as grpc-gateway joins them), then the peer we saw.
    let mut chain = String::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()) {
        if !chain.is_empty() {
            chain.push_str(", ");
        }
        chain.push_str(earlier);
    }
    if let Some(peer) = peer {
        if !chain.is_empty() {
            chain.push_str(", ");
        }
        push_ip(&mut chain, peer.ip());
    }
    if !chain.is_empty()
        && let Ok(value) = HeaderValue::from_str(&chain)
    {
        out.insert(X_FORWARDED_FOR, value);
    }
    let host = headers
        .get(&X_FORWARDED_HOST)
        .or_else(|| headers.get(http::header::HOST))
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a).ok()));
    if let Some(host) = host {
        out.insert(X_FORWARDED_HOST, host);
    }
    // The gRPC span is a child of the gateway's, not of the caller's.
    crate::telemetry::propagate(&mut out);
    MetadataMap::from_headers(out)
}

/// Adds a response's metadata as `Grpc-Metadata-*` headers.
pub fn response_headers(metadata: &MetadataMap, headers: &mut HeaderMap) {
    for (name, value) in metadata.as_ref() {
        if is_reserved(name.as_str()) {
            continue;
        }
        if *name == request_id::HEADER_NAME {
            headers.append(GRPC_METADATA_X_REQUEST_ID, value.clone());
            continue;
        }
        let mut prefixed = String::with_capacity(METADATA_PREFIX.len() + name.as_str().len());
        prefixed.push_str(METADATA_PREFIX);
        prefixed.push_str(name.as_str());
        if let Ok(prefixed) = HeaderName::from_bytes(prefixed.as_bytes()) {
            headers.append(prefixed, value.clone());
        }
    }
}

/// Transport and protocol headers that are never copied across.
fn is_reserved(name: &str) -> bool {
    name.starts_with("grpc-")
        || matches!(
            name,
            "content-type" | "content-length" | "te" | "host" | "connection" | "date" | "user-agent" | "trailer"
        )
}

/// Encodes any dynamic message; decodes the method's output type.
struct DynamicCodec {
    output: MessageDescriptor,
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder { output: self.output.clone() }
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.reserve(item.encoded_len());
        item.encode(&mut dst.writer().get_mut()).map_err(|e| Status::internal(format!("cannot encode request: {e}")))
    }
}

struct DynamicDecoder {
    output: MessageDescriptor,
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.output.clone(), bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_the_documented_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.insert("x-request-id", HeaderValue::from_static("r1"));
        headers.insert("grpc-metadata-tenant", HeaderValue::from_static("acme"));
        headers.insert("grpc-metadata-grpc-timeout", HeaderValue::from_static("1S"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.insert("host", HeaderValue::from_static("api.example.com"));
        headers.insert("cookie", HeaderValue::from_static("secret"));
        let peer: SocketAddr = ([192, 0, 2, 7], 5555).into();
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        let md = request_metadata(&headers, Some(peer), None);
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(get("authorization").as_deref(), Some("Bearer t"));
        assert_eq!(get("x-request-id").as_deref(), Some("r1"));
        assert_eq!(get("tenant").as_deref(), Some("acme"));
        assert_eq!(get("x-forwarded-for").as_deref(), Some("10.0.0.1, 10.0.0.2, 192.0.2.7"));
        assert_eq!(get("x-forwarded-host").as_deref(), Some("api.example.com"));
        assert_eq!(get("cookie"), None);
        assert_eq!(get("grpc-timeout"), None);

        let md = request_metadata(&HeaderMap::new(), None, Some("h2.example.com"));
        assert_eq!(md.get("x-forwarded-host").and_then(|v| v.to_str().ok()), Some("h2.example.com"));
    }

    #[test]
    fn timeouts_default_and_cap() {
        let t =
            Timeouts { unary: Duration::from_secs(30), stream: Duration::from_secs(600), max: Duration::from_secs(60) };
        let mut headers = HeaderMap::new();
        assert_eq!(t.for_request(&headers, false).ok(), Some(Duration::from_secs(30)));
        assert_eq!(t.for_request(&headers, true).ok(), Some(Duration::from_secs(60)));
        headers.insert("grpc-timeout", HeaderValue::from_static("2S"));
        assert_eq!(t.for_request(&headers, false).ok(), Some(Duration::from_secs(2)));
        headers.insert("grpc-timeout", HeaderValue::from_static("10M"));
        assert_eq!(t.for_request(&headers, false).ok(), Some(Duration::from_secs(60)));
        headers.insert("grpc-timeout", HeaderValue::from_static("soon"));
        assert!(t.for_request(&headers, false).is_err());
    }
}
