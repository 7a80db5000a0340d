//! The access log: one JSON line per call, formatted by hand into a
//! per-thread buffer and handed to the batching writer ([`super::sink`]),
//! so a call never waits on stdout and allocates nothing for its line.
//!
//! Written by hand because tracing-subscriber's generic JSON formatter
//! (field visitors, span lookups, a `serde_json` map per event) costs about
//! as much as the whole layer stack; this line needs none of that. Each
//! field appears once. With `log.format: pretty` the line is an ordinary
//! tracing event instead, for people reading a terminal.

use std::cell::RefCell;
use std::fmt::{Display, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::sink::LogSink;
use tonic::Code;

use crate::config::AccessLogMode;
use crate::metrics::code_name;

/// Where JSON access lines go, set once by [`super::install`].
static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    /// The same queue the other log lines go through, so lines never
    /// interleave mid-line and all leave in order.
    writer: LogSink,
    mode: AccessLogMode,
    slow: Duration,
}

/// Makes `writer` the destination of JSON access lines. Only the first call
/// counts: the global subscriber can be installed only once too.
pub(super) fn install_sink(writer: LogSink, mode: AccessLogMode, slow: Duration) {
    let _ = SINK.set(Sink { writer, mode, slow });
}

/// One finished call.
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    /// `/package.Service/Method`.
    pub method: &'a str,
    /// `method` is a served method's path, built from proto identifiers
    /// (letters, digits and `_`, as protoc and protox enforce), dots and
    /// slashes: written without checking it for characters to escape.
    pub method_is_plain: bool,
    /// The served method's fixed part of the line, when it has one.
    pub method_text: Option<&'a MethodText>,
    pub code: Code,
    pub duration: Duration,
    /// The TCP peer, or the gateway's client from `x-forwarded-for`.
    pub peer: Peer<'a>,
    pub request_id: &'a str,
    /// `request_id` was generated here: likewise written unchecked.
    pub request_id_is_plain: bool,
    /// The call's span: entered only for the pretty fallback, whose event
    /// shows span fields; the JSON line carries what it needs itself, and
    /// entering a span costs a subscriber round trip per call.
    pub span: Option<&'a tracing::Span>,
    /// The verified client certificate's name (mTLS only).
    pub client: Option<&'a str>,
}

/// A served method's fixed part of its access line, from the level to
/// the code's opening quote, made once when the method table is built: a
/// line is then about fifteen copies instead of about thirty.
#[derive(Debug)]
pub struct MethodText {
    /// At INFO, and at WARN (server faults).
    by_level: [Box<str>; 2],
}

impl MethodText {
    pub fn new(path: &str) -> Self {
        let text = |level: &str| {
            let mut out = String::with_capacity(path.len() + 64);
            out.push_str("\",\"level\":\"");
            out.push_str(level);
            out.push_str("\",\"message\":\"rpc finished\",\"grpc.method\":");
            json_string(&mut out, path);
            out.push_str(",\"grpc.code\":\"");
            out.into_boxed_str()
        };
        Self { by_level: [text("INFO"), text("WARN")] }
    }

    fn at(&self, fault: bool) -> &str {
        &self.by_level[usize::from(fault)]
    }
}

/// Who called, as the line names it.
#[derive(Clone, Copy, Debug)]
pub enum Peer<'a> {
    /// The TCP peer.
    Addr(SocketAddr),
    /// Text from the request (`x-forwarded-for`): escaped as it is written.
    Text(&'a str),
}

impl Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(addr) => addr.fmt(f),
            Self::Text(text) => f.write_str(text),
        }
    }
}

/// Codes that point at the server rather than the caller: logged at WARN.
pub fn is_server_fault(code: Code) -> bool {
    matches!(code, Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented)
}

/// Writes the access line of `entry`, if the mode and the log level want
/// it. Never blocks: a full queue drops the line, and the drop is counted
/// (`keel_log_lines_dropped_total`).
pub fn record(entry: &Entry<'_>) {
    let fault = is_server_fault(entry.code);
    let Some(sink) = SINK.get() else {
        // Pretty logs, or no subscriber installed: an ordinary event.
        return record_event(entry, fault);
    };
    match sink.mode {
        AccessLogMode::Off => return,
        AccessLogMode::Errors if !fault && entry.duration < sink.slow => return,
        _ => {}
    }
    // The level filter (`log.level`, `RUST_LOG`) still applies.
    if !levels().enabled(fault) {
        return;
    }
    thread_local! {
        /// The line being formatted: reused, so a call allocates nothing.
        static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
    }
    LINE.with(|line| {
        // Never borrowed twice: formatting calls nothing that logs.
        let Ok(mut line) = line.try_borrow_mut() else { return };
        line.clear();
        format_line(&mut line, SystemTime::now(), entry, fault);
        sink.writer.write_line(line.as_bytes());
    });
}

/// The access lines the level filter lets through, asked of the filter once
/// per filter rather than once per call (a dispatcher lookup and a walk of
/// the filter's directives, a tenth of the line's cost), and asked again
/// after every change ([`levels_changed`]). The word holds the filter
/// generation it was computed for (above its two flag bits), so an answer
/// computed while the filter changed is never kept, and the initial 0
/// matches no generation.
static LEVELS: AtomicU64 = AtomicU64::new(0);
/// Bumped by every change of the level filter; starts at 1.
static GENERATION: AtomicU64 = AtomicU64::new(1);

const INFO_ON: u64 = 1;
const WARN_ON: u64 = 2;

#[derive(Clone, Copy)]
struct Levels(u64);

impl Levels {
    fn enabled(self, fault: bool) -> bool {
        self.0 & if fault { WARN_ON } else { INFO_ON } != 0
    }
}

fn levels() -> Levels {
    let generation = GENERATION.load(Ordering::Acquire);
    let cached = LEVELS.load(Ordering::Acquire);
    if cached >> 2 == generation {
        return Levels(cached);
    }
    let mut word = generation << 2;
    if tracing::enabled!(target: "keel::access", tracing::Level::INFO) {
        word |= INFO_ON;
    }
    if tracing::enabled!(target: "keel::access", tracing::Level::WARN) {
        word |= WARN_ON;
    }
    LEVELS.store(word, Ordering::Release);
    Levels(word)
}

/// The level filter changed: the next access line asks it again.
pub(super) fn levels_changed() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

fn record_event(entry: &Entry<'_>, fault: bool) {
    let _entered = entry.span.map(tracing::Span::enter);
    let duration_ms = entry.duration.as_secs_f64() * 1000.0;
    let (method, code, peer, request_id) = (entry.method, code_name(entry.code), entry.peer, entry.request_id);
    let client = entry.client;
    if fault {
        tracing::warn!(grpc.method = method, grpc.code = code, duration_ms, %peer, request_id, client, "rpc finished");
    } else {
        tracing::info!(grpc.method = method, grpc.code = code, duration_ms, %peer, request_id, client, "rpc finished");
    }
}

/// The JSON line, in the field names of the other log lines.
fn format_line(out: &mut String, now: SystemTime, entry: &Entry<'_>, fault: bool) {
    out.push_str("{\"timestamp\":\"");
    rfc3339(out, now);
    match entry.method_text {
        Some(text) => out.push_str(text.at(fault)),
        None => {
            out.push_str("\",\"level\":\"");
            out.push_str(if fault { "WARN" } else { "INFO" });
            out.push_str("\",\"message\":\"rpc finished\",\"grpc.method\":");
            plain_or_escaped(out, entry.method, entry.method_is_plain);
            out.push_str(",\"grpc.code\":\"");
        }
    }
    out.push_str(code_name(entry.code));
    out.push_str("\",\"duration_ms\":");
    // Milliseconds with three decimals, from integer microseconds: float
    // formatting costs more than the rest of the line.
    let micros = u64::try_from(entry.duration.as_micros()).unwrap_or(u64::MAX);
    push_padded(out, micros / 1000, 1);
    out.push('.');
    push_padded(out, micros % 1000, 3);
    out.push_str(",\"peer\":\"");
    match entry.peer {
        // Digits, dots and a colon: written as they are, without
        // `core::fmt` (which cost more than the rest of the field). Put
        // together on the stack first, the text cost as much again in the
        // UTF-8 check of the copy.
        Peer::Addr(SocketAddr::V4(addr)) => {
            push_ip(out, IpAddr::V4(*addr.ip()));
            out.push(':');
            push_padded(out, u64::from(addr.port()), 1);
        }
        // Hex digits, colons, brackets: nothing to escape.
        Peer::Addr(addr) => {
            let _ = write!(out, "{addr}");
        }
        Peer::Text(text) => escape_into(out, text),
    }
    out.push_str("\",\"request_id\":\"");
    if entry.request_id_is_plain {
        out.push_str(entry.request_id);
    } else {
        escape_into(out, entry.request_id);
    }
    // Only with mTLS: plaintext lines stay as short as before.
    if let Some(client) = entry.client {
        out.push_str("\",\"client\":");
        json_string(out, client);
        out.push_str(",\"target\":\"keel::access\"}\n");
    } else {
        out.push_str("\",\"target\":\"keel::access\"}\n");
    }
}

/// A JSON string literal of text known to need no escaping, or escaped.
fn plain_or_escaped(out: &mut String, text: &str, plain: bool) {
    out.push('"');
    if plain {
        out.push_str(text);
    } else {
        escape_into(out, text);
    }
    out.push('"');
}

/// A JSON string literal: quotes, backslashes and control characters
/// escaped.
pub(super) fn json_string(out: &mut String, text: &str) {
    plain_or_escaped(out, text, false);
}

/// Whether `text` holds a byte JSON strings must escape: a quote, a
/// backslash or a control character. Eight bytes at a time (the classic
/// word tests for a byte below n), as every line checks three fields: a
/// byte at a time, this check cost more than the rest of the line.
fn needs_escape(text: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Non-zero exactly when some byte of `word` is below `n` (n <= 128).
    let below = |word: u64, n: u64| word.wrapping_sub(n * ONES) & !word & HIGHS;
    let mut chunks = text.chunks_exact(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let word = u64::from_le_bytes(bytes);
        // A quote or backslash is a zero byte once xored with itself.
        let quote = below(word ^ (u64::from(b'"') * ONES), 1);
        let backslash = below(word ^ (u64::from(b'\\') * ONES), 1);
        if below(word, 0x20) | quote | backslash != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

fn escape_into(out: &mut String, text: &str) {
    // Most text (methods, ids, addresses) needs no escaping at all.
    if !needs_escape(text.as_bytes()) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

/// `2026-12-01T07:40:12.345678Z`: UTC, microseconds. The part up to the
/// second is formatted once per second and thread, and reused: at full
/// load a thread writes thousands of lines within the same second.
fn rfc3339(out: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let cached = SECOND.with(|second| {
        let Ok(mut second) = second.try_borrow_mut() else { return false };
        if second.0 != secs {
            second.1.clear();
            date_time(&mut second.1, secs);
            second.0 = secs;
        }
        out.push_str(&second.1);
        true
    });
    if !cached {
        date_time(out, secs);
    }
    out.push('.');
    push_padded(out, u64::from(since.subsec_micros()), 6);
    out.push('Z');
}

/// `2026-12-01T07:40:12` of `secs` since the epoch.
fn date_time(out: &mut String, secs: u64) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    push_padded(out, u64::try_from(year).unwrap_or(0), 4);
    out.push('-');
    push_padded(out, u64::from(month), 2);
    out.push('-');
    push_padded(out, u64::from(day), 2);
    out.push('T');
    push_padded(out, rem / 3600, 2);
    out.push(':');
    push_padded(out, (rem % 3600) / 60, 2);
    out.push(':');
    push_padded(out, rem % 60, 2);
}

/// `ip` as text. An IPv4 address goes octet by octet through [`push_padded`]:
/// `Ipv4Addr`'s `Display` runs `core::fmt` for every octet, and through
/// `to_string` it cost a gateway call about 1,300 instructions for its
/// `X-Forwarded-For`. IPv6 goes through `Display`.
pub(crate) fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_padded(out, u64::from(octet), 1);
            }
        }
        IpAddr::V6(ip) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// `value` in decimal, zero-padded to at least `width` digits; what
/// `write!("{:0w$}")` does, without the formatting machinery.
fn push_padded(out: &mut String, value: u64, width: usize) {
    // itoa: two digits per step from a table, and its `&str` needs no
    // UTF-8 check; a digit at a time through `String::push` cost twice as
    // much, and this runs about ten times per line.
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(value);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the
/// well-known era-based conversion; the gateway's JSON timestamps use it
/// too).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_zero_padded_like_format() {
        for (value, width) in [(0u64, 1usize), (0, 3), (7, 3), (42, 2), (999, 3), (1000, 3), (123_456, 6), (2026, 4)] {
            let mut out = String::new();
            push_padded(&mut out, value, width);
            assert_eq!(out, format!("{value:0width$}"));
        }
        let mut out = String::new();
        push_padded(&mut out, u64::MAX, 1);
        assert_eq!(out, u64::MAX.to_string());
    }

    #[test]
    fn dates_convert_across_leap_years_and_eras() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn escaping_is_found_in_every_position() {
        for len in 0..40 {
            let plain = "a".repeat(len);
            assert!(!needs_escape(plain.as_bytes()), "{len}");
            for at in 0..len {
                for special in [b'"', b'\\', b'\n', 0x1f, 0] {
                    let mut bytes = plain.clone().into_bytes();
                    bytes[at] = special;
                    assert!(needs_escape(&bytes), "{len} {at} {special}");
                }
                // Neighbours of the special bytes, and non-ASCII, need none.
                for fine in [b'!', b'#', b'[', b']', b' ', 0x7f, 0xc3] {
                    let mut bytes = plain.clone().into_bytes();
                    bytes[at] = fine;
                    assert!(!needs_escape(&bytes), "{len} {at} {fine}");
                }
            }
        }
    }

    #[test]
    fn the_fixed_parts_write_what_the_general_path_writes() {
        let text = MethodText::new("/a.v1.S/M");
        for (fault, code) in [(false, Code::Ok), (true, Code::Internal)] {
            let general = Entry {
                method: "/a.v1.S/M",
                method_is_plain: true,
                method_text: None,
                code,
                duration: Duration::from_micros(1234),
                peer: Peer::Addr(SocketAddr::from(([255, 0, 10, 1], 65535))),
                request_id: "rid-3",
                request_id_is_plain: false,
                span: None,
                client: None,
            };
            let (mut slow, mut fast) = (String::new(), String::new());
            format_line(&mut slow, UNIX_EPOCH, &general, fault);
            format_line(&mut fast, UNIX_EPOCH, &Entry { method_text: Some(&text), ..general }, fault);
            assert_eq!(slow, fast);
            let parsed: serde_json::Value = serde_json::from_str(&fast).unwrap_or_default();
            assert_eq!(parsed["level"], if fault { "WARN" } else { "INFO" });
            assert_eq!(parsed["peer"], "255.0.10.1:65535");
            assert_eq!(parsed["grpc.method"], "/a.v1.S/M");
        }
        // A path with a character to escape is escaped in the fixed part too.
        let odd = MethodText::new("/a\"b");
        assert!(odd.at(false).contains("\"/a\\\"b\""), "{}", odd.at(false));
    }

    #[test]
    fn a_tcp_peer_is_written_as_its_address() {
        let mut line = String::new();
        let entry = Entry {
            method: "/a.v1.S/M",
            method_is_plain: true,
            method_text: None,
            code: Code::Ok,
            duration: Duration::from_micros(7),
            peer: Peer::Addr("203.0.113.9:51234".parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))),
            request_id: "rid-2",
            request_id_is_plain: true,
            span: None,
            client: None,
        };
        format_line(&mut line, UNIX_EPOCH, &entry, false);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["peer"], "203.0.113.9:51234");
        assert_eq!(parsed["duration_ms"], 0.007);
        let v6 =
            Entry { peer: Peer::Addr("[2001:db8::1]:443".parse().unwrap_or(SocketAddr::from(([0; 16], 0)))), ..entry };
        line.clear();
        format_line(&mut line, UNIX_EPOCH, &v6, false);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["peer"], "[2001:db8::1]:443");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in ["0.0.0.0", "255.255.255.255", "10.0.1.200", "127.0.0.1", "::1", "2001:db8::7", "::ffff:10.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::from("x");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x{ip}"));
        }
    }

    #[test]
    fn the_line_is_one_json_object_with_each_field_once() {
        let mut line = String::new();
        let peer = "10.0.0.1, 192.0.2.7";
        let entry = Entry {
            method: "/a.v1.S/M\"x",
            method_is_plain: false,
            method_text: None,
            code: Code::NotFound,
            duration: Duration::from_micros(1500),
            peer: Peer::Text(peer),
            request_id: "rid-1",
            request_id_is_plain: false,
            span: None,
            client: None,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_796_110_000) + Duration::from_micros(42);
        format_line(&mut line, at, &entry, false);
        assert!(line.ends_with("}\n"), "{line}");
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["grpc.method"], "/a.v1.S/M\"x");
        assert_eq!(parsed["grpc.code"], "NotFound");
        assert_eq!(parsed["duration_ms"], 1.5);
        assert_eq!(parsed["peer"], peer);
        assert_eq!(parsed["request_id"], "rid-1");
        assert_eq!(parsed["timestamp"], "2026-12-01T07:26:40.000042Z");
        // The next second, on the same thread: the cached part moves on.
        let mut next = String::new();
        format_line(&mut next, at + Duration::from_micros(1_000_007), &entry, false);
        let parsed_next: serde_json::Value = serde_json::from_str(&next).unwrap_or_default();
        assert_eq!(parsed_next["timestamp"], "2026-12-01T07:26:41.000049Z");
        let mut day_later = String::new();
        format_line(&mut day_later, at + Duration::from_secs(86_400), &entry, false);
        let parsed_day: serde_json::Value = serde_json::from_str(&day_later).unwrap_or_default();
        assert_eq!(parsed_day["timestamp"], "2026-12-02T07:26:40.000042Z");
        for key in ["grpc.method", "request_id", "peer", "message"] {
            assert_eq!(line.matches(&format!("\"{key}\":")).count(), 1, "{key} twice in {line}");
        }
        assert!(!line.contains("\"client\""), "{line}");

        let mut line = String::new();
        format_line(&mut line, at, &Entry { client: Some("spiffe://example/\"orders"), ..entry }, false);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["client"], "spiffe://example/\"orders");
    }
}
