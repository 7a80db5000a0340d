//! Errors on the HTTP side, in one shape: a gRPC status becomes the HTTP
//! status grpc-gateway would use, and the body is always the
//! `google.rpc.Status` JSON (`{"code", "message", "details"}`), for upstream
//! failures and the gateway's own alike. Details are rendered in full when
//! their type is in the descriptor pool (which always holds
//! `google/rpc/error_details.proto`), and as `{"@type", "value": base64}`
//! otherwise, as protojson does for a type it cannot resolve.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{Map, Value};
use tonic::{Code, Status};

/// The output options of the JSON mapping: `json_name` keys, every field
/// emitted (empty lists as `[]`, zeros as zero), enums by name.
pub const JSON_OUTPUT: SerializeOptions =
    SerializeOptions::new().skip_default_fields(false).use_proto_field_name(false);

/// Everything the gateway can answer with instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {method} is not allowed here")]
    MethodNotAllowed { method: Method, allowed: Vec<Method> },
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body is not valid JSON (it is read as application/json): {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {} (http.body_read_timeout)", humantime::format_duration(*.0))]
    BodyTimeout(std::time::Duration),
    #[error(transparent)]
    Upstream(#[from] Status),
}

impl GatewayError {
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::MethodNotAllowed { .. } => Code::Unimplemented,
            Self::MalformedJson(_) | Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::PayloadTooLarge(_) => Code::ResourceExhausted,
            // grpc-gateway: a body that cannot be read is the client's
            // problem, INVALID_ARGUMENT.
            Self::BodyRead(_) => Code::InvalidArgument,
            // The client ran out of time, as a deadline would; the HTTP
            // status (408) says it was the request, not the upstream.
            Self::BodyTimeout(_) => Code::DeadlineExceeded,
            Self::Upstream(status) => status.code(),
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MalformedJson(_) | Self::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Upstream(status) => http_status(status.code()),
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Upstream(status) => status.message().to_owned(),
            other => other.to_string(),
        }
    }

    fn details(&self, pool: &DescriptorPool) -> Vec<serde_json::Value> {
        match self {
            Self::Upstream(status) => status_details(status.details(), pool),
            _ => Vec::new(),
        }
    }

    /// The `google.rpc.Status` JSON object; details whose types are in
    /// `pool` are rendered in the JSON mapping.
    pub fn to_json(&self, pool: &DescriptorPool) -> serde_json::Value {
        status_json(self.code(), &self.message(), self.details(pool))
    }

    /// The HTTP response: grpc-gateway's status, a `google.rpc.Status` body.
    pub fn into_response(self, pool: &DescriptorPool) -> Response {
        let body = Bytes::from(self.to_json(pool).to_string());
        let mut response = (self.http_status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Self::MethodNotAllowed { allowed, .. } = &self {
            let list = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
            if let Ok(value) = HeaderValue::from_str(&list) {
                headers.insert(header::ALLOW, value);
            }
        }
        if matches!(self, Self::BodyTimeout(_)) {
            // The rest of the body may still come; the connection cannot be
            // reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.code() == Code::Unauthenticated {
            // RFC 6750: a 401 names the scheme the client should use.
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::Upstream(status) = &self {
            // Metadata reaches the client on errors as on success.
            super::forward::response_headers(status.metadata(), headers);
        }
        response
    }
}

/// grpc-gateway's mapping from gRPC codes to HTTP statuses.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // 499 "Client Closed Request" is not in the IANA registry but is
        // what grpc-gateway and nginx use.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn status_json(code: Code, message: &str, details: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({ "code": code as i32, "message": message, "details": details })
}

/// `google.rpc.Status` as sent in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// Renders status details as `Any` JSON.
fn status_details(raw: &[u8], pool: &DescriptorPool) -> Vec<serde_json::Value> {
    if raw.is_empty() {
        return Vec::new();
    }
    let Ok(status) = RpcStatus::decode(raw) else { return Vec::new() };
    status.details.iter().map(|any| any_to_json(any, pool)).collect()
}

/// An `Any` in the JSON mapping: a message's fields beside `@type`; a
/// well-known type's own JSON form (even an object, as for Struct or Empty)
/// under `"value"`; and a type unknown here as its bytes in base64 under
/// `"value"`, so nothing the service sent is lost.
fn any_to_json(any: &prost_types::Any, pool: &DescriptorPool) -> Value {
    use base64::Engine as _;
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    // The global pool holds the well-known types, which a service's
    // descriptors need not import to send them.
    let descriptor =
        pool.get_message_by_name(type_name).or_else(|| DescriptorPool::global().get_message_by_name(type_name));
    let decoded = descriptor.and_then(|desc| {
        let message = DynamicMessage::decode(desc.clone(), any.value.as_slice()).ok()?;
        let json = super::transcode::message_to_value(&message).ok()?;
        Some((desc.full_name().starts_with("google.protobuf."), json))
    });
    let mut object = match decoded {
        Some((false, Value::Object(map))) => map,
        Some((_, other)) => Map::from_iter([("value".to_owned(), other)]),
        None => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(&any.value);
            Map::from_iter([("value".to_owned(), Value::String(encoded))])
        }
    };
    object.insert("@type".to_owned(), Value::String(any.type_url.clone()));
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_like_grpc_gateway() {
        let table = [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::OutOfRange, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Cancelled, 499),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
            (Code::DataLoss, 500),
        ];
        for (code, expected) in table {
            assert_eq!(http_status(code).as_u16(), expected, "{code:?}");
        }
    }

    #[test]
    fn the_body_is_a_google_rpc_status() {
        let error = GatewayError::Upstream(Status::not_found("user \"x\" not found"));
        assert_eq!(
            error.to_json(&DescriptorPool::new()),
            serde_json::json!({"code": 5, "message": "user \"x\" not found", "details": []})
        );
    }
}
