//! Bearer-token authentication. Tokens come from `auth.tokens` or from
//! `auth.tokens_file`, which is watched through [`crate::secret_file`] so a
//! rotated Secret takes effect without a restart, and are compared in
//! constant time; health and reflection are exempt. A missing and a wrong
//! token get the same UNAUTHENTICATED answer, so a caller learns nothing
//! about which it was.

use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::call::ShortCircuit;
use super::method::method_of;
use crate::config::{AuthSettings, parse_tokens};
use crate::secret_file::{self, SecretFileError, Watched};

type TokenSet = Box<[Box<[u8]>]>;

/// The accepted tokens. Authentication is off when `auth.disabled` is set
/// or, outside production, when no token is configured.
#[derive(Clone)]
pub struct Authenticator {
    /// The current tokens: fixed for `auth.tokens`, swapped on reload for
    /// `auth.tokens_file`. Each call reads the set once.
    tokens: Watched<TokenSet>,
    /// Decided at start: a tokens file never parses to an empty set, so a
    /// reload cannot switch authentication off.
    enabled: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authenticator({} tokens)", self.tokens.get().len())
    }
}

fn token_set(tokens: &[String]) -> TokenSet {
    tokens.iter().map(|t| t.as_bytes().into()).collect()
}

impl Authenticator {
    /// The tokens of `settings`. With `auth.tokens_file`, the file is read
    /// now and, inside a tokio runtime, polled every
    /// [`secret_file::DEFAULT_POLL_INTERVAL`] from then on.
    pub fn new(settings: &AuthSettings) -> Result<Self, SecretFileError> {
        Self::with_poll_interval(settings, secret_file::DEFAULT_POLL_INTERVAL)
    }

    /// As [`Self::new`], polling the tokens file every `interval`.
    pub fn with_poll_interval(settings: &AuthSettings, interval: std::time::Duration) -> Result<Self, SecretFileError> {
        if settings.disabled {
            return Ok(Self { tokens: Watched::fixed(TokenSet::default()), enabled: false });
        }
        if settings.tokens_file.is_empty() {
            let tokens = token_set(&settings.tokens);
            let enabled = !tokens.is_empty();
            return Ok(Self { tokens: Watched::fixed(tokens), enabled });
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
        Ok(Self { tokens, enabled: true })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
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
        let settings =
            AuthSettings { tokens: tokens.iter().map(|t| (*t).to_owned()).collect(), ..AuthSettings::default() };
        Authenticator::new(&settings).unwrap()
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
        let disabled =
            Authenticator::new(&AuthSettings { tokens: vec!["t".into()], disabled: true, ..AuthSettings::default() })
                .unwrap();
        assert!(!disabled.enabled());
    }

    #[test]
    fn a_tokens_file_takes_commas_and_newlines() {
        let path = std::env::temp_dir().join(format!("keel-auth-tokens-{}", std::process::id()));
        std::fs::write(&path, "alpha,beta\n gamma \n\n").unwrap();
        let settings = AuthSettings { tokens_file: path.display().to_string(), ..AuthSettings::default() };
        let a = Authenticator::new(&settings).unwrap();
        assert!(a.enabled());
        for token in ["alpha", "beta", "gamma"] {
            assert!(a.accepts(Some(format!("Bearer {token}").as_bytes())), "{token}");
        }
        assert!(!a.accepts(Some(b"Bearer alpha,beta")));
        std::fs::write(&path, " ,\n").unwrap();
        let error = Authenticator::new(&settings).unwrap_err().to_string();
        assert!(error.contains("auth.tokens_file") && error.contains("no token"), "{error}");
        std::fs::remove_file(&path).unwrap();
    }
}
