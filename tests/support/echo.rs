//! A test-only `echo.v1.EchoService` backend (tests/proto/echo/v1), written
//! against raw HTTP/2 so it needs no generated code: every call answers with
//! its own request, so what comes back shows what the caller sent.
//!
//! Request metadata steers it, so the gateway's handling of answers can be
//! checked too: `echo-status: N` fails the call trailers-only with code N
//! (and `echo-details: all` attaches error details), `echo-http-code: N`
//! sets `x-http-code` response metadata. What auth left in the request
//! extensions comes back too: `echo-jwt-sub`/`echo-jwt-scopes` from the JWT
//! claims, `echo-client` from the mTLS identity.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::server::NamedService;

/// A gRPC backend for any EchoService method, written against raw HTTP/2
/// so it needs no generated code.
#[derive(Clone)]
pub struct EchoBackend {
    /// Holds `echo.v1.EchoMessage`, to read a stream request's fields.
    pub pool: DescriptorPool,
}

impl NamedService for EchoBackend {
    const NAME: &'static str = "echo.v1.EchoService";
}

pub type EchoBody = tonic::body::Body;

impl tower::Service<http::Request<EchoBody>> for EchoBackend {
    type Response = http::Response<EchoBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<EchoBody>) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let payload = bytes.get(5..).map(Bytes::copy_from_slice).unwrap_or_default();

            if let Some(code) = parts.headers.get("echo-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()) {
                return Ok(failure(code, parts.headers.contains_key("echo-details")));
            }
            let mut response = http::Response::builder().header("content-type", "application/grpc");
            for (name, value) in &parts.headers {
                let name = name.as_str();
                if name.starts_with("x-")
                    || name.starts_with("grpcgateway-")
                    || name == "authorization"
                    || name == "tenant"
                {
                    response = response.header(format!("echo-{name}"), value);
                }
            }
            if let Some(claims) = parts.extensions.get::<std::sync::Arc<keel::auth::Claims>>() {
                response = response
                    .header("echo-jwt-sub", claims.subject.clone().unwrap_or_default())
                    .header("echo-jwt-scopes", claims.scopes.join(" "));
            }
            if let Some(client) = parts.extensions.get::<std::sync::Arc<keel::tls::ClientIdentity>>() {
                response = response.header("echo-client", client.name());
            }
            if let Some(code) = parts.headers.get("echo-http-code") {
                response = response.header("x-http-code", code);
            }
            let mut frames: Vec<Frame<Bytes>> = Vec::new();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            if parts.uri.path().ends_with("/EchoStream") || parts.uri.path().ends_with("/Download") {
                let message = pool
                    .get_message_by_name("echo.v1.EchoMessage")
                    .and_then(|desc| DynamicMessage::decode(desc, payload.clone()).ok());
                let number = message.as_ref().and_then(|m| m.get_field_by_name("number")).and_then(|v| v.as_i32());
                let fail = message.as_ref().and_then(|m| m.get_field_by_name("flag")).and_then(|v| v.as_bool());
                for _ in 0..number.unwrap_or(0).clamp(0, 10) {
                    frames.push(Frame::data(grpc_frame(&payload)));
                }
                if fail == Some(true) {
                    trailers.insert("grpc-status", HeaderValue::from_static("13"));
                    trailers.insert("grpc-message", HeaderValue::from_static("boom"));
                }
            } else {
                frames.push(Frame::data(grpc_frame(&payload)));
                trailers.insert("trailer-note", HeaderValue::from_static("done"));
            }
            frames.push(Frame::trailers(trailers));
            let stream = tokio_stream::iter(frames.into_iter().map(Ok::<_, Infallible>));
            let body = EchoBody::new(StreamBody::new(stream));
            Ok(response.body(body).unwrap_or_default())
        })
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct FieldViolation {
    #[prost(string, tag = "1")]
    field: String,
    #[prost(string, tag = "2")]
    description: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BadRequest {
    #[prost(message, repeated, tag = "1")]
    field_violations: Vec<FieldViolation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// A trailers-only failure with `x-echo: failed` metadata and, with
/// `details`, a BadRequest, an unknown type, an Empty and a Struct.
fn failure(code: i32, details: bool) -> http::Response<EchoBody> {
    use prost::Message;
    let any = |type_name: &str, value: Vec<u8>| prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value,
    };
    let attached = if details {
        let bad = BadRequest {
            field_violations: vec![FieldViolation { field: "name".into(), description: "too short".into() }],
        };
        let structure = prost_types::Struct {
            fields: [("a".to_owned(), prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(1.0)) })]
                .into_iter()
                .collect(),
        };
        vec![
            any("google.rpc.BadRequest", bad.encode_to_vec()),
            any("acme.v1.Unknown", vec![1, 2, 3]),
            any("google.protobuf.Empty", Vec::new()),
            any("google.protobuf.Struct", structure.encode_to_vec()),
        ]
    } else {
        Vec::new()
    };
    let encoded = RpcStatus { code, message: "echo-status".into(), details: attached }.encode_to_vec();
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("x-echo", tonic::metadata::MetadataValue::from_static("failed"));
    tonic::Status::with_details_and_metadata(tonic::Code::from(code), "echo-status", encoded.into(), metadata)
        .into_http()
}

fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 5);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(payload);
    frame.freeze()
}
