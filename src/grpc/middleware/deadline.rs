//! Call deadlines: the `grpc-timeout` header, or `grpc.default_timeout`
//! when a unary call has none, capped at `grpc.max_timeout`, turned into an
//! instant that handlers and stream producers race against. The server's
//! call layer ([`super::server`]) cuts unary calls off at it with
//! DEADLINE_EXCEEDED; streams end themselves at it.

use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::shed::ShedSlot;

/// The header, as a name made at compile time: looked up by `&str`, a name
/// is parsed and checked on every lookup.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// `grpc.default_timeout` and `grpc.max_timeout`.
#[derive(Clone, Copy, Debug)]
pub struct DeadlinePolicy {
    /// For unary and client-streaming calls that name no deadline.
    default: Duration,
    /// No call may run longer; also the deadline of a server stream that
    /// names none.
    max: Duration,
}

impl DeadlinePolicy {
    pub fn new(default: Duration, max: Duration) -> Self {
        Self { default: default.min(max), max }
    }

    /// The deadline of a call that arrived at `now` with `headers`;
    /// `streams_out` for a call that streams its response.
    pub fn deadline(&self, grpc_timeout: Option<&HeaderValue>, streams_out: bool, now: Instant) -> Instant {
        let asked = grpc_timeout.and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let fallback = if streams_out { self.max } else { self.default };
        now + asked.unwrap_or(fallback).min(self.max)
    }
}

/// A stream's response future ends with its headers; the stream itself
/// watches the deadline from the extensions. Its shedding slot comes back
/// shortly after the deadline even if its final status never goes out (a
/// client that does not read).
pub fn release_after_deadline(slot: ShedSlot, at: Instant) {
    tokio::spawn(async move {
        tokio::time::sleep_until(at + STREAM_GRACE).await;
        slot.release();
    });
}

/// How long after its deadline a stream may still hold its shedding slot
/// while its final status waits to be sent.
pub const STREAM_GRACE: Duration = Duration::from_millis(500);

/// The deadline of the call this code runs for (from its
/// [`super::request_id::Caller`]), for code far from the request: a store
/// bounding its queries by it, a client passing it downstream. Stream
/// producers inherit their stream's.
pub fn current_deadline() -> Option<Instant> {
    super::request_id::with_caller(|caller| caller.deadline).flatten()
}

/// Parses the gRPC timeout syntax: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m` for milliseconds, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // Split as bytes: the last character may be more than one byte long
    // (found by fuzzing; `str::split_at` panics inside a character).
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The deadline of a request: the call's (set by the call layer, which
/// runs the handler with it in scope), or, for a handler called without
/// the layer, the one its `grpc-timeout` header implies.
pub fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    if let Some(at) = current_deadline() {
        return Some(at);
    }
    let timeout = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(timeout).map(|t| Instant::now() + t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
    }

    #[test]
    fn rejects_malformed_timeouts() {
        for bad in ["", "S", "10", "123456789S", "1.5S", "-1S", "10s", "1 S", "999H\u{1f7}", "1\u{e9}"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
