//! JSON ⇄ protobuf for the gateway, using the proto3 JSON mapping.
//!
//! A request is assembled as one JSON object: the body (at the root for
//! `body: "*"`, or under the bound field), query parameters for the fields
//! neither the path nor the body binds, and the path variables last, since
//! the path wins. That object then goes through the JSON mapping once, so
//! every field type (enums, well-known types, 64-bit integers) parses the
//! same way wherever it came from.
//!
//! Path and query strings are first turned into the JSON the mapping
//! expects, parsing scalars as grpc-gateway's `runtime.PopulateFieldFromPath`
//! does: enums by name or number, booleans as Go's `strconv.ParseBool`,
//! field masks as comma-separated paths in either spelling, and map entries
//! as `field[key]=value`.
//!
//! `google.api.HttpBody` is the exception to JSON both ways: a request body
//! bound to one is taken raw with its Content-Type, and a response that is
//! one is written raw with its own.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value as ProtoValue,
};
use serde_json::{Map, Value};

use super::error::{GatewayError, JSON_OUTPUT};
use crate::config::UnknownFields;

/// The message type of raw HTTP bodies.
pub const HTTP_BODY: &str = "google.api.HttpBody";

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
    /// Unknown JSON fields and query parameters: a 400, or dropped.
    pub unknown_fields: UnknownFields,
    /// The body is a raw `google.api.HttpBody` (the whole request, or the
    /// bound field), not JSON.
    pub raw_request: bool,
    /// The response (or its `response_body` field) is a `google.api.HttpBody`,
    /// written raw.
    pub raw_response: bool,
}

/// A request body, as the binding reads it.
#[derive(Debug)]
pub enum RequestBody {
    /// Parsed JSON (`None`: no body or only whitespace).
    Json(Option<Value>),
    /// The bytes of a `google.api.HttpBody` binding, and their type.
    Raw { content_type: String, data: bytes::Bytes },
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
        let raw_request = match &body {
            BodyRule::Whole => input.full_name() == HTTP_BODY,
            BodyRule::Field(field) => is_http_body(field),
            BodyRule::None => false,
        };
        let raw_response = match &response_body {
            None => output.full_name() == HTTP_BODY,
            Some(field) => is_http_body(field),
        };
        Ok(Self {
            input,
            output,
            body,
            path_fields: resolved_paths,
            patch_mask,
            response_body,
            unknown_fields: UnknownFields::Reject,
            raw_request,
            raw_response,
        })
    }

    /// Sets what unknown JSON fields and query parameters do.
    #[must_use]
    pub fn with_unknown_fields(mut self, mode: UnknownFields) -> Self {
        self.unknown_fields = mode;
        self
    }

    fn ignores_unknown(&self) -> bool {
        self.unknown_fields == UnknownFields::Ignore
    }

    /// Like [`Self::request`], for a body read as [`RequestBody`].
    pub fn request_from(
        &self,
        bindings: &[(&str, String)],
        query: Option<&str>,
        body: RequestBody,
    ) -> Result<DynamicMessage, GatewayError> {
        let (content_type, data) = match body {
            RequestBody::Json(json) => return self.request(bindings, query, json),
            RequestBody::Raw { content_type, data } => (content_type, data),
        };
        let mut message = self.request(bindings, query, None)?;
        let mut raw = match &self.body {
            BodyRule::Field(field) => match field.kind() {
                Kind::Message(descriptor) => DynamicMessage::new(descriptor),
                _ => return Err(internal("the HttpBody field is not a message")),
            },
            _ => message.clone(),
        };
        raw.set_field_by_name("content_type", ProtoValue::String(content_type));
        raw.set_field_by_name("data", ProtoValue::Bytes(data));
        match &self.body {
            BodyRule::Field(field) => message.set_field(field, ProtoValue::Message(raw)),
            _ => message = raw,
        }
        Ok(message)
    }

    /// A raw response: the `google.api.HttpBody`'s content type and data.
    pub fn raw_response(&self, message: &DynamicMessage) -> Result<(String, bytes::Bytes), GatewayError> {
        let body = match &self.response_body {
            None => std::borrow::Cow::Borrowed(message),
            Some(field) => match message.get_field(field).as_ref() {
                ProtoValue::Message(inner) => std::borrow::Cow::Owned(inner.clone()),
                _ => return Err(internal("the response_body field is not an HttpBody")),
            },
        };
        let content_type =
            body.get_field_by_name("content_type").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let data = body.get_field_by_name("data").and_then(|v| v.as_bytes().cloned()).unwrap_or_default();
        Ok((content_type, data))
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

        let mut message = self.decode(Value::Object(root))?;

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
            let invalid = |reason: String| GatewayError::InvalidArgument(format!("query parameter {key:?}: {reason}"));
            // `labels[k]=v` sets one entry of a map field, as in grpc-gateway.
            let (name, map_key) = match key.strip_suffix(']').and_then(|k| k.split_once('[')) {
                Some((name, map_key)) => (name, Some(map_key)),
                None => (key.as_ref(), None),
            };
            let Some(fields) = resolve_field_path(&self.input, name) else {
                if self.ignores_unknown() {
                    continue;
                }
                return Err(GatewayError::InvalidArgument(format!("unknown query parameter {key:?}")));
            };
            let bound_by_path = self.path_fields.iter().any(|p| is_prefix(p, &fields) || is_prefix(&fields, p));
            let bound_by_body = matches!(&self.body, BodyRule::Field(f) if fields.first() == Some(f));
            if bound_by_path || bound_by_body {
                if self.ignores_unknown() {
                    continue;
                }
                return Err(GatewayError::InvalidArgument(format!(
                    "query parameter {key:?} sets a field already bound by the {}",
                    if bound_by_path { "path" } else { "body" }
                )));
            }
            let Some(leaf) = fields.last() else { continue };
            if let Some(map_key) = map_key {
                let value_field = match leaf.kind() {
                    Kind::Message(entry) if leaf.is_map() => entry.map_entry_value_field(),
                    _ => return Err(invalid(format!("{name} is not a map field"))),
                };
                if matches!(value_field.kind(), Kind::Message(m) if !is_string_encoded_wkt(&m)) {
                    return Err(invalid(format!("the values of {name} are messages")));
                }
                let json = scalar_json(Some(&value_field), &value).map_err(invalid)?;
                insert_at(root, &fields, json, Insert::MapEntry(map_key)).map_err(invalid)?;
                continue;
            }
            if leaf.is_map() || matches!(leaf.kind(), Kind::Message(m) if !is_string_encoded_wkt(&m)) {
                return Err(GatewayError::InvalidArgument(format!(
                    "query parameter {key:?} names a message or map field; set its fields instead \
                     (e.g. {key}.name=... or {key}[key]=...)"
                )));
            }
            let is_mask = matches!(leaf.kind(), Kind::Message(m) if m.full_name() == FIELD_MASK);
            let json = if is_mask {
                Value::String(mask_json(&value))
            } else {
                scalar_json(Some(leaf), &value).map_err(invalid)?
            };
            let mode = if leaf.is_list() {
                Insert::Append
            } else if is_mask {
                Insert::Join
            } else {
                Insert::Once
            };
            insert_at(root, &fields, json, mode).map_err(invalid)?;
        }
        Ok(())
    }

    /// The response body: the whole message, or the `response_body` field.
    pub fn response(&self, message: &DynamicMessage) -> Result<Vec<u8>, GatewayError> {
        match &self.response_body {
            None => encode_json(message),
            // The field alone; `null` when it is unset and has presence,
            // as its key would be absent or `null` in the whole message.
            Some(field) => {
                let mut out = Vec::with_capacity(128);
                if field.supports_presence() && !message.has_field(field) {
                    out.extend_from_slice(b"null");
                } else {
                    super::json::value(&mut out, &field.kind(), &message.get_field(field))
                        .map_err(|e| internal(&format!("cannot encode the response: {e}")))?;
                }
                Ok(out)
            }
        }
    }

    /// Decodes a JSON body, dropping unknown fields when so configured.
    fn decode(&self, value: Value) -> Result<DynamicMessage, GatewayError> {
        let options = DeserializeOptions::new().deny_unknown_fields(!self.ignores_unknown());
        decode_json_with(&self.input, value, &options)
    }
}

const FIELD_MASK: &str = "google.protobuf.FieldMask";

fn is_http_body(field: &FieldDescriptor) -> bool {
    !field.is_list() && matches!(field.kind(), Kind::Message(m) if m.full_name() == HTTP_BODY)
}

fn internal(message: &str) -> GatewayError {
    GatewayError::Upstream(tonic::Status::internal(message.to_owned()))
}

/// A query field mask (`display_name,user.email`, or the same in camelCase)
/// as the JSON mapping's string form, which is camelCase: grpc-gateway keeps
/// the paths as written, so both spellings must reach the service as the
/// same proto names.
fn mask_json(value: &str) -> String {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|path| path.split('.').map(lower_camel).collect::<Vec<_>>().join("."))
        .collect::<Vec<_>>()
        .join(",")
}

fn lower_camel(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    let mut upper = false;
    for c in segment.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn mask_field_type(field: &FieldDescriptor) -> Result<MessageDescriptor, GatewayError> {
    match field.kind() {
        Kind::Message(m) => Ok(m),
        _ => Err(GatewayError::Upstream(tonic::Status::internal("update mask field is not a message"))),
    }
}

/// Serializes a message as JSON bytes (see [`super::json`]).
pub fn encode_json(message: &DynamicMessage) -> Result<Vec<u8>, GatewayError> {
    let mut out = Vec::with_capacity(256);
    super::json::write_message(&mut out, message).map_err(|e| internal(&format!("cannot encode the response: {e}")))?;
    Ok(out)
}

/// The message in the JSON mapping, unset singular message fields as `null`.
/// Through JSON text rather than `serde_json`'s value serializer, which
/// widens a `float` to `f64` (`0.1` would read `0.10000000149011612`).
pub fn message_to_value(message: &DynamicMessage) -> Result<Value, GatewayError> {
    let mut bytes = Vec::with_capacity(256);
    message
        .serialize_with_options(&mut serde_json::Serializer::new(&mut bytes), &JSON_OUTPUT)
        .map_err(|e| internal(&format!("cannot encode the response: {e}")))?;
    let mut value: Value =
        serde_json::from_slice(&bytes).map_err(|e| internal(&format!("cannot encode the response: {e}")))?;
    emit_null_messages(&message.descriptor(), &mut value);
    Ok(value)
}

/// Writes `"field": null` for every unset singular message field, at every
/// depth, as grpc-gateway's default marshaler (protojson `EmitUnpopulated`)
/// does: prost-reflect emits zeros and `[]` but omits unset messages. As in
/// protojson, members of a oneof (proto3 `optional` included) stay absent,
/// and well-known types, whose JSON is not an object of fields, are left
/// alone.
fn emit_null_messages(descriptor: &MessageDescriptor, value: &mut Value) {
    let Value::Object(object) = value else { return };
    if descriptor.full_name().starts_with("google.protobuf.") {
        return;
    }
    for field in descriptor.fields() {
        let Kind::Message(nested) = field.kind() else { continue };
        if field.is_map() {
            let value_field = nested.map_entry_value_field();
            if let (Kind::Message(values), Some(Value::Object(entries))) =
                (value_field.kind(), object.get_mut(field.json_name()))
            {
                entries.values_mut().for_each(|v| emit_null_messages(&values, v));
            }
        } else if field.is_list() {
            if let Some(Value::Array(items)) = object.get_mut(field.json_name()) {
                items.iter_mut().for_each(|v| emit_null_messages(&nested, v));
            }
        } else if let Some(present) = object.get_mut(field.json_name()) {
            emit_null_messages(&nested, present);
        } else if field.containing_oneof().is_none() {
            object.insert(field.json_name().to_owned(), Value::Null);
        }
    }
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
    decode_json_with(descriptor, value, &DeserializeOptions::new())
}

fn decode_json_with(
    descriptor: &MessageDescriptor,
    value: Value,
    options: &DeserializeOptions,
) -> Result<DynamicMessage, GatewayError> {
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(descriptor.clone(), deserializer, options).map_err(|e| {
        let path = track.path().to_string();
        if path.is_empty() || path == "." {
            GatewayError::InvalidArgument(format!("invalid request: {e}"))
        } else {
            GatewayError::InvalidArgument(format!("invalid request field {path}: {e}"))
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Insert<'a> {
    /// Path variables: overwrite whatever the body said.
    Replace,
    /// Singular query parameters: a second value is an error.
    Once,
    /// Repeated query parameters: collect into a list.
    Append,
    /// Field masks: a second value adds its paths.
    Join,
    /// `map[key]=value`: one entry of a map field.
    MapEntry(&'a str),
}

fn insert_at(
    root: &mut Map<String, Value>,
    fields: &[FieldDescriptor],
    value: Value,
    mode: Insert<'_>,
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
        Insert::Join => match (object.get_mut(leaf.name()), value) {
            (Some(Value::String(existing)), Value::String(more)) => {
                existing.push(',');
                existing.push_str(&more);
            }
            (_, value) => {
                object.insert(leaf.name().to_owned(), value);
            }
        },
        Insert::MapEntry(key) => {
            match object.entry(leaf.name().to_owned()).or_insert_with(|| Value::Object(Map::new())) {
                Value::Object(entries) => {
                    if entries.insert(key.to_owned(), value).is_some() {
                        return Err(format!("map key {key:?} given more than once"));
                    }
                }
                _ => return Err("cannot add an entry to a non-map value".to_owned()),
            }
        }
    }
    Ok(())
}

/// A path or query string value as the JSON the mapping expects: booleans
/// as JSON booleans (the spellings Go's `strconv.ParseBool` accepts, as
/// grpc-gateway), an enum given by number as a JSON number, everything
/// else as a string (the mapping accepts numbers, enum names and
/// string-encoded well-known types such as `90s` as strings).
fn scalar_json(field: Option<&FieldDescriptor>, value: &str) -> Result<Value, String> {
    match field.map(FieldDescriptor::kind) {
        Some(Kind::Bool) => match value {
            "true" | "True" | "TRUE" | "t" | "T" | "1" => Ok(Value::Bool(true)),
            "false" | "False" | "FALSE" | "f" | "F" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("{value:?} is not a boolean")),
        },
        Some(Kind::Enum(_)) => match value.parse::<i32>() {
            Ok(number) => Ok(Value::from(number)),
            Err(_) => Ok(Value::String(value.to_owned())),
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

#[cfg(test)]
mod json_tests {
    use prost_reflect::{DescriptorPool, DynamicMessage, Value};

    use super::encode_json;

    #[test]
    fn set_messages_are_written_directly_and_unset_ones_as_null() {
        let Ok(pool) = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET) else { panic!("descriptor set") };
        let (Some(user), Some(timestamp)) =
            (pool.get_message_by_name("user.v1.User"), pool.get_message_by_name("google.protobuf.Timestamp"))
        else {
            panic!("user.v1.User and Timestamp are in the descriptor set")
        };
        let mut when = DynamicMessage::new(timestamp);
        when.set_field_by_name("seconds", Value::I64(1_796_110_000));
        let mut message = DynamicMessage::new(user);
        message.set_field_by_name("user_id", Value::String("u1".to_owned()));
        message.set_field_by_name("create_time", Value::Message(when.clone()));
        let json = |m: &DynamicMessage| -> serde_json::Value {
            encode_json(m).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
        };
        let partial = json(&message);
        assert_eq!(partial.get("update_time"), Some(&serde_json::Value::Null), "{partial}");
        assert_eq!(partial["create_time"], "2026-12-01T07:26:40Z");

        message.set_field_by_name("update_time", Value::Message(when));
        let full = json(&message);
        assert_eq!(full["update_time"], "2026-12-01T07:26:40Z", "{full}");
        assert_eq!(full["user_id"], "u1");
        assert_eq!(full["roles"], serde_json::json!([]));
    }
}
