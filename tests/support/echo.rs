//! A test-only `echo.v1.EchoService` backend (tests/proto/echo/v1), written
//! against raw HTTP/2 so it needs no generated code: every call answers with
//! its own request, so what comes back shows what the caller sent.

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

            let mut response = http::Response::builder().header("content-type", "application/grpc");
            for (name, value) in &parts.headers {
                let name = name.as_str();
                if name.starts_with("x-") || name == "authorization" || name == "tenant" {
                    response = response.header(format!("echo-{name}"), value);
                }
            }
            let mut frames: Vec<Frame<Bytes>> = Vec::new();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            if parts.uri.path().ends_with("/EchoStream") {
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

fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 5);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(payload);
    frame.freeze()
}
