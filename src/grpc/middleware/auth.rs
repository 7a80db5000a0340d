//! Bearer-token authentication, one step of the server's call layer
//! ([`super::server`]): static tokens from `auth.tokens` or from
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

use tonic::Status;

use super::method::MethodInfo;
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
        self.tokens.peek().iter().fold(false, |found, known| found | constant_time_eq(known, token))
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

/// What authentication decided about a call.
pub enum Verdict {
    Pass,
    Refuse(Status),
    /// A bearer token that is no static token, for the JWT verifier (whose
    /// keys may have to be fetched first, so the call waits for it).
    VerifyJwt(JwtAuth, String),
}

impl Authenticator {
    /// Decides a call of `method` with `headers`. A method no service has
    /// is UNIMPLEMENTED for everyone, as grpc-go answers before its
    /// interceptors run: nothing is served, and a client (grpcurl against a
    /// pod with reflection off) gets the true reason instead of a demand
    /// for credentials.
    pub fn check(&self, method: &MethodInfo, authorization: Option<&http::HeaderValue>) -> Verdict {
        if method.auth_exempt || !method.served || !self.enabled() {
            return Verdict::Pass;
        }
        let header = authorization.map(|v| v.as_bytes());
        if self.accepts(header) {
            return Verdict::Pass;
        }
        let token = header.and_then(bearer_token).and_then(|t| std::str::from_utf8(t).ok());
        match (&self.jwt, token) {
            (Some(jwt), Some(token)) => Verdict::VerifyJwt(jwt.clone(), token.to_owned()),
            _ => {
                tracing::debug!("no valid bearer token");
                Verdict::Refuse(unauthenticated())
            }
        }
    }
}

/// The one answer to a missing, wrong or invalid token.
fn unauthenticated() -> Status {
    Status::unauthenticated("missing or invalid credentials")
}

/// Verifies a JWT for a call of `path`: its claims, or the status to refuse
/// the call with.
pub async fn verify_jwt(jwt: &JwtAuth, token: &str, path: &str) -> Result<crate::auth::Claims, Status> {
    match jwt.verify(token, path).await {
        Ok(claims) => Ok(claims),
        Err(Refusal::MissingScope) => {
            tracing::debug!(method = path, "JWT lacks a scope the method requires");
            Err(Status::permission_denied("the token lacks a required scope"))
        }
        Err(Refusal::Invalid(reason)) => {
            tracing::debug!(method = path, reason, "JWT refused");
            Err(unauthenticated())
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
