//! The OpenAPI 3.1 document of the gateway, generated from the same
//! bindings that route requests, so it can never disagree with them.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::Binding;
use super::transcode::BodyRule;

const STATUS_SCHEMA: &str = "google.rpc.Status";

/// Renders the document for `bindings`.
pub fn document<'a>(bindings: impl Iterator<Item = &'a Binding>) -> Value {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut schemas = Schemas::default();
    let mut tags = BTreeSet::new();
    for binding in bindings {
        let (path, path_params) = openapi_path(binding);
        let method = binding.http_method.as_str().to_ascii_lowercase();
        let entry = paths.entry(path).or_default();
        if entry.contains_key(&method) {
            // Two templates that differ only in a variable's pattern share
            // one OpenAPI path; the first one documents it.
            continue;
        }
        tags.insert(binding.method.parent_service().full_name().to_owned());
        entry.insert(method, operation(binding, &path_params, &mut schemas));
    }
    schemas.status();
    let tags: Vec<Value> = tags.iter().map(|full| json!({ "name": full })).collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": env!("CARGO_PKG_NAME"),
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTP/JSON gateway generated from the google.api.http annotations of the gRPC services.",
        },
        "tags": tags,
        "paths": paths,
        "components": { "schemas": schemas.done },
    })
}

/// `/v1/{name=shelves/*}:verb` → `/v1/{name}:verb` and its parameter names.
fn openapi_path(binding: &Binding) -> (String, Vec<String>) {
    let source = binding.template.as_str();
    let mut out = String::with_capacity(source.len());
    let mut params = Vec::new();
    let mut rest = source;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else { break };
        let inner = &rest[open + 1..open + close];
        let name = inner.split('=').next().unwrap_or(inner);
        out.push('{');
        out.push_str(name);
        out.push('}');
        params.push(name.to_owned());
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    (out, params)
}

fn operation(binding: &Binding, path_params: &[String], schemas: &mut Schemas) -> Value {
    let method = &binding.method;
    let transcoding = &binding.transcoding;
    let mut parameters = Vec::new();
    for (name, fields) in path_params.iter().zip(&transcoding.path_fields) {
        let schema = fields.last().map_or_else(|| json!({"type": "string"}), |f| schemas.field(f));
        parameters.push(json!({ "name": name, "in": "path", "required": true, "schema": schema }));
    }
    if !matches!(transcoding.body, BodyRule::Whole) {
        for field in transcoding.input.fields() {
            let bound_by_path = transcoding.path_fields.iter().any(|p| p.first() == Some(&field));
            let bound_by_body = matches!(&transcoding.body, BodyRule::Field(f) if *f == field);
            if bound_by_path || bound_by_body || field.is_map() {
                continue;
            }
            if let Kind::Message(m) = field.kind()
                && !m.full_name().starts_with("google.protobuf.")
            {
                continue;
            }
            let mut schema = schemas.field(&field);
            if field.is_list() {
                parameters.push(json!({ "name": field.name(), "in": "query", "schema": schema, "explode": true }));
            } else {
                if let Value::Object(map) = &mut schema {
                    map.remove("description");
                }
                parameters.push(json!({ "name": field.name(), "in": "query", "schema": schema }));
            }
        }
    }
    let mut op = Map::new();
    op.insert("operationId".into(), json!(operation_id(binding)));
    op.insert("tags".into(), json!([method.parent_service().full_name()]));
    let doc = comments(method.parent_file().file_descriptor_proto(), method);
    if let Some(doc) = doc {
        op.insert("description".into(), json!(doc));
    }
    if !parameters.is_empty() {
        op.insert("parameters".into(), Value::Array(parameters));
    }
    let body_schema = match &transcoding.body {
        BodyRule::None => None,
        BodyRule::Whole => Some(schemas.message(&transcoding.input)),
        BodyRule::Field(field) => Some(schemas.field(field)),
    };
    if let Some(schema) = body_schema {
        op.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": schema } } }),
        );
    }
    let result = match &transcoding.response_body {
        Some(field) => schemas.field(field),
        None => schemas.message(&transcoding.output),
    };
    let success = if binding.streaming {
        json!({
            "description": "A stream of messages: newline-delimited JSON (one {\"result\": …} object per line, a final {\"error\": …} line if the stream fails), or Server-Sent Events when the request accepts text/event-stream.",
            "content": {
                "application/x-ndjson": { "schema": {
                    "type": "object",
                    "properties": { "result": result, "error": { "$ref": schema_ref(STATUS_SCHEMA) } },
                }},
                "text/event-stream": { "schema": { "type": "string", "description": "One `data:` event per message; `event: error` carries a google.rpc.Status." } },
            }
        })
    } else {
        json!({ "description": "OK", "content": { "application/json": { "schema": result } } })
    };
    op.insert(
        "responses".into(),
        json!({
            "200": success,
            "default": {
                "description": "An error, as a google.rpc.Status.",
                "content": { "application/json": { "schema": { "$ref": schema_ref(STATUS_SCHEMA) } } },
            }
        }),
    );
    Value::Object(op)
}

fn operation_id(binding: &Binding) -> String {
    let service = binding.method.parent_service();
    let base = format!("{}_{}", service.name(), binding.method.name());
    if binding.index == 0 { base } else { format!("{base}{}", binding.index) }
}

/// The leading comment of a method, from the source info build.rs keeps.
fn comments(file: &prost_types::FileDescriptorProto, method: &prost_reflect::MethodDescriptor) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let service_index = method.parent_service().index() as i32;
    let method_index = method.index() as i32;
    // 6 = FileDescriptorProto.service, 2 = ServiceDescriptorProto.method.
    let path = [6, service_index, 2, method_index];
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments().trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn schema_ref(name: &str) -> String {
    format!("#/components/schemas/{name}")
}

/// Component schemas, collected as messages are referenced.
#[derive(Default)]
struct Schemas {
    done: BTreeMap<String, Value>,
}

impl Schemas {
    fn message(&mut self, message: &MessageDescriptor) -> Value {
        if let Some(inline) = well_known(message.full_name()) {
            return inline;
        }
        let name = message.full_name().to_owned();
        if !self.done.contains_key(&name) {
            // Reserve the name first: messages may refer to themselves.
            self.done.insert(name.clone(), Value::Null);
            let mut properties = Map::new();
            for field in message.fields() {
                properties.insert(field.json_name().to_owned(), self.field(&field));
            }
            self.done.insert(name.clone(), json!({ "type": "object", "properties": properties }));
        }
        json!({ "$ref": schema_ref(&name) })
    }

    fn field(&mut self, field: &FieldDescriptor) -> Value {
        if field.is_map() {
            let value = match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field(),
                _ => return json!({ "type": "object" }),
            };
            return json!({ "type": "object", "additionalProperties": self.single(&value) });
        }
        let item = self.single(field);
        if field.is_list() { json!({ "type": "array", "items": item }) } else { item }
    }

    fn single(&mut self, field: &FieldDescriptor) -> Value {
        match field.kind() {
            Kind::Double | Kind::Float => json!({ "type": "number" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
            Kind::Uint32 | Kind::Fixed32 => json!({ "type": "integer", "format": "int64", "minimum": 0 }),
            // 64-bit integers are strings in the JSON mapping.
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({ "type": "string", "format": "int64" }),
            Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "format": "byte" }),
            Kind::Enum(e) => {
                json!({ "type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>() })
            }
            Kind::Message(m) => self.message(&m),
        }
    }

    fn status(&mut self) {
        self.done.insert(
            STATUS_SCHEMA.to_owned(),
            json!({
                "type": "object",
                "description": "The error model: a gRPC code, a message and typed details.",
                "properties": {
                    "code": { "type": "integer", "format": "int32" },
                    "message": { "type": "string" },
                    "details": { "type": "array", "items": {
                        "type": "object",
                        "properties": { "@type": { "type": "string" } },
                        "additionalProperties": true,
                    }},
                },
            }),
        );
    }
}

/// Schemas of the well-known types, inlined as their JSON form.
fn well_known(name: &str) -> Option<Value> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" }),
        "google.protobuf.FieldMask" => json!({ "type": "string", "description": "Comma-separated field paths." }),
        "google.protobuf.Empty" => json!({ "type": "object" }),
        "google.protobuf.Struct" => json!({ "type": "object", "additionalProperties": true }),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({ "type": "array", "items": {} }),
        "google.protobuf.Any" => {
            json!({ "type": "object", "properties": { "@type": { "type": "string" } }, "additionalProperties": true })
        }
        "google.protobuf.StringValue" => json!({ "type": "string" }),
        "google.protobuf.BytesValue" => json!({ "type": "string", "format": "byte" }),
        "google.protobuf.BoolValue" => json!({ "type": "boolean" }),
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({ "type": "number" }),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => json!({ "type": "integer" }),
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => json!({ "type": "string", "format": "int64" }),
        _ => return None,
    })
}
