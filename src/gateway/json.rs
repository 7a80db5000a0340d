//! Writing a response message as proto3 JSON, straight into the body.
//!
//! The output is what prost-reflect's serializer gives with the gateway's
//! options (`JSON_OUTPUT`: zero values written, lowerCamel names, enums by
//! name, 64-bit integers as strings), plus the `null` that grpc-gateway's
//! default marshaler (protojson `EmitUnpopulated`) writes for an unset
//! singular message field outside a oneof. Objects keep field-number order
//! and map keys are sorted, as protojson does, so a body is stable.
//!
//! Why not only prost-reflect: its serializer leaves unset messages out, so
//! adding the `null`s meant building the whole response as a
//! `serde_json::Value` first; and it formats a `Timestamp` or `Duration` by
//! re-encoding it to protobuf, decoding it as `prost_types` and printing it
//! through `core::fmt`, some 6,000 instructions each, a tenth of a REST GET.
//! The well-known types whose JSON has rules of their own (`Any`, `Struct`,
//! `Value`, `ListValue`, `FieldMask`, `Empty`), messages with extensions set,
//! and non-normalized timestamps and durations are still handed to
//! prost-reflect, so they come out exactly as before.

use prost_reflect::{DynamicMessage, Kind, MapKey, ReflectMessage, Value};

use super::error::JSON_OUTPUT;
use crate::telemetry::access::civil_from_days;

/// A message that has no JSON form (a timestamp out of range, an `Any` of an
/// unknown type), with the mapping's reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

impl From<serde_json::Error> for JsonError {
    fn from(error: serde_json::Error) -> Self {
        Self(error.to_string())
    }
}

/// Appends `message` as JSON to `out`.
pub fn write_message(out: &mut Vec<u8>, message: &DynamicMessage) -> Result<(), JsonError> {
    let descriptor = message.descriptor();
    let name = descriptor.full_name();
    if let Some(wkt) = name.strip_prefix("google.protobuf.") {
        return well_known(out, message, wkt);
    }
    if message.extensions().next().is_some() {
        return delegate_with_nulls(out, message);
    }
    out.push(b'{');
    let mut first = true;
    for field in descriptor.fields() {
        if field.supports_presence() && !message.has_field(&field) {
            // Unset with presence: a singular message outside a oneof is
            // `null`; oneof members and `optional` scalars stay absent.
            if field.containing_oneof().is_none() && matches!(field.kind(), Kind::Message(_)) {
                key(out, field.json_name(), &mut first);
                out.extend_from_slice(b"null");
            }
            continue;
        }
        key(out, field.json_name(), &mut first);
        value(out, &field.kind(), &message.get_field(&field))?;
    }
    out.push(b'}');
    Ok(())
}

/// Appends one field's value: `kind` is the field's (for a map, its entry
/// message; for a list, its element's).
pub fn value(out: &mut Vec<u8>, kind: &Kind, value: &Value) -> Result<(), JsonError> {
    match value {
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::I32(n) => integer(out, *n),
        Value::U32(n) => integer(out, *n),
        Value::I64(n) => quoted_integer(out, *n),
        Value::U64(n) => quoted_integer(out, *n),
        Value::F32(f) => float(out, *f, f.is_nan(), f.is_infinite(), f.is_sign_negative()),
        Value::F64(f) => float(out, *f, f.is_nan(), f.is_infinite(), f.is_sign_negative()),
        Value::String(s) => string(out, s),
        Value::Bytes(bytes) => {
            use base64::Engine as _;
            out.push(b'"');
            let start = out.len();
            out.resize(start + base64::encoded_len(bytes.len(), true).unwrap_or(0), 0);
            let written = base64::prelude::BASE64_STANDARD
                .encode_slice(bytes, &mut out[start..])
                .map_err(|e| JsonError(e.to_string()))?;
            out.truncate(start + written);
            out.push(b'"');
        }
        Value::EnumNumber(number) => match kind {
            Kind::Enum(enumeration) if enumeration.full_name() == "google.protobuf.NullValue" => {
                out.extend_from_slice(b"null")
            }
            Kind::Enum(enumeration) => match enumeration.get_value(*number) {
                Some(named) => string(out, named.name()),
                None => integer(out, *number),
            },
            _ => return Err(mismatch(value)),
        },
        Value::Message(message) => write_message(out, message)?,
        Value::List(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                self::value(out, kind, item)?;
            }
            out.push(b']');
        }
        Value::Map(entries) => {
            let Kind::Message(entry) = kind else { return Err(mismatch(value)) };
            let value_kind = entry.map_entry_value_field().kind();
            // protojson's order: booleans false first, integers by value,
            // strings by their bytes, which is `MapKey`'s own order.
            let mut sorted: Vec<(&MapKey, &Value)> = entries.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            let mut first = true;
            for (map_key, item) in sorted {
                if !std::mem::take(&mut first) {
                    out.push(b',');
                }
                match map_key {
                    MapKey::Bool(b) => out.extend_from_slice(if *b { b"\"true\"" } else { b"\"false\"" }),
                    MapKey::I32(n) => quoted_integer(out, *n),
                    MapKey::I64(n) => quoted_integer(out, *n),
                    MapKey::U32(n) => quoted_integer(out, *n),
                    MapKey::U64(n) => quoted_integer(out, *n),
                    MapKey::String(s) => string(out, s),
                }
                out.push(b':');
                self::value(out, &value_kind, item)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn mismatch(value: &Value) -> JsonError {
    JsonError(format!("a value that does not match its field's type: {value:?}"))
}

/// `google.protobuf.*`: timestamps, durations and wrappers here; the rest,
/// and any message of the package without a special form, as prost-reflect
/// writes them (which is also the old output for the package's messages).
fn well_known(out: &mut Vec<u8>, message: &DynamicMessage, name: &str) -> Result<(), JsonError> {
    let number = |n: u32| message.get_field_by_number(n);
    match name {
        "Timestamp" => {
            let (Some(Value::I64(seconds)), Some(Value::I32(nanos))) =
                (number(1).as_deref().cloned(), number(2).as_deref().cloned())
            else {
                return delegate(out, message);
            };
            if !(MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&seconds) {
                return Err(JsonError("timestamp out of range".to_owned()));
            }
            if !(0..NANOS).contains(&nanos) {
                return delegate(out, message);
            }
            out.push(b'"');
            timestamp(out, seconds, nanos);
            out.push(b'"');
            Ok(())
        }
        "Duration" => {
            let (Some(Value::I64(seconds)), Some(Value::I32(nanos))) =
                (number(1).as_deref().cloned(), number(2).as_deref().cloned())
            else {
                return delegate(out, message);
            };
            if seconds.unsigned_abs() > MAX_DURATION_SECONDS || nanos.unsigned_abs() >= NANOS as u32 {
                return delegate(out, message);
            }
            // Mixed signs are normalized by prost-types' formatting.
            if (seconds < 0 && nanos > 0) || (seconds > 0 && nanos < 0) {
                return delegate(out, message);
            }
            out.push(b'"');
            duration(out, seconds, nanos);
            out.push(b'"');
            Ok(())
        }
        "DoubleValue" | "FloatValue" | "Int64Value" | "UInt64Value" | "Int32Value" | "UInt32Value" | "BoolValue"
        | "StringValue" | "BytesValue" => {
            let (Some(field), Some(inner)) = (message.descriptor().get_field(1), number(1)) else {
                return delegate(out, message);
            };
            value(out, &field.kind(), &inner)
        }
        _ => delegate(out, message),
    }
}

/// prost-reflect's own output for `message`.
fn delegate(out: &mut Vec<u8>, message: &DynamicMessage) -> Result<(), JsonError> {
    let mut serializer = serde_json::Serializer::new(&mut *out);
    message.serialize_with_options(&mut serializer, &JSON_OUTPUT).map_err(JsonError::from)
}

/// A message with extensions set: prost-reflect's output with the `null`s
/// added, through a `serde_json::Value` (extensions are rare in responses).
fn delegate_with_nulls(out: &mut Vec<u8>, message: &DynamicMessage) -> Result<(), JsonError> {
    let value = super::transcode::message_to_value(message).map_err(|e| JsonError(e.to_string()))?;
    serde_json::to_writer(&mut *out, &value).map_err(JsonError::from)
}

fn key(out: &mut Vec<u8>, name: &str, first: &mut bool) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    string(out, name);
    out.push(b':');
}

fn integer(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn quoted_integer(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.push(b'"');
    integer(out, n);
    out.push(b'"');
}

/// Finite numbers as serde_json writes them (ryu's shortest form); the rest
/// as the mapping's strings.
fn float<F: ryu::Float>(out: &mut Vec<u8>, f: F, nan: bool, infinite: bool, negative: bool) {
    if nan {
        out.extend_from_slice(b"\"NaN\"");
    } else if infinite {
        out.extend_from_slice(if negative { b"\"-Infinity\"" } else { b"\"Infinity\"" });
    } else {
        out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
    }
}

/// A JSON string, escaped as serde_json escapes: `"`, `\` and the control
/// characters; everything else, non-ASCII included, as it is.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the mapping's range.
const MIN_TIMESTAMP: i64 = -62_135_596_800;
const MAX_TIMESTAMP: i64 = 253_402_300_799;
/// About 10,000 years, the mapping's bound for a duration.
const MAX_DURATION_SECONDS: u64 = 315_576_000_000;
const NANOS: i32 = 1_000_000_000;

/// RFC 3339 in UTC, with 0, 3, 6 or 9 fractional digits, for `seconds` in
/// the mapping's range and `nanos` in `0..1e9`.
fn timestamp(out: &mut Vec<u8>, seconds: i64, nanos: i32) {
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    digits(out, year as u64, 4);
    out.push(b'-');
    digits(out, u64::from(month), 2);
    out.push(b'-');
    digits(out, u64::from(day), 2);
    out.push(b'T');
    digits(out, (of_day / 3600) as u64, 2);
    out.push(b':');
    digits(out, (of_day / 60 % 60) as u64, 2);
    out.push(b':');
    digits(out, (of_day % 60) as u64, 2);
    fraction(out, nanos.unsigned_abs());
    out.push(b'Z');
}

/// `[-]seconds[.fraction]s`, signs already agreeing.
fn duration(out: &mut Vec<u8>, seconds: i64, nanos: i32) {
    if seconds < 0 || nanos < 0 {
        out.push(b'-');
    }
    integer(out, seconds.unsigned_abs());
    fraction(out, nanos.unsigned_abs());
    out.push(b's');
}

/// Nothing, milliseconds, microseconds or nanoseconds, whichever is exact.
fn fraction(out: &mut Vec<u8>, nanos: u32) {
    if nanos == 0 {
        return;
    }
    out.push(b'.');
    let nanos = u64::from(nanos);
    if nanos % 1_000_000 == 0 {
        digits(out, nanos / 1_000_000, 3);
    } else if nanos % 1_000 == 0 {
        digits(out, nanos / 1_000, 6);
    } else {
        digits(out, nanos, 9);
    }
}

/// `n` as exactly `width` decimal digits (zero-padded; `n` fits).
fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use prost_reflect::{DescriptorPool, FieldDescriptor, MessageDescriptor};

    use super::*;

    fn pool() -> DescriptorPool {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut compiler = protox::Compiler::new([root.join("tests/proto"), root.join("proto")]).unwrap();
        compiler.include_imports(true);
        compiler.open_file("jsontest/v1/types.proto").unwrap();
        DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice()).unwrap()
    }

    /// xorshift64*: reproducible, and enough to vary every field.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn string(&mut self) -> String {
            const PIECES: [&str; 12] =
                ["a", "Zz", "\"", "\\", "\n", "\u{1}", "\u{1f}", "\u{7f}", "é", "\u{2028}", "😀", " "];
            (0..self.below(6)).map(|_| PIECES[self.below(PIECES.len() as u64) as usize]).collect()
        }

        fn f64(&mut self) -> f64 {
            // Rarely non-finite: a `google.protobuf.Value` refuses them.
            match self.below(40) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => self.below(1000) as f64,
                4 => -0.0,
                5 => 1e300 * (self.below(5) as f64),
                6..=12 => f64::from_bits(self.next() >> 2) - 0.5,
                _ => (self.below(2000) as f64 - 1000.0) / 16.0,
            }
        }
    }

    fn message(rng: &mut Rng, descriptor: &MessageDescriptor, depth: u32) -> DynamicMessage {
        let mut message = DynamicMessage::new(descriptor.clone());
        let set = |message: &mut DynamicMessage, number: u32, value: Value| {
            message.set_field_by_number(number, value);
        };
        match descriptor.full_name() {
            "google.protobuf.Timestamp" => {
                // Mostly in range; a few out of it, or not normalized.
                let seconds = match rng.below(100) {
                    0 => MAX_TIMESTAMP + 1 + rng.below(100) as i64,
                    1 => MIN_TIMESTAMP,
                    2 => MAX_TIMESTAMP,
                    _ => MIN_TIMESTAMP + rng.below((MAX_TIMESTAMP - MIN_TIMESTAMP) as u64) as i64,
                };
                set(&mut message, 1, Value::I64(seconds));
                set(&mut message, 2, Value::I32(nanos(rng)));
            }
            "google.protobuf.Duration" => {
                let seconds = rng.below(2 * MAX_DURATION_SECONDS + 10) as i64 - MAX_DURATION_SECONDS as i64 - 5;
                set(&mut message, 1, Value::I64(seconds));
                set(&mut message, 2, Value::I32(nanos(rng)));
            }
            // prost-reflect writes a non-finite wrapper as `null`; the
            // writer follows protojson (see the test below).
            "google.protobuf.DoubleValue" => set(&mut message, 1, Value::F64(rng.below(1000) as f64 / 8.0)),
            "google.protobuf.FloatValue" => set(&mut message, 1, Value::F32(rng.below(1000) as f32 / 8.0)),
            "google.protobuf.Any" if rng.below(20) > 0 => {
                let inner = descriptor.parent_pool().get_message_by_name("jsontest.v1.Inner").unwrap();
                let payload = self::message(rng, &inner, depth + 1);
                set(&mut message, 1, Value::String("type.googleapis.com/jsontest.v1.Inner".to_owned()));
                set(&mut message, 2, Value::Bytes(prost::Message::encode_to_vec(&payload).into()));
            }
            _ => {
                for field in descriptor.fields() {
                    if rng.below(3) > 0 {
                        message.set_field(&field, field_value(rng, &field, depth));
                    }
                }
            }
        }
        message
    }

    fn nanos(rng: &mut Rng) -> i32 {
        let sign = if rng.below(4) == 0 { -1 } else { 1 };
        sign * match rng.below(6) {
            0 => 0,
            1 => rng.below(1000) as i32 * 1_000_000,
            2 => rng.below(1_000_000) as i32 * 1_000,
            3 => 1_000_000_000 + rng.below(5) as i32,
            _ => rng.below(1_000_000_000) as i32,
        }
    }

    fn field_value(rng: &mut Rng, field: &FieldDescriptor, depth: u32) -> Value {
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else { unreachable!() };
            let (key_field, value_field) = (entry.map_entry_key_field(), entry.map_entry_value_field());
            let entries = (0..rng.below(4))
                .map(|_| {
                    let key = match single(rng, &key_field.kind(), depth) {
                        Value::Bool(b) => MapKey::Bool(b),
                        Value::I32(n) => MapKey::I32(n),
                        Value::I64(n) => MapKey::I64(n),
                        Value::U32(n) => MapKey::U32(n),
                        Value::U64(n) => MapKey::U64(n),
                        Value::String(s) => MapKey::String(s),
                        other => unreachable!("map key {other:?}"),
                    };
                    (key, single(rng, &value_field.kind(), depth))
                })
                .collect();
            Value::Map(entries)
        } else if field.is_list() {
            Value::List((0..rng.below(4)).map(|_| single(rng, &field.kind(), depth)).collect())
        } else {
            single(rng, &field.kind(), depth)
        }
    }

    fn single(rng: &mut Rng, kind: &Kind, depth: u32) -> Value {
        match kind {
            Kind::Double => Value::F64(rng.f64()),
            Kind::Float => Value::F32(rng.f64() as f32),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(rng.next() as i32 >> rng.below(32)),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(rng.next() as i64 >> rng.below(64)),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(rng.next() as u32 >> rng.below(32)),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(rng.next() >> rng.below(64)),
            Kind::Bool => Value::Bool(rng.below(2) == 0),
            Kind::String => Value::String(rng.string()),
            Kind::Bytes => Value::Bytes((0..rng.below(7)).map(|_| rng.next() as u8).collect::<Vec<u8>>().into()),
            Kind::Enum(_) => Value::EnumNumber([0, 1, 2, 7][rng.below(4) as usize]),
            Kind::Message(m) if depth >= 3 => Value::Message(DynamicMessage::new(m.clone())),
            Kind::Message(m) => Value::Message(message(rng, m, depth + 1)),
        }
    }

    /// What the gateway wrote before this writer: prost-reflect's JSON with
    /// the `null`s added.
    fn reference(message: &DynamicMessage) -> Result<serde_json::Value, String> {
        super::super::transcode::message_to_value(message).map_err(|e| e.to_string())
    }

    #[test]
    fn every_field_shape_matches_prost_reflect_with_nulls() {
        let pool = pool();
        let all = pool.get_message_by_name("jsontest.v1.All").unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut compared, mut refused) = (0, 0);
        for round in 0..3000 {
            let message = message(&mut rng, &all, 0);
            let mut out = Vec::new();
            match (reference(&message), write_message(&mut out, &message)) {
                (Ok(expected), Ok(())) => {
                    let text = String::from_utf8(out).unwrap();
                    let got: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
                    assert!(got == expected, "round {round}: {:?}", difference(&got, &expected, String::new()));
                    compared += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (expected, got) => panic!("round {round}: prost-reflect {expected:?}, writer {got:?}"),
            }
        }
        // Both outcomes were exercised, and mostly the successful one.
        assert!(compared > 1000 && refused > 10, "{compared} compared, {refused} refused by both");
    }

    /// The first path where `a` and `b` differ, and both values there.
    fn difference(a: &serde_json::Value, b: &serde_json::Value, path: String) -> Option<String> {
        use serde_json::Value as J;
        match (a, b) {
            (J::Object(x), J::Object(y)) => x
                .keys()
                .chain(y.keys())
                .find_map(|k| {
                    difference(x.get(k).unwrap_or(&J::Null), y.get(k).unwrap_or(&J::Null), format!("{path}.{k}"))
                })
                .or_else(|| (x.len() != y.len()).then(|| format!("{path}: keys {:?} / {:?}", x.keys(), y.keys()))),
            (J::Array(x), J::Array(y)) if x.len() == y.len() => {
                x.iter().zip(y).enumerate().find_map(|(i, (p, q))| difference(p, q, format!("{path}[{i}]")))
            }
            _ => (a != b).then(|| format!("{path}: writer {a} / reference {b}")),
        }
    }

    #[test]
    fn timestamps_and_durations_read_as_prost_types_prints_them() {
        let mut rng = Rng(7);
        for _ in 0..20_000 {
            let seconds = MIN_TIMESTAMP + rng.below((MAX_TIMESTAMP - MIN_TIMESTAMP + 1) as u64) as i64;
            let fraction = nanos(&mut rng).rem_euclid(NANOS);
            let mut out = Vec::new();
            timestamp(&mut out, seconds, fraction);
            let expected = prost_types::Timestamp { seconds, nanos: fraction }.to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected);

            let seconds = rng.below(2 * MAX_DURATION_SECONDS + 1) as i64 - MAX_DURATION_SECONDS as i64;
            let fraction = nanos(&mut rng).rem_euclid(NANOS) * if seconds < 0 { -1 } else { 1 };
            let fraction = if seconds == 0 && rng.below(2) == 0 { -fraction } else { fraction };
            let mut out = Vec::new();
            duration(&mut out, seconds, fraction);
            let expected = prost_types::Duration { seconds, nanos: fraction }.to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut rng = Rng(11);
        let every_byte: String = (0u8..0x80).map(char::from).collect();
        for s in std::iter::once(every_byte).chain((0..2000).map(|_| rng.string())) {
            let mut out = Vec::new();
            string(&mut out, &s);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn fields_follow_their_numbers_and_map_keys_are_sorted() {
        let pool = pool();
        let all = pool.get_message_by_name("jsontest.v1.All").unwrap();
        let mut message = DynamicMessage::new(all);
        message.set_field_by_name("declared_first", Value::String("x".to_owned()));
        let keys = [(-3, "c"), (10, "a"), (2, "b"), (-40, "d")];
        let entries = keys.iter().map(|&(k, v)| (MapKey::I64(k), Value::Message(inner(&pool, v)))).collect();
        message.set_field_by_name("m_int64", Value::Map(entries));
        let mut out = Vec::new();
        write_message(&mut out, &message).unwrap();
        let text = String::from_utf8(out).unwrap();
        let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle} in {text}"));
        assert!(at("\"fDouble\"") < at("\"fFloat\"") && at("\"fFloat\"") < at("\"nullValue\""), "{text}");
        assert!(at("\"nullValue\"") < at("\"declaredFirst\""), "number 60 comes last: {text}");
        assert!(at("\"-40\"") < at("\"-3\"") && at("\"-3\"") < at("\"2\"") && at("\"2\"") < at("\"10\""), "{text}");
        assert!(text.contains("\"inner\":null") && text.contains("\"ts\":null"), "{text}");
        assert!(!text.contains("oInt32") && !text.contains("cString"), "unset oneof members stay out: {text}");
        assert!(text.contains("\"re\\\"named\\\\\":0"), "a json_name is escaped: {text}");
    }

    #[test]
    fn non_finite_wrappers_are_written_as_protojson_writes_them() {
        let pool = pool();
        for (name, value, expected) in [
            ("google.protobuf.DoubleValue", Value::F64(f64::NAN), "\"NaN\""),
            ("google.protobuf.DoubleValue", Value::F64(f64::NEG_INFINITY), "\"-Infinity\""),
            ("google.protobuf.FloatValue", Value::F32(f32::INFINITY), "\"Infinity\""),
            ("google.protobuf.FloatValue", Value::F32(1.5), "1.5"),
        ] {
            let mut wrapper = DynamicMessage::new(pool.get_message_by_name(name).unwrap());
            wrapper.set_field_by_number(1, value);
            let mut out = Vec::new();
            write_message(&mut out, &wrapper).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{name}");
        }
    }

    #[test]
    fn a_float_reads_as_written_in_the_value_form_too() {
        let pool = pool();
        let mut message = DynamicMessage::new(pool.get_message_by_name("jsontest.v1.All").unwrap());
        message.set_field_by_name("f_float", Value::F32(0.1));
        let value = super::super::transcode::message_to_value(&message).unwrap();
        assert_eq!(value["fFloat"], serde_json::json!(0.1), "not widened to 0.10000000149011612");
        let mut out = Vec::new();
        write_message(&mut out, &message).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("\"fFloat\":0.1,"));
    }

    fn inner(pool: &DescriptorPool, name: &str) -> DynamicMessage {
        let mut inner = DynamicMessage::new(pool.get_message_by_name("jsontest.v1.Inner").unwrap());
        inner.set_field_by_name("name", Value::String(name.to_owned()));
        inner
    }
}
