//! JSON ⇄ protobuf for the gateway, using the proto3 JSON mapping.
//!
//! A request is assembled as one JSON object: the body (at the root for
//! `body: "*"`, or under the bound field), query parameters for the fields
//! neither the path nor the body binds, and the path variables last, since
//! the path wins. That object then goes through the JSON mapping once, so
//! every field type (enums, well-known types, 64-bit integers) parses the
//! same way wherever it came from.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value as ProtoValue,
};
use serde_json::{Map, Value};

use super::error::{GatewayError, JSON_OUTPUT};

/// Where the HTTP body goes in the request message.
#[derive(Clone, Debug)]
pub enum BodyRule {
    /// No body is read.
    None,
    /// `body: "*"`: the body is the request message; no query parameters.
    Whole,
    /// `body: "field"`: the body is that top-level field.
    Field(FieldDescriptor),
}

/// How one method's requests and responses are transcoded, resolved once at
/// startup.
#[derive(Clone, Debug)]
pub struct Transcoding {
    /// The request message built from path, query and body.
    pub input: MessageDescriptor,
    /// The response message rendered as JSON.
    pub output: MessageDescriptor,
    /// Where the HTTP body goes.
    pub body: BodyRule,
    /// Fields bound by the path template, in template order.
    pub path_fields: Vec<Vec<FieldDescriptor>>,
    /// The `google.protobuf.FieldMask` to fill from the body's keys on PATCH.
    pub patch_mask: Option<FieldDescriptor>,
    /// `response_body`: the response field returned instead of the message.
    pub response_body: Option<FieldDescriptor>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

impl Transcoding {
    pub fn new(
        input: MessageDescriptor,
        output: MessageDescriptor,
        body: &str,
        response_body: &str,
        path_fields: impl Iterator<Item = impl AsRef<str>>,
        is_patch: bool,
    ) -> Result<Self, PlanError> {
        let body =
            match body {
                "" => BodyRule::None,
                "*" => BodyRule::Whole,
                name => BodyRule::Field(input.get_field_by_name(name).ok_or_else(|| {
                    PlanError(format!("body field {name:?} is not a field of {}", input.full_name()))
                })?),
            };
        let mut resolved_paths = Vec::new();
        for path in path_fields {
            let path = path.as_ref();
            let fields = resolve_field_path(&input, path)
                .ok_or_else(|| PlanError(format!("path variable {path:?} is not a field of {}", input.full_name())))?;
            let leaf =
                fields.last().ok_or_else(|| PlanError(format!("empty path variable in {}", input.full_name())))?;
            if leaf.is_list() || leaf.is_map() || matches!(leaf.kind(), Kind::Message(_)) {
                return Err(PlanError(format!("path variable {path:?} must be a singular scalar field")));
            }
            resolved_paths.push(fields);
        }
        let response_body = match response_body {
            "" => None,
            name => Some(output.get_field_by_name(name).ok_or_else(|| {
                PlanError(format!("response_body {name:?} is not a field of {}", output.full_name()))
            })?),
        };
        let patch_mask = if is_patch && matches!(body, BodyRule::Field(_)) {
            input.fields().find(|f| {
                !f.is_list() && matches!(f.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask")
            })
        } else {
            None
        };
        Ok(Self { input, output, body, path_fields: resolved_paths, patch_mask, response_body })
    }

    /// Builds the request message from the path bindings, the raw query
    /// string and the parsed body.
    pub fn request(
        &self,
        bindings: &[(&str, String)],
        query: Option<&str>,
        body: Option<Value>,
    ) -> Result<DynamicMessage, GatewayError> {
        let mut root = Map::new();
        let mut body_keys: Option<Map<String, Value>> = None;
        match (&self.body, body) {
            (BodyRule::Whole, Some(Value::Object(object))) => root = object,
            (BodyRule::Whole, Some(Value::Null) | None) => {}
            (BodyRule::Whole, Some(other)) => {
                return Err(GatewayError::InvalidArgument(format!(
                    "the request body must be a JSON object, not {}",
                    json_kind(&other)
                )));
            }
            (BodyRule::Field(field), Some(value)) => {
                if let (Value::Object(object), Some(_)) = (&value, &self.patch_mask) {
                    body_keys = Some(object.clone());
                }
                root.insert(field.name().to_owned(), value);
            }
            (BodyRule::Field(_) | BodyRule::None, None) | (BodyRule::None, Some(_)) => {}
        }

        if let Some(query) = query.filter(|q| !q.is_empty())
            && !matches!(self.body, BodyRule::Whole)
        {
            self.bind_query(&mut root, query)?;
        }

        for ((_, value), fields) in bindings.iter().zip(&self.path_fields) {
            let json = scalar_json(fields.last(), value).map_err(|reason| {
                GatewayError::InvalidArgument(format!("path parameter {}: {reason}", dotted(fields)))
            })?;
            insert_at(&mut root, fields, json, Insert::Replace).map_err(|reason| {
                GatewayError::InvalidArgument(format!("path parameter {}: {reason}", dotted(fields)))
            })?;
        }

        let mut message = decode_json(&self.input, Value::Object(root))?;

        if let (Some(mask_field), Some(keys), BodyRule::Field(body_field)) = (&self.patch_mask, body_keys, &self.body)
            && !message.has_field(mask_field)
            && let Kind::Message(body_type) = body_field.kind()
        {
            let mut paths = Vec::new();
            collect_mask_paths(&body_type, &keys, "", &mut paths);
            let mut mask = DynamicMessage::new(mask_field_type(mask_field)?);
            mask.set_field_by_name("paths", ProtoValue::List(paths.into_iter().map(ProtoValue::String).collect()));
            message.set_field(mask_field, ProtoValue::Message(mask));
        }
        Ok(message)
    }

    fn bind_query(&self, root: &mut Map<String, Value>, query: &str) -> Result<(), GatewayError> {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let fields = resolve_field_path(&self.input, &key)
                .ok_or_else(|| GatewayError::InvalidArgument(format!("unknown query parameter {key:?}")))?;
            let bound_by_path = self.path_fields.iter().any(|p| is_prefix(p, &fields) || is_prefix(&fields, p));
            let bound_by_body = matches!(&self.body, BodyRule::Field(f) if fields.first() == Some(f));
            if bound_by_path || bound_by_body {
                return Err(GatewayError::InvalidArgument(format!(
                    "query parameter {key:?} sets a field already bound by the {}",
                    if bound_by_path { "path" } else { "body" }
                )));
            }
            let leaf = fields.last();
            if leaf.is_some_and(|f| f.is_map() || matches!(f.kind(), Kind::Message(m) if !is_string_encoded_wkt(&m))) {
                return Err(GatewayError::InvalidArgument(format!(
                    "query parameter {key:?} names a message field; set its fields instead (e.g. {key}.name=...)"
                )));
            }
            let json = scalar_json(leaf, &value)
                .map_err(|reason| GatewayError::InvalidArgument(format!("query parameter {key:?}: {reason}")))?;
            let mode = if leaf.is_some_and(FieldDescriptor::is_list) { Insert::Append } else { Insert::Once };
            insert_at(root, &fields, json, mode)
                .map_err(|reason| GatewayError::InvalidArgument(format!("query parameter {key:?}: {reason}")))?;
        }
        Ok(())
    }

    /// The response body: the whole message, or the `response_body` field.
    pub fn response(&self, message: &DynamicMessage) -> Result<Vec<u8>, GatewayError> {
        match &self.response_body {
            None => encode_json(message),
            Some(field) => {
                let value = message_to_value(message)?;
                let part = value.get(field.json_name()).cloned().unwrap_or(Value::Null);
                serde_json::to_vec(&part).map_err(|e| GatewayError::Upstream(tonic::Status::internal(e.to_string())))
            }
        }
    }
}

fn mask_field_type(field: &FieldDescriptor) -> Result<MessageDescriptor, GatewayError> {
    match field.kind() {
        Kind::Message(m) => Ok(m),
        _ => Err(GatewayError::Upstream(tonic::Status::internal("update mask field is not a message"))),
    }
}

/// Serializes a message as JSON bytes.
pub fn encode_json(message: &DynamicMessage) -> Result<Vec<u8>, GatewayError> {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::new(&mut out);
    message
        .serialize_with_options(&mut serializer, &JSON_OUTPUT)
        .map_err(|e| GatewayError::Upstream(tonic::Status::internal(format!("cannot encode the response: {e}"))))?;
    Ok(out)
}

pub fn message_to_value(message: &DynamicMessage) -> Result<Value, GatewayError> {
    message
        .serialize_with_options(serde_json::value::Serializer, &JSON_OUTPUT)
        .map_err(|e| GatewayError::Upstream(tonic::Status::internal(format!("cannot encode the response: {e}"))))
}

/// Parses JSON bytes; the error says where the syntax broke.
pub fn parse_body(bytes: &[u8]) -> Result<Option<Value>, GatewayError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| GatewayError::MalformedJson(e.to_string()))
}

/// Applies the JSON mapping, naming the offending field on failure.
pub fn decode_json(descriptor: &MessageDescriptor, value: Value) -> Result<DynamicMessage, GatewayError> {
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(descriptor.clone(), deserializer, &DeserializeOptions::new()).map_err(
        |e| {
            let path = track.path().to_string();
            if path.is_empty() || path == "." {
                GatewayError::InvalidArgument(format!("invalid request: {e}"))
            } else {
                GatewayError::InvalidArgument(format!("invalid request field {path}: {e}"))
            }
        },
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// Path variables: overwrite whatever the body said.
    Replace,
    /// Singular query parameters: a second value is an error.
    Once,
    /// Repeated query parameters: collect into a list.
    Append,
}

fn insert_at(
    root: &mut Map<String, Value>,
    fields: &[FieldDescriptor],
    value: Value,
    mode: Insert,
) -> Result<(), String> {
    let Some((leaf, parents)) = fields.split_last() else { return Err("empty field path".to_owned()) };
    let mut object = root;
    for parent in parents {
        // The body may spell a key by its JSON name; use one spelling.
        if parent.json_name() != parent.name()
            && let Some(existing) = object.remove(parent.json_name())
        {
            object.insert(parent.name().to_owned(), existing);
        }
        let slot = object.entry(parent.name().to_owned()).or_insert_with(|| Value::Object(Map::new()));
        object = match slot {
            Value::Object(map) => map,
            Value::Null => {
                *slot = Value::Object(Map::new());
                match slot {
                    Value::Object(map) => map,
                    _ => return Err("internal error".to_owned()),
                }
            }
            other => return Err(format!("{} is a {}, not an object", parent.name(), json_kind(other))),
        };
    }
    if leaf.json_name() != leaf.name() {
        object.remove(leaf.json_name());
    }
    match mode {
        Insert::Replace => {
            object.insert(leaf.name().to_owned(), value);
        }
        Insert::Once => {
            if object.contains_key(leaf.name()) {
                return Err("given more than once for a singular field".to_owned());
            }
            object.insert(leaf.name().to_owned(), value);
        }
        Insert::Append => match object.entry(leaf.name().to_owned()).or_insert_with(|| Value::Array(Vec::new())) {
            Value::Array(items) => items.push(value),
            _ => return Err("cannot add to a non-list value".to_owned()),
        },
    }
    Ok(())
}

/// A path or query string value as the JSON the mapping expects: booleans
/// as JSON booleans, everything else as a string (the mapping accepts
/// numbers, enums and string-encoded well-known types as strings).
fn scalar_json(field: Option<&FieldDescriptor>, value: &str) -> Result<Value, String> {
    match field.map(FieldDescriptor::kind) {
        Some(Kind::Bool) => match value.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Value::Bool(true)),
            "false" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("{value:?} is not a boolean")),
        },
        _ => Ok(Value::String(value.to_owned())),
    }
}

/// Well-known types whose JSON form is a string (or a number accepted as a
/// string), so they can come from a path or query parameter.
fn is_string_encoded_wkt(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.BoolValue"
    )
}

/// Resolves `a.b.c` (proto or JSON names) to the fields along the way.
pub fn resolve_field_path(message: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut fields = Vec::new();
    let mut current = message.clone();
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let field = current.get_field_by_name(segment).or_else(|| current.get_field_by_json_name(segment))?;
        if segments.peek().is_some() {
            match field.kind() {
                Kind::Message(next) if !field.is_list() && !field.is_map() => current = next,
                _ => return None,
            }
        }
        fields.push(field);
    }
    Some(fields)
}

fn is_prefix(prefix: &[FieldDescriptor], path: &[FieldDescriptor]) -> bool {
    prefix.len() <= path.len() && prefix.iter().zip(path).all(|(a, b)| a == b)
}

fn dotted(fields: &[FieldDescriptor]) -> String {
    fields.iter().map(FieldDescriptor::name).collect::<Vec<_>>().join(".")
}

/// Field-mask paths for the keys present in a PATCH body, descending into
/// nested plain messages (not well-known types or maps, which are replaced
/// whole).
fn collect_mask_paths(message: &MessageDescriptor, object: &Map<String, Value>, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in object {
        let Some(field) = message.get_field_by_json_name(key).or_else(|| message.get_field_by_name(key)) else {
            continue;
        };
        let path = if prefix.is_empty() { field.name().to_owned() } else { format!("{prefix}.{}", field.name()) };
        match (field.kind(), value) {
            (Kind::Message(nested), Value::Object(inner))
                if !field.is_list() && !field.is_map() && !nested.full_name().starts_with("google.protobuf.") =>
            {
                collect_mask_paths(&nested, inner, &path, out);
            }
            _ => out.push(path),
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
