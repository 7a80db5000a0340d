//! Cross-origin requests (`http.cors`), answered by tower-http's CORS layer
//! in front of every route, so preflights never reach route matching and
//! every response, errors included, carries the same CORS headers.

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsSettings;

/// The layer for `settings`, or `None` while no origin is allowed (CORS
/// off: no CORS header is sent and `OPTIONS` is routed like any method).
/// The values were validated with the config, so an entry that still does
/// not parse is skipped rather than failing the start.
pub fn layer(settings: &CorsSettings) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let origins = if settings.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(settings.allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let methods: Vec<Method> =
        settings.allowed_methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect();
    let names = |list: &[String]| -> Vec<HeaderName> {
        list.iter().filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()).collect()
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods(methods)
            .allow_headers(names(&settings.allowed_headers))
            .expose_headers(names(&settings.exposed_headers))
            .max_age(settings.max_age)
            .allow_credentials(settings.allow_credentials),
    )
}
