//! Bearer-token authentication: static tokens from `auth.tokens` or from
//! `auth.tokens_file` (watched through [`crate::secret_file`], so a rotated
//! Secret takes effect without a restart), compared in constant time, and
//! JWTs verified by [`crate::auth::JwtAuth`]; a call
//! passes if either accepts its token. Health and reflection are exempt. A
//! missing, wrong or invalid token gets the same UNAUTHENTICATED answer, so
//! a caller learns nothing about which it was (the debug log says). A valid
//! JWT without a scope the method requires gets PERMISSION_DENIED, and the
//! claims of an accepted JWT reach handlers as `Arc<Claims>`.
//!
//! Static tokens are the operator's own credentials and are not scoped:
//! they pass `auth.jwt.required_scopes`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::call::ShortCircuit;
use super::method::method_of;
use crate::auth::{JwtAuth, Refusal};
use crate::config::{AuthSettings, parse_tokens};
use crate::secret_file::{self, SecretFileError, Watched};

type TokenSet = Box<[Box<[u8]>]>;

/// The accepted tokens. Authentication is off when `auth.disabled` is set
/// or, outside production, when neither tokens nor `auth.jwt` are
/// configured.
#[derive(Clone)]
pub struct Authenticator {
    /// The current static tokens: fixed for `auth.tokens`, swapped on
    /// reload for `auth.tokens_file`. Each call reads the set once.
    tokens: Watched<TokenSet>,
    /// Whether static tokens are configured, decided at start: a tokens file
    /// never parses to an empty set, so a reload cannot switch auth off.
    static_tokens: bool,
    jwt: Option<JwtAuth>,
}

fn token_set(tokens: &[String]) -> TokenSet {
    tokens.iter().map(|t| t.as_bytes().into()).collect()
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authenticator({} tokens, jwt: {})", self.tokens.get().len(), self.jwt.is_some())
    }
}

impl Authenticator {
    /// The tokens of `settings`, and `jwt` when configured. With
    /// `auth.tokens_file`, the file is read now and, inside a tokio runtime,
    /// polled every [`secret_file::DEFAULT_POLL_INTERVAL`] from then on.
    pub fn new(settings: &AuthSettings, jwt: Option<JwtAuth>) -> Result<Self, SecretFileError> {
        Self::with_poll_interval(settings, jwt, secret_file::DEFAULT_POLL_INTERVAL)
    }

    /// As [`Self::new`], polling the tokens file every `interval`.
    pub fn with_poll_interval(
        settings: &AuthSettings,
        jwt: Option<JwtAuth>,
        interval: std::time::Duration,
    ) -> Result<Self, SecretFileError> {
        if settings.disabled {
            return Ok(Self { tokens: Watched::fixed(TokenSet::default()), static_tokens: false, jwt: None });
        }
        if settings.tokens_file.is_empty() {
            let tokens = token_set(&settings.tokens);
            let static_tokens = !tokens.is_empty();
            return Ok(Self { tokens: Watched::fixed(tokens), static_tokens, jwt });
        }
        let tokens = secret_file::watch(
            "auth.tokens_file",
            vec![settings.tokens_file.clone().into()],
            interval,
            |contents: &[Vec<u8>]| {
                let first = contents.first().map(Vec::as_slice).unwrap_or_default();
                parse_tokens(first).map(|tokens| token_set(&tokens))
            },
        )?;
        Ok(Self { tokens, static_tokens: true, jwt })
    }

    pub fn enabled(&self) -> bool {
        self.static_tokens || self.jwt.is_some()
    }

    /// Checks an `authorization` header value.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = header.and_then(bearer_token) else { return false };
        // Compare against every token, without stopping at a match.
        self.tokens.get().iter().fold(false, |found, known| found | constant_time_eq(known, token))
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

pin_project_lite::pin_project! {
    /// The auth layer's future: at once for static tokens and rejections,
    /// boxed for JWTs (whose keys may have to be fetched first).
    #[project = AuthFutureProj]
    pub enum AuthFuture<F, B, E> {
        Now { #[pin] short: ShortCircuit<F, B> },
        Jwt { boxed: Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>> },
    }
}

impl<F, B, E> Future for AuthFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthFutureProj::Now { short } => short.poll(cx),
            AuthFutureProj::Jwt { boxed } => boxed.as_mut().poll(cx),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // A method no service has is UNIMPLEMENTED for everyone, as grpc-go
        // answers before its interceptors run: nothing is served, and a
        // client (grpcurl against a pod with reflection off) gets the true
        // reason instead of a demand for credentials.
        let exempt = method_of(&request).is_some_and(|m| m.auth_exempt || !m.served);
        if exempt || !self.auth.enabled() {
            return AuthFuture::Now { short: ShortCircuit::Pass { inner: self.inner.call(request) } };
        }
        let header = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        if self.auth.accepts(header) {
            return AuthFuture::Now { short: ShortCircuit::Pass { inner: self.inner.call(request) } };
        }
        let token = header.and_then(bearer_token).and_then(|t| std::str::from_utf8(t).ok()).map(str::to_owned);
        let (Some(jwt), Some(token)) = (self.auth.jwt.clone(), token) else {
            tracing::debug!("no valid bearer token");
            let status = Status::unauthenticated("missing or invalid credentials");
            return AuthFuture::Now { short: ShortCircuit::reject(status) };
        };
        // The ready clone serves this call; a fresh clone takes its place
        // (the usual tower pattern for calls that await first).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        AuthFuture::Jwt {
            boxed: Box::pin(async move {
                let method = request.uri().path().to_owned();
                match jwt.verify(&token, &method).await {
                    Ok(claims) => {
                        request.extensions_mut().insert(Arc::new(claims));
                        inner.call(request).await
                    }
                    Err(Refusal::MissingScope) => {
                        tracing::debug!(method, "JWT lacks a scope the method requires");
                        Ok(Status::permission_denied("the token lacks a required scope").into_http())
                    }
                    Err(Refusal::Invalid(reason)) => {
                        tracing::debug!(method, reason, "JWT refused");
                        Ok(Status::unauthenticated("missing or invalid credentials").into_http())
                    }
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &[&str]) -> Authenticator {
        let settings = AuthSettings { tokens: tokens.iter().map(|t| (*t).to_owned()).collect(), ..Default::default() };
        Authenticator::new(&settings, None).unwrap()
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
        let settings = AuthSettings { tokens: vec!["t".into()], disabled: true, ..Default::default() };
        let disabled = Authenticator::new(&settings, None).unwrap();
        assert!(!disabled.enabled());
    }

    #[test]
    fn a_tokens_file_takes_commas_and_newlines() {
        let path = std::env::temp_dir().join(format!("keel-auth-tokens-{}", std::process::id()));
        std::fs::write(&path, "alpha,beta\n gamma \n\n").unwrap();
        let settings = AuthSettings { tokens_file: path.display().to_string(), ..AuthSettings::default() };
        let a = Authenticator::new(&settings, None).unwrap();
        assert!(a.enabled());
        for token in ["alpha", "beta", "gamma"] {
            assert!(a.accepts(Some(format!("Bearer {token}").as_bytes())), "{token}");
        }
        assert!(!a.accepts(Some(b"Bearer alpha,beta")));
        std::fs::write(&path, " ,\n").unwrap();
        let error = Authenticator::new(&settings, None).unwrap_err().to_string();
        assert!(error.contains("auth.tokens_file") && error.contains("no token"), "{error}");
        std::fs::remove_file(&path).unwrap();
    }
}
