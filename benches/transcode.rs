//! The gateway's per-request transcoding cost: a CreateUser JSON body to a
//! protobuf request and a User response back to JSON, without the network.
//! Compare the `round_trip` time against `serde_json_only` (parsing and
//! printing the same JSON with no protobuf at all) to see what the proto3
//! JSON mapping adds.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keel::gateway::transcode::{Transcoding, encode_json, parse_body};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};

const BODY: &[u8] =
    br#"{"user_id":"ada","display_name":"Ada Lovelace","email":"ada@example.com","roles":["admin","analyst"]}"#;

fn transcoding() -> Option<Transcoding> {
    let pool = DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).ok()?;
    let method = pool.get_service_by_name("user.v1.UserService")?.methods().find(|m| m.name() == "CreateUser")?;
    Transcoding::new(method.input(), method.output(), "user", "", std::iter::empty::<&str>(), false).ok()
}

fn bench(c: &mut Criterion) {
    let Some(plan) = transcoding() else {
        eprintln!("cannot build the CreateUser transcoding");
        return;
    };
    let user = keel::proto::user::v1::User {
        user_id: "ada".into(),
        display_name: "Ada Lovelace".into(),
        email: "ada@example.com".into(),
        roles: vec!["admin".into(), "analyst".into()],
        create_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 }),
        update_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 }),
    };
    let response_bytes = user.encode_to_vec();

    let mut group = c.benchmark_group("transcode");
    group.bench_function("request_json_to_proto", |b| {
        b.iter(|| {
            let json = parse_body(black_box(BODY)).ok().flatten();
            let message = plan.request(&[], None, json).ok();
            black_box(message.map(|m| m.encode_to_vec()))
        })
    });
    group.bench_function("response_proto_to_json", |b| {
        b.iter(|| {
            let message = DynamicMessage::decode(plan.output.clone(), black_box(response_bytes.as_slice())).ok();
            black_box(message.and_then(|m| encode_json(&m).ok()))
        })
    });
    group.bench_function("round_trip", |b| {
        b.iter(|| {
            let json = parse_body(black_box(BODY)).ok().flatten();
            let request = plan.request(&[], None, json).ok().map(|m| m.encode_to_vec());
            let message = DynamicMessage::decode(plan.output.clone(), black_box(response_bytes.as_slice())).ok();
            black_box((request, message.and_then(|m| encode_json(&m).ok())))
        })
    });
    group.bench_function("serde_json_only", |b| {
        b.iter(|| {
            let value: Option<serde_json::Value> = serde_json::from_slice(black_box(BODY)).ok();
            black_box(value.and_then(|v| serde_json::to_vec(&v).ok()))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
