//! `google.api.http` path templates and the table that matches requests
//! against them.
//!
//! Grammar (from the HttpRule documentation):
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! Verb     = ":" LITERAL ;
//! ```
//! `{f}` is short for `{f=*}`; `**` matches zero or more segments and must
//! come last.

use std::fmt;

use http::Method;

/// One parsed path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
    source: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: the rest of the path, possibly empty.
    Rest,
}

/// A field bound to a run of segments.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Variable {
    field_path: String,
    start: usize,
    end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path template {template:?}: {reason}")]
pub struct TemplateError {
    /// The template as written in the annotation.
    pub template: String,
    /// What is wrong with it.
    pub reason: String,
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let fail = |reason: &str| TemplateError { template: template.to_owned(), reason: reason.to_owned() };
        let rest = template.strip_prefix('/').ok_or_else(|| fail("must start with '/'"))?;

        // The verb is a ':' after the last segment, outside any braces.
        let mut depth = 0i32;
        let mut verb_at = None;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                '/' if depth == 0 => verb_at = None,
                ':' if depth == 0 => verb_at = Some(i),
                _ => {}
            }
        }
        let (body, verb) = match verb_at {
            Some(i) => {
                let verb = &rest[i + 1..];
                if verb.is_empty() || verb.contains(['/', '{', '}', '*']) {
                    return Err(fail("the verb after ':' must be a literal"));
                }
                (&rest[..i], Some(verb.to_owned()))
            }
            None => (rest, None),
        };

        let mut segments = Vec::new();
        let mut variables: Vec<Variable> = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(after_brace) = chars.strip_prefix('{') {
                let close = after_brace.find('}').ok_or_else(|| fail("unclosed '{'"))?;
                let inner = &after_brace[..close];
                let (field_path, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
                if field_path.is_empty()
                    || !field_path
                        .split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
                {
                    return Err(fail("a variable needs a field path such as {user.user_id}"));
                }
                if variables.iter().any(|v| v.field_path == field_path) {
                    return Err(fail("a field is bound twice"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(parse_plain_segment(part).ok_or_else(|| fail("invalid segment inside a variable"))?);
                }
                variables.push(Variable { field_path: field_path.to_owned(), start, end: segments.len() });
                chars = &after_brace[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                if part.contains(['{', '}']) {
                    return Err(fail("a variable must span whole segments"));
                }
                segments.push(parse_plain_segment(part).ok_or_else(|| fail("empty or invalid segment"))?);
                chars = &chars[end..];
            }
            if let Some(next) = chars.strip_prefix('/') {
                if next.is_empty() {
                    return Err(fail("trailing '/'"));
                }
                chars = next;
            } else if !chars.is_empty() {
                return Err(fail("expected '/' between segments"));
            }
        }
        if let Some(pos) = segments.iter().position(|s| *s == Segment::Rest)
            && pos + 1 != segments.len()
        {
            return Err(fail("'**' must be the last segment"));
        }
        Ok(Self { segments, variables, verb, source: template.to_owned() })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Field paths bound by the path, in order.
    pub fn field_paths(&self) -> impl Iterator<Item = &str> {
        self.variables.iter().map(|v| v.field_path.as_str())
    }

    /// A key equal for two templates exactly when they match the same paths.
    fn shape(&self) -> String {
        let mut shape = String::new();
        for segment in &self.segments {
            shape.push('/');
            match segment {
                Segment::Literal(l) => shape.push_str(l),
                Segment::One => shape.push('*'),
                Segment::Rest => shape.push_str("**"),
            }
        }
        if let Some(verb) = &self.verb {
            shape.push(':');
            shape.push_str(verb);
        }
        shape
    }

    /// Orders templates so the most specific is tried first.
    fn specificity(&self) -> (bool, usize, bool, usize) {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        let has_rest = self.segments.contains(&Segment::Rest);
        (self.verb.is_some(), literals, !has_rest, self.segments.len())
    }

    /// Matches a request path, returning each variable's decoded value.
    pub fn matches(&self, path: &str) -> Option<Vec<(&str, String)>> {
        let mut rest = path.strip_prefix('/')?;
        if let Some(verb) = &self.verb {
            rest = rest.strip_suffix(verb.as_str())?.strip_suffix(':')?;
        }
        let raw: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
        let has_rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(has_rest);
        if raw.len() < fixed || (!has_rest && raw.len() != fixed) {
            return None;
        }
        for (segment, part) in self.segments.iter().zip(&raw) {
            match segment {
                Segment::Literal(literal) => {
                    if percent_decode(part, false)? != *literal {
                        return None;
                    }
                }
                Segment::One => {
                    if part.is_empty() {
                        return None;
                    }
                }
                Segment::Rest => {}
            }
        }
        let mut values = Vec::with_capacity(self.variables.len());
        for variable in &self.variables {
            let end = if variable.end == self.segments.len() && has_rest { raw.len() } else { variable.end };
            let parts = &raw[variable.start..end];
            let value = if parts.len() == 1 && end - variable.start == 1 && !has_rest_in(&self.segments, variable) {
                percent_decode(parts[0], false)?
            } else {
                // Multi-segment values keep an encoded '/' encoded, so the
                // separators stay unambiguous.
                let decoded: Option<Vec<String>> = parts.iter().map(|p| percent_decode(p, true)).collect();
                decoded?.join("/")
            };
            values.push((variable.field_path.as_str(), value));
        }
        Some(values)
    }
}

fn has_rest_in(segments: &[Segment], variable: &Variable) -> bool {
    segments[variable.start..variable.end].contains(&Segment::Rest)
}

fn parse_plain_segment(part: &str) -> Option<Segment> {
    match part {
        "*" => Some(Segment::One),
        "**" => Some(Segment::Rest),
        "" => None,
        literal if literal.contains(['*', '{', '}', '=']) => None,
        literal => Some(Segment::Literal(literal.to_owned())),
    }
}

/// Checks that every `%XX` escape in a request path is well formed and
/// decodes to UTF-8; the error says what is wrong, for a 400.
pub fn check_escapes(path: &str) -> Result<(), String> {
    match percent_decode(path, false) {
        Some(_) => Ok(()),
        None => Err(format!("malformed percent-encoding in the path {path:?}")),
    }
}

/// Decodes `%XX` escapes; `None` for a broken escape or invalid UTF-8.
fn percent_decode(part: &str, keep_slash: bool) -> Option<String> {
    if !part.contains('%') {
        return Some(part.to_owned());
    }
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let value = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if keep_slash && value == b'/' {
                out.extend_from_slice(&bytes[i..i + 3]);
            } else {
                out.push(value);
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Two bindings that would match the same requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conflicting HTTP routes: {method} {template} is bound by both {first} and {second}")]
pub struct RouteConflict {
    /// The HTTP method both routes claim.
    pub method: Method,
    /// The template both match.
    pub template: String,
    /// The gRPC method routed first.
    pub first: String,
    /// The gRPC method that conflicts with it.
    pub second: String,
}

/// Every route, most specific first.
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<Route<T>>,
}

#[derive(Debug)]
struct Route<T> {
    method: Method,
    template: PathTemplate,
    shape: String,
    target: T,
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup<'a, T> {
    Found {
        target: &'a T,
        /// The path variables, by field path, as the request spelled them.
        bindings: Vec<(&'a str, String)>,
    },
    /// The path exists, for other methods.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self { routes: Vec::new() }
    }
}

impl<T> RouteTable<T> {
    /// Adds a route; `name` identifies its owner in conflict errors.
    pub fn insert(
        &mut self,
        method: Method,
        template: PathTemplate,
        target: T,
        name: impl Fn(&T) -> String,
    ) -> Result<(), RouteConflict> {
        let shape = template.shape();
        if let Some(existing) = self.routes.iter().find(|r| r.method == method && r.shape == shape) {
            return Err(RouteConflict {
                method,
                template: template.source.clone(),
                first: name(&existing.target),
                second: name(&target),
            });
        }
        let position = self
            .routes
            .iter()
            .position(|r| r.template.specificity() < template.specificity())
            .unwrap_or(self.routes.len());
        self.routes.insert(position, Route { method, template, shape, target });
        Ok(())
    }

    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_, T> {
        let mut allowed = Vec::new();
        for route in &self.routes {
            let Some(bindings) = route.template.matches(path) else { continue };
            if route.method == *method {
                return Lookup::Found { target: &route.target, bindings };
            }
            if !allowed.contains(&route.method) {
                allowed.push(route.method.clone());
            }
        }
        if allowed.is_empty() { Lookup::NotFound } else { Lookup::MethodNotAllowed(allowed) }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Method, &PathTemplate, &T)> {
        self.routes.iter().map(|r| (&r.method, &r.template, &r.target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(t: &str) -> PathTemplate {
        match PathTemplate::parse(t) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn bound(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        template(t).matches(path).map(|b| b.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    fn pairs(items: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(items.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    #[test]
    fn literal_paths() {
        assert_eq!(bound("/v1/users", "/v1/users"), pairs(&[]));
        assert_eq!(bound("/v1/users", "/v1/users/x"), None);
        assert_eq!(bound("/v1/users", "/v1/user"), None);
        assert_eq!(bound("/v1/users", "/v1/users/"), None);
    }

    #[test]
    fn simple_variables() {
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/u1"), pairs(&[("user_id", "u1")]));
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/a%20b"), pairs(&[("user_id", "a b")]));
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/a%2Fb"), pairs(&[("user_id", "a/b")]));
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/"), None);
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/a/b"), None);
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/%zz"), None);
    }

    #[test]
    fn nested_field_paths() {
        assert_eq!(bound("/v1/users/{user.user_id}", "/v1/users/u1"), pairs(&[("user.user_id", "u1")]));
    }

    #[test]
    fn variables_with_segment_patterns() {
        let t = "/v1/{name=shelves/*/books/*}";
        assert_eq!(bound(t, "/v1/shelves/s1/books/b2"), pairs(&[("name", "shelves/s1/books/b2")]));
        assert_eq!(bound(t, "/v1/shelves/s1/books"), None);
        assert_eq!(bound(t, "/v1/shelves/s1/cds/b2"), None);
        assert_eq!(bound(t, "/v1/shelves/s%2F1/books/b2"), pairs(&[("name", "shelves/s%2F1/books/b2")]));
    }

    #[test]
    fn double_wildcards() {
        let t = "/v1/files/{path=**}";
        assert_eq!(bound(t, "/v1/files/a/b/c.txt"), pairs(&[("path", "a/b/c.txt")]));
        assert_eq!(bound(t, "/v1/files/a"), pairs(&[("path", "a")]));
        assert_eq!(bound(t, "/v1/files"), pairs(&[("path", "")]));
        assert_eq!(bound("/v1/{name=projects/*/**}", "/v1/projects/p/x/y"), pairs(&[("name", "projects/p/x/y")]));
        assert_eq!(bound("/v1/*/**", "/v1/a/b/c"), pairs(&[]));
        assert!(PathTemplate::parse("/v1/**/x").is_err());
    }

    #[test]
    fn custom_verbs() {
        assert_eq!(bound("/v1/users:watch", "/v1/users:watch"), pairs(&[]));
        assert_eq!(bound("/v1/users:watch", "/v1/users"), None);
        assert_eq!(bound("/v1/users:watch", "/v1/users:list"), None);
        assert_eq!(bound("/v1/{name=users/*}:undelete", "/v1/users/u1:undelete"), pairs(&[("name", "users/u1")]));
        // Without a verb in the template, a colon is part of the value.
        assert_eq!(bound("/v1/users/{user_id}", "/v1/users/a:b"), pairs(&[("user_id", "a:b")]));
    }

    #[test]
    fn invalid_templates_are_rejected() {
        for bad in ["v1/users", "/v1/{", "/v1/{}", "/v1/{a}/{a}", "/v1/users/", "/v1/x{a}", "/v1/users:", "/v1//x"] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn the_table_prefers_specific_routes_and_reports_methods() {
        let mut table = RouteTable::default();
        let name = |t: &&str| (*t).to_owned();
        let insert = |table: &mut RouteTable<&str>, m: Method, t: &str, target: &'static str| {
            table.insert(m, template(t), target, name)
        };
        assert!(insert(&mut table, Method::GET, "/v1/users/{user_id}", "get").is_ok());
        assert!(insert(&mut table, Method::GET, "/v1/users:watch", "watch").is_ok());
        assert!(insert(&mut table, Method::GET, "/v1/users/me", "me").is_ok());
        assert!(insert(&mut table, Method::DELETE, "/v1/users/{user_id}", "delete").is_ok());

        let found = |m: &Method, p: &str| match table.lookup(m, p) {
            Lookup::Found { target, .. } => Some(*target),
            _ => None,
        };
        assert_eq!(found(&Method::GET, "/v1/users/u1"), Some("get"));
        assert_eq!(found(&Method::GET, "/v1/users/me"), Some("me"));
        assert_eq!(found(&Method::GET, "/v1/users:watch"), Some("watch"));
        assert_eq!(found(&Method::DELETE, "/v1/users/u1"), Some("delete"));
        match table.lookup(&Method::PUT, "/v1/users/u1") {
            Lookup::MethodNotAllowed(methods) => {
                assert!(methods.contains(&Method::GET) && methods.contains(&Method::DELETE))
            }
            other => panic!("expected 405, got {other:?}"),
        }
        assert!(matches!(table.lookup(&Method::GET, "/v2/nothing"), Lookup::NotFound));

        let conflict = insert(&mut table, Method::GET, "/v1/users/{other}", "dup");
        assert_eq!(conflict.err().map(|c| (c.first, c.second)), Some(("get".to_owned(), "dup".to_owned())));
    }
}
