//! The bodies of the cargo-fuzz targets under `fuzz/`, here so that each is
//! also an ordinary test on the stable toolchain (`tests/fuzz_corpus.rs`
//! runs them over the saved corpus and the regression inputs) and CI needs
//! no nightly. Each body must never panic, whatever the bytes; where a
//! cheap invariant exists it is asserted too, and an assertion failure is a
//! finding like a crash.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use prost::Message;
use prost_reflect::DescriptorPool;

use crate::config::{ByteSize, parse_duration};
use crate::gateway::route::{PathTemplate, RouteTable, check_escapes};
use crate::gateway::transcode::{Transcoding, parse_body};
use crate::grpc::middleware::deadline::parse_grpc_timeout;

/// A target's body: any bytes in, a panic on a finding.
pub type Body = fn(&[u8]);

/// The targets, by the name of their directory under `fuzz/corpus/`.
pub const TARGETS: [(&str, Body); 4] = [
    ("path_template", path_template),
    ("transcode", transcode),
    ("grpc_timeout", grpc_timeout),
    ("config_values", config_values),
];

/// Splits `data` at the first `n - 1` newlines.
fn fields(data: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let mut parts: Vec<String> = text.splitn(n, '\n').map(str::to_owned).collect();
    parts.resize(n, String::new());
    parts
}

/// `TEMPLATE \n PATH`: parses the template and, if it is valid, matches the
/// path against it alone and through a route table.
pub fn path_template(data: &[u8]) {
    let [template, path]: [String; 2] = fields(data, 2).try_into().unwrap();
    let _ = check_escapes(&path);
    let Ok(parsed) = PathTemplate::parse(&template) else { return };
    let names: Vec<&str> = parsed.field_paths().collect();
    if let Some(bindings) = parsed.matches(&path) {
        // Every binding is one of the template's variables, once each.
        assert_eq!(bindings.len(), names.len(), "{template:?} on {path:?}");
        for ((name, _), expected) in bindings.iter().zip(&names) {
            assert_eq!(name, expected);
        }
    }
    let mut table = RouteTable::default();
    if table.insert(http::Method::GET, parsed.clone(), (), |()| "fuzz".to_owned()).is_ok() {
        let _ = table.lookup(&http::Method::GET, &path);
        let _ = table.lookup(&http::Method::POST, &path);
    }
    // The template text it reports is the one it was parsed from.
    assert_eq!(parsed.as_str(), template);
}

/// The user service's transcodings: UpdateUser (`PATCH
/// /v1/users/{user.user_id}`, body `user`, an update mask) and GetUser
/// (`GET /v1/users/{user_id}`, everything else from the query).
fn transcodings() -> &'static [(Transcoding, &'static str)] {
    static PLANS: OnceLock<Vec<(Transcoding, &'static str)>> = OnceLock::new();
    PLANS.get_or_init(|| {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
        let service = pool.get_service_by_name("user.v1.UserService").expect("the user service");
        let method = |name: &str| service.methods().find(|m| m.name() == name).expect("the method");
        let update = method("UpdateUser");
        let get = method("GetUser");
        let create = method("CreateUser");
        vec![
            (
                Transcoding::new(update.input(), update.output(), "user", "", ["user.user_id"].iter(), true)
                    .expect("the UpdateUser plan"),
                "user.user_id",
            ),
            (
                Transcoding::new(get.input(), get.output(), "", "", ["user_id"].iter(), false)
                    .expect("the GetUser plan"),
                "user_id",
            ),
            (
                Transcoding::new(create.input(), create.output(), "user", "", std::iter::empty::<&str>(), false)
                    .expect("the CreateUser plan"),
                "",
            ),
        ]
    })
}

/// `SELECTOR PATH-VALUE \n QUERY \n BODY`: the first byte picks the method;
/// the request is built from the path binding, query and JSON body, then
/// encoded and decoded again.
pub fn transcode(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let plans = transcodings();
    let (plan, field) = &plans[usize::from(selector) % plans.len()];
    let [value, query, body]: [String; 3] = fields(rest, 3).try_into().unwrap();
    let bindings: Vec<(&str, String)> = if field.is_empty() { Vec::new() } else { vec![(field, value)] };
    let Ok(body) = parse_body(body.as_bytes()) else { return };
    let query = (!query.is_empty()).then_some(query.as_str());
    if let Ok(message) = plan.request(&bindings, query, body) {
        let bytes = message.encode_to_vec();
        let decoded = prost_reflect::DynamicMessage::decode(
            prost_reflect::ReflectMessage::descriptor(&message),
            bytes.as_slice(),
        )
        .expect("an encoded request decodes");
        assert_eq!(decoded.encode_to_vec(), bytes, "re-encoding changed the request");
    }
}

/// A `grpc-timeout` value: parses without panicking, and a parsed timeout
/// is within the syntax's range (8 digits of hours).
pub fn grpc_timeout(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(timeout) = parse_grpc_timeout(text) {
        assert!(timeout.as_secs() <= 99_999_999 * 3600, "{text:?} gave {timeout:?}");
    }
}

/// One value given to each of the loader's parsers: durations, sizes and
/// addresses. (The whole loader is not fuzzed: at about a millisecond a
/// run under the sanitizer, it would reach a fraction of the executions;
/// tests/config.rs covers its error paths.)
pub fn config_values(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Ok(duration) = parse_duration(&text) {
        // What `keel config` prints parses back to the same value.
        let printed = humantime::format_duration(duration).to_string();
        assert_eq!(parse_duration(&printed), Ok(duration), "{text:?} printed as {printed:?}");
    }
    if let Ok(size) = ByteSize::parse(&text) {
        assert_eq!(ByteSize::parse(&size.0.to_string()), Ok(size), "{text:?}");
    }
    let _ = text.trim().parse::<SocketAddr>();
}
