//! Call deadlines: the `grpc-timeout` header turned into an instant that
//! handlers and stream producers can race against.

use std::time::Duration;

use tokio::time::Instant;

/// The deadline of a call, stored in the request extensions by the deadline
/// layer so handlers need not parse headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// Parses the gRPC timeout syntax: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m` for milliseconds, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Renders a duration in the gRPC timeout syntax, choosing the finest unit
/// whose value fits in 8 digits.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    for (unit, per) in [("n", 1u128), ("u", 1_000), ("m", 1_000_000), ("S", 1_000_000_000), ("M", 60_000_000_000)] {
        let value = nanos.div_ceil(per);
        if value <= MAX {
            return format!("{value}{unit}");
        }
    }
    format!("{}H", nanos.div_ceil(3_600_000_000_000).min(MAX))
}

/// The deadline of a request: the one the deadline layer stored, or the one
/// its `grpc-timeout` header implies.
pub fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    if let Some(Deadline(at)) = request.extensions().get::<Deadline>() {
        return Some(*at);
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
        for bad in ["", "S", "10", "123456789S", "1.5S", "-1S", "10s", "1 S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for d in [Duration::from_millis(250), Duration::from_secs(20), Duration::from_secs(86_400)] {
            let text = format_grpc_timeout(d);
            let back = parse_grpc_timeout(&text).unwrap_or_default();
            assert!(back >= d, "{text} parsed to {back:?}, less than {d:?}");
        }
    }
}
