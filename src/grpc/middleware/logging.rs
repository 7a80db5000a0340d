//! One access line per call, written when the call ends (for a stream,
//! when its last message and status have gone out), with the method, the
//! gRPC code, the duration, the peer and the request id. The line itself is
//! formatted and queued by [`crate::telemetry::access`].
//!
//! The same record keeps the server's `grpc_server_*` metrics: one clock
//! reading, one response body wrapper and one end-of-call callback (all in
//! the server's call layer, [`super::server`]) serve both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request};
use tonic::Code;
use tracing::Span;

use super::method::MethodInfo;
use super::request_id::RequestId;
use crate::grpc::incoming::GrpcConnectInfo;
use crate::telemetry::access;
use crate::tls::ClientIdentity;

/// Read here for a gateway call's client, and set by the gateway.
pub const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// The pending log line and metrics of one call. It holds what it found on
/// the request as is; formatting waits until the line is written.
pub struct CallLog {
    method: Method,
    start: Instant,
    peer: Peer,
    request_id: RequestId,
    /// The call's span, when spans are on (for the pretty format).
    span: Option<Span>,
    /// The verified client certificate's identity (mTLS only).
    client: Option<Arc<ClientIdentity>>,
    /// How the response headers carry the request id.
    echo: Echo,
}

/// Whether and how a call's response headers carry its `x-request-id`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Echo {
    /// `grpc.echo_request_id: false`.
    Off,
    /// Never indexed by HPACK, as ids are unique.
    NeverIndexed,
    /// Indexable, to give the name its HPACK table entry on this connection
    /// (see [`crate::grpc::incoming::EchoName`]).
    Indexable,
}

/// The method, shared with the method table when it is known (its path
/// and series); the path alone for one no service has.
enum Method {
    Known(&'static MethodInfo),
    Unknown(String),
}

/// Who called: the TCP peer, or for gateway calls (which arrive
/// in-process) the HTTP client from `x-forwarded-for`.
enum Peer {
    Tcp(SocketAddr),
    Forwarded(HeaderValue),
    Unknown,
}

impl CallLog {
    /// Starts the call's record: counts it as started (and its one request
    /// message, for a single-request method), and takes the peer and client
    /// identity from the request, leaving the identity in its extensions as
    /// the one type auth and handlers read (gateway calls bring theirs from
    /// the HTTP side). With `echo`, it also claims the connection's
    /// indexable request id, when one is due.
    pub fn start<B>(
        request: &mut Request<B>,
        start: Instant,
        info: &'static MethodInfo,
        request_id: RequestId,
        span: Option<Span>,
        echo: bool,
    ) -> Self {
        let connection = request.extensions().get::<GrpcConnectInfo>();
        let echo = match connection {
            _ if !echo => Echo::Off,
            Some(c) if c.echo_name.claim(start) => Echo::Indexable,
            _ => Echo::NeverIndexed,
        };
        let peer = match connection.and_then(|c| c.remote_addr) {
            Some(addr) => Peer::Tcp(addr),
            None => request.headers().get(&X_FORWARDED_FOR).cloned().map_or(Peer::Unknown, Peer::Forwarded),
        };
        let client = match connection.and_then(|c| c.client.clone()) {
            Some(client) => {
                request.extensions_mut().insert(client.clone());
                Some(client)
            }
            None => request.extensions().get::<Arc<ClientIdentity>>().cloned(),
        };
        let method = match &info.metrics {
            Some(series) => {
                series.started();
                if info.grpc_type.single_request() {
                    series.received(1);
                }
                Method::Known(info)
            }
            None => Method::Unknown(request.uri().path().to_owned()),
        };
        Self { method, start, peer, request_id, span, client, echo }
    }

    /// The `x-request-id` value for the response headers, unless the echo
    /// is off: never indexed, but for the calls that give the name its
    /// HPACK table entry.
    pub fn echo_value(&self) -> Option<HeaderValue> {
        if self.echo == Echo::Off {
            return None;
        }
        let mut value = self.request_id.header().clone();
        if self.echo == Echo::Indexable {
            value.set_sensitive(false);
        }
        Some(value)
    }

    /// The call's span, when spans are on.
    pub fn span(&self) -> Option<&Span> {
        self.span.as_ref()
    }

    /// Ends the call with `code`, after `sent` response messages: records
    /// its metrics and writes its access line.
    pub fn finish(self, code: Code, sent: u64) {
        let duration = self.start.elapsed();
        let method_is_plain = matches!(self.method, Method::Known(_));
        let method_text = match &self.method {
            Method::Known(info) => info.access_text.as_ref(),
            Method::Unknown(_) => None,
        };
        let method = match &self.method {
            Method::Known(info) => {
                if let Some(metrics) = &info.metrics {
                    metrics.sent(sent);
                    metrics.handled(code, duration);
                }
                info.path.as_str()
            }
            Method::Unknown(path) => path.as_str(),
        };
        access::record(&access::Entry {
            method,
            method_is_plain,
            method_text,
            code,
            duration,
            peer: self.peer.as_entry(),
            request_id: self.request_id.as_str(),
            request_id_is_plain: self.request_id.is_generated(),
            span: self.span.as_ref(),
            client: self.client.as_deref().map(ClientIdentity::name),
        });
    }
}

impl Peer {
    fn as_entry(&self) -> access::Peer<'_> {
        match self {
            Self::Tcp(addr) => access::Peer::Addr(*addr),
            Self::Forwarded(value) => access::Peer::Text(value.to_str().unwrap_or("invalid")),
            Self::Unknown => access::Peer::Text("unknown"),
        }
    }
}
