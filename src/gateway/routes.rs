//! Building the gateway: one route per `google.api.http` binding of every
//! REST-enabled service in the registry (or `POST /{Service}/{Method}` for
//! unannotated methods), checked for conflicts, plus the OpenAPI document
//! rendered from the same bindings.

use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderName, Method};
use prost_reflect::{ExtensionDescriptor, MethodDescriptor, Value as ProtoValue};

use super::cors;
use super::forward::{Forwarder, Timeouts};
use super::grpc_web::GrpcWeb;
use super::handler::{Gateway, HEALTH_PATH, OPENAPI_PATH};
use super::openapi;
use super::route::{self, PathTemplate, RouteTable};
use super::transcode::Transcoding;
use crate::config::HttpSettings;
use crate::metrics::{HttpMetrics, RouteMetrics};
use crate::proto::google::api::HttpRule;
use crate::proto::google::api::http_rule::Pattern;
use crate::registry::Services;

/// Why the gateway could not be built. Each is a defect in the protos.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{method}: invalid google.api.http binding")]
    Binding {
        method: String,
        #[source]
        source: BindingError,
    },
    #[error(transparent)]
    Conflict(#[from] route::RouteConflict),
}

/// What is wrong with one `google.api.http` rule.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error("additional_bindings must not nest")]
    Nested,
    #[error("invalid HTTP method {0:?}")]
    Method(String),
    #[error("an http rule needs a pattern")]
    NoPattern,
    #[error(transparent)]
    Template(#[from] route::TemplateError),
    #[error(transparent)]
    Plan(#[from] super::transcode::PlanError),
    #[error("invalid gRPC path")]
    GrpcPath(#[from] http::uri::InvalidUri),
    #[error("its route {template} shadows the gateway's {reserved}")]
    Reserved { template: String, reserved: &'static str },
}

/// One HTTP binding of one gRPC method.
#[derive(Debug)]
pub struct Binding {
    /// The gRPC method; OpenAPI reads its comments and types.
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: PathAndQuery,
    /// The HTTP method the binding answers.
    pub http_method: Method,
    /// The URL template matched against request paths.
    pub template: PathTemplate,
    /// Server streaming: answered as NDJSON or SSE.
    pub streaming: bool,
    /// The JSON ⇄ protobuf plan, resolved once.
    pub transcoding: Arc<Transcoding>,
    /// 0 for the main binding, then 1.. for `additional_bindings`.
    pub index: usize,
    /// Series labelled by this route's template.
    pub metrics: RouteMetrics,
}

impl Gateway {
    /// Derives a route for every binding of every REST-enabled service.
    pub fn build(
        services: &Services,
        forwarder: Forwarder,
        settings: &HttpSettings,
        metrics: &HttpMetrics,
    ) -> Result<Self, BuildError> {
        let pool = services.pool.clone();
        let http_extension = pool.get_extension_by_name("google.api.http");
        let mut routes = RouteTable::default();
        for service in services.rest() {
            let service = &service.descriptor;
            for method in service.methods() {
                let fail = |source: BindingError| BuildError::Binding { method: method.full_name().to_owned(), source };
                if method.is_client_streaming() {
                    tracing::warn!(method = method.full_name(), "client-streaming methods have no HTTP route");
                    continue;
                }
                let rules = http_rules(&method, http_extension.as_ref());
                let rules = if rules.is_empty() && settings.unannotated_routes {
                    vec![HttpRule {
                        pattern: Some(Pattern::Post(format!("/{}/{}", service.full_name(), method.name()))),
                        body: "*".to_owned(),
                        ..Default::default()
                    }]
                } else {
                    rules
                };
                for (index, rule) in rules.into_iter().enumerate() {
                    let binding = binding(&method, &rule, index, metrics, settings).map_err(fail)?;
                    for reserved in [HEALTH_PATH, OPENAPI_PATH] {
                        if binding.template.matches(reserved).is_some() {
                            return Err(fail(BindingError::Reserved {
                                template: binding.template.to_string(),
                                reserved,
                            }));
                        }
                    }
                    let http_method = binding.http_method.clone();
                    let template = binding.template.clone();
                    routes.insert(http_method, template, Arc::new(binding), |b: &Arc<Binding>| {
                        b.method.full_name().to_owned()
                    })?;
                }
            }
        }
        let openapi = openapi::document(routes.iter().map(|(_, _, b)| b.as_ref()));
        let permanent_headers = settings
            .permanent_headers
            .iter()
            .filter_map(|name| {
                let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()?;
                let key = HeaderName::from_bytes(format!("grpcgateway-{name}").as_bytes()).ok()?;
                Some((name, key))
            })
            .collect();
        Ok(Self {
            permanent_headers,
            grpc_web: GrpcWeb::new(forwarder.channel()),
            grpc_web_metrics: metrics.route("POST", "grpc-web"),
            cors: cors::layer(&settings.cors),
            pool,
            routes,
            http_metrics: metrics.clone(),
            health_metrics: metrics.route("GET", HEALTH_PATH),
            openapi_metrics: metrics.route("GET", OPENAPI_PATH),
            forwarder,
            timeouts: Timeouts {
                unary: settings.default_timeout,
                stream: settings.default_stream_timeout,
                max: settings.max_timeout,
            },
            max_body: settings.max_body_size.0,
            body_read_timeout: settings.body_read_timeout,
            sse_keepalive: settings.sse_keepalive,
            openapi: Bytes::from(openapi.to_string()),
        })
    }
}

/// The method's `google.api.http` rule and its additional bindings.
fn http_rules(method: &MethodDescriptor, extension: Option<&ExtensionDescriptor>) -> Vec<HttpRule> {
    let Some(extension) = extension else { return Vec::new() };
    let options = method.options();
    if !options.has_extension(extension) {
        return Vec::new();
    }
    let rule = match options.get_extension(extension).as_ref() {
        ProtoValue::Message(message) => message.transcode_to::<HttpRule>().ok(),
        _ => None,
    };
    let Some(mut rule) = rule else { return Vec::new() };
    let additional = std::mem::take(&mut rule.additional_bindings);
    std::iter::once(rule).chain(additional).collect()
}

fn binding(
    method: &MethodDescriptor,
    rule: &HttpRule,
    index: usize,
    metrics: &HttpMetrics,
    settings: &HttpSettings,
) -> Result<Binding, BindingError> {
    if index > 0 && !rule.additional_bindings.is_empty() {
        return Err(BindingError::Nested);
    }
    let (http_method, path) = match &rule.pattern {
        Some(Pattern::Get(p)) => (Method::GET, p.as_str()),
        Some(Pattern::Put(p)) => (Method::PUT, p.as_str()),
        Some(Pattern::Post(p)) => (Method::POST, p.as_str()),
        Some(Pattern::Delete(p)) => (Method::DELETE, p.as_str()),
        Some(Pattern::Patch(p)) => (Method::PATCH, p.as_str()),
        Some(Pattern::Custom(custom)) => (
            Method::from_bytes(custom.kind.as_bytes()).map_err(|_| BindingError::Method(custom.kind.clone()))?,
            custom.path.as_str(),
        ),
        None => return Err(BindingError::NoPattern),
    };
    let template = PathTemplate::parse(path)?;
    let transcoding = Transcoding::new(
        method.input(),
        method.output(),
        &rule.body,
        &rule.response_body,
        template.field_paths(),
        http_method == Method::PATCH,
    )?
    .with_unknown_fields(settings.unknown_fields);
    let grpc_path = PathAndQuery::try_from(format!("/{}/{}", method.parent_service().full_name(), method.name()))?;
    Ok(Binding {
        metrics: metrics.route(http_method.as_str(), template.as_str()),
        method: method.clone(),
        grpc_path,
        http_method,
        template,
        streaming: method.is_server_streaming(),
        transcoding: Arc::new(transcoding),
        index,
    })
}
