//! Bearer-token authentication. Tokens come from `auth.tokens` and are
//! compared in constant time; health and reflection are exempt. A missing
//! and a wrong token get the same UNAUTHENTICATED answer, so a caller
//! learns nothing about which it was.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::call::ShortCircuit;
use super::method::method_of;
use crate::config::AuthSettings;

/// The accepted tokens. Authentication is off when `auth.disabled` is set
/// or, outside production, when no token is configured.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<[Box<[u8]>]>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authenticator({} tokens)", self.tokens.len())
    }
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Self {
        let tokens =
            if settings.disabled { Vec::new() } else { settings.tokens.iter().map(|t| t.as_bytes().into()).collect() };
        Self { tokens: tokens.into() }
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks an `authorization` header value.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = header.and_then(bearer_token) else { return false };
        // Compare against every token, without stopping at a match.
        self.tokens.iter().fold(false, |found, known| found | constant_time_eq(known, token))
    }
}

/// The token of a `Bearer <token>` header; the scheme is case-insensitive.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Equality whose time depends only on the length of `known`.
fn constant_time_eq(known: &[u8], given: &[u8]) -> bool {
    let mut difference = known.len() ^ given.len();
    for (i, byte) in known.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
    }
    std::hint::black_box(difference) == 0
}

#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ShortCircuit<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let exempt = method_of(&request).is_some_and(|m| m.auth_exempt);
        if exempt || !self.auth.enabled() {
            return ShortCircuit::Pass { inner: self.inner.call(request) };
        }
        let header = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        if self.auth.accepts(header) {
            ShortCircuit::Pass { inner: self.inner.call(request) }
        } else {
            ShortCircuit::reject(Status::unauthenticated("missing or invalid credentials"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &[&str]) -> Authenticator {
        Authenticator::new(&AuthSettings { tokens: tokens.iter().map(|t| (*t).to_owned()).collect(), disabled: false })
    }

    #[test]
    fn accepts_only_configured_bearer_tokens() {
        let a = auth(&["alpha", "beta"]);
        assert!(a.accepts(Some(b"Bearer alpha")));
        assert!(a.accepts(Some(b"bearer beta")));
        assert!(!a.accepts(Some(b"Bearer alph")));
        assert!(!a.accepts(Some(b"Bearer alphaa")));
        assert!(!a.accepts(Some(b"Basic alpha")));
        assert!(!a.accepts(Some(b"Bearer ")));
        assert!(!a.accepts(Some(b"alpha")));
        assert!(!a.accepts(None));
    }

    #[test]
    fn is_off_without_tokens_or_when_disabled() {
        assert!(!auth(&[]).enabled());
        let disabled = Authenticator::new(&AuthSettings { tokens: vec!["t".into()], disabled: true });
        assert!(!disabled.enabled());
    }
}
