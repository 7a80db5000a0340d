//! JWT (OIDC) authentication: bearer tokens signed by an identity provider,
//! verified against its JWKS, with the issuer, audience and time claims
//! checked, and per-method required scopes.
//!
//! Keys come from `auth.jwt.jwks_url` (fetched at start, refreshed every
//! `refresh_interval`, and at once when a token names an unknown `kid`, at
//! most once per `min_refresh_interval`) or `auth.jwt.jwks_file` (re-read
//! when its content changes). A failed fetch keeps the keys already held,
//! and every fetch is counted in `keel_jwks_fetches_total{result}`.
//!
//! Only asymmetric algorithms are accepted, and only those configured: a
//! token with `alg: none`, or HS256 "signed" with the public key, fails
//! before any key is touched. Verification runs on `ring` through a
//! jsonwebtoken `CryptoProvider`, so no second crypto stack is built.
//!
//! What failed is never told to the client (every failure is the same
//! UNAUTHENTICATED); it is logged at debug level.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Validation};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::JwtSettings;
use crate::secret_file::{self, Watched};

/// The method option declaring required scopes (proto/keel/auth/v1).
pub const REQUIRED_SCOPES_OPTION: &str = "keel.auth.v1.required_scopes";

/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The bound on one JWKS fetch, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why JWT authentication could not be set up. A config problem: exit 78.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error(transparent)]
    File(#[from] secret_file::SecretFileError),
    #[error("cannot read auth.jwt.ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("cannot register the JWKS metrics")]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// `keel_jwks_fetches_total{result}`, created with its registry.
pub fn fetches_counter(registry: &crate::metrics::Metrics) -> Result<prometheus::IntCounterVec, JwtError> {
    let counter = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "keel_jwks_fetches_total",
            "JWKS fetches from auth.jwt.jwks_url, by result (ok, error); a failed fetch keeps the keys held.",
        ),
        &["result"],
    )
    .map_err(crate::metrics::MetricsError::from)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// The verified claims of a JWT caller, in the request extensions as
/// `Arc<Claims>` for handlers.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`: who the token is about.
    pub subject: Option<String>,
    /// The scopes granted, from `scope` (space-separated) or `scp` (array).
    pub scopes: Vec<String>,
    /// Every claim of the token, for what the fields above do not cover.
    pub all: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    fn from_map(all: serde_json::Map<String, serde_json::Value>) -> Self {
        let subject = all.get("sub").and_then(|v| v.as_str()).map(str::to_owned);
        let mut scopes: Vec<String> = Vec::new();
        if let Some(scope) = all.get("scope").and_then(|v| v.as_str()) {
            scopes.extend(scope.split_ascii_whitespace().map(str::to_owned));
        }
        match all.get("scp") {
            Some(serde_json::Value::Array(items)) => {
                scopes.extend(items.iter().filter_map(|v| v.as_str()).map(str::to_owned));
            }
            // Some providers send `scp` as a space-separated string.
            Some(serde_json::Value::String(text)) => scopes.extend(text.split_ascii_whitespace().map(str::to_owned)),
            _ => {}
        }
        Self { subject, scopes, all }
    }

    /// True when every one of `required` was granted.
    pub fn has_scopes(&self, required: &[String]) -> bool {
        required.iter().all(|scope| self.scopes.iter().any(|granted| granted == scope))
    }
}

/// Why a token was refused: for the debug log only, never the client.
#[derive(Debug)]
pub enum Refusal {
    /// The token is not valid (its reason, for the log).
    Invalid(String),
    /// Valid, but without a scope the method requires.
    MissingScope,
}

/// The `alg` names accepted in `auth.jwt.algorithms`: asymmetric only.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let algorithm = match name.trim() {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other if other.eq_ignore_ascii_case("none") || other.to_ascii_uppercase().starts_with("HS") => {
            return Err(format!(
                "{other:?} is never accepted: only asymmetric algorithms verify a third party's token"
            ));
        }
        other => {
            return Err(format!(
                "unknown algorithm {other:?}: expected RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
            ));
        }
    };
    Ok(algorithm)
}

/// Checks a JWKS URL: https, or http on loopback only (a local test IdP),
/// since keys fetched in the clear could be swapped on the way.
pub fn jwks_url_check(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!("{url:?}: plain http is allowed only on loopback; use https")),
        _ => Err(format!("{url:?}: expected an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One usable key of the JWKS.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    /// The `alg` the JWK pins, if any: a token must then use exactly it.
    alg: Option<Algorithm>,
}

/// The keys held: by `kid`, and those without one.
#[derive(Clone, Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    anonymous: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document, skipping keys that cannot verify tokens
    /// (encryption keys, symmetric keys, unknown types).
    fn parse(document: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(document).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut set = Self::default();
        for raw in document.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else { continue };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            if !matches!(
                jwk.algorithm,
                AlgorithmParameters::RSA(_)
                    | AlgorithmParameters::EllipticCurve(_)
                    | AlgorithmParameters::OctetKeyPair(_)
            ) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
            let alg = jwk.common.key_algorithm.and_then(signing_algorithm);
            let key = Key { key, alg };
            match jwk.common.key_id {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.anonymous.push(key),
            }
        }
        Ok(set)
    }

    fn is_empty(&self) -> bool {
        self.by_kid.is_empty() && self.anonymous.is_empty()
    }
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    parse_algorithm(&alg.to_string()).ok()
}

/// Where the keys come from.
enum Source {
    File(Watched<KeySet>),
    Url { keys: RwLock<Arc<KeySet>>, fetcher: Fetcher, last_fetch: tokio::sync::Mutex<Option<Instant>> },
}

/// Verifies bearer JWTs. Cheap to clone.
#[derive(Clone)]
pub struct JwtAuth {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    min_refresh: Duration,
    required_scopes: BTreeMap<String, Vec<String>>,
    source: Source,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtAuth(issuer {:?})", self.inner.issuer)
    }
}

impl JwtAuth {
    /// The scopes declared with the `keel.auth.v1.required_scopes` method
    /// option in the descriptors of `services`, by full method name.
    pub fn declared_scopes<'a>(
        pool: &prost_reflect::DescriptorPool,
        services: impl Iterator<Item = &'a str>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut declared = BTreeMap::new();
        let Some(option) = pool.get_extension_by_name(REQUIRED_SCOPES_OPTION) else { return declared };
        for service in services.filter_map(|name| pool.get_service_by_name(name)) {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&option) {
                    continue;
                }
                let scopes: Vec<String> = match &*options.get_extension(&option) {
                    prost_reflect::Value::List(items) => {
                        items.iter().filter_map(|v| v.as_str()).map(str::to_owned).collect()
                    }
                    _ => Vec::new(),
                };
                if !scopes.is_empty() {
                    declared.insert(format!("/{}/{}", service.full_name(), method.name()), scopes);
                }
            }
        }
        declared
    }

    /// Sets up JWT verification from validated settings (fetches counted in
    /// `fetches`, see [`fetches_counter`]), or `None` when
    /// `auth.jwt` is not configured. With a URL, the first fetch happens
    /// here; if it fails keel still starts (tokens fail until keys
    /// arrive) and the refresh task keeps trying.
    /// `declared` are the scopes of the proto option ([`Self::declared_scopes`]);
    /// `auth.jwt.required_scopes` overrides them method by method.
    pub async fn new(
        settings: &JwtSettings,
        declared: BTreeMap<String, Vec<String>>,
        fetches: Option<prometheus::IntCounterVec>,
    ) -> Result<Option<Self>, JwtError> {
        if !settings.enabled() {
            return Ok(None);
        }
        // Installed once per process; a second install is the same one.
        let _ = RING_PROVIDER.install_default();
        let source = if settings.jwks_file.is_empty() {
            let fetcher = Fetcher::new(settings, fetches)?;
            let keys = match fetcher.fetch().await {
                Ok(keys) => keys,
                Err(reason) => {
                    tracing::warn!(url = %fetcher.uri, %reason, "cannot fetch the JWKS; JWTs fail until it is fetched");
                    KeySet::default()
                }
            };
            Source::Url {
                keys: RwLock::new(Arc::new(keys)),
                fetcher,
                last_fetch: tokio::sync::Mutex::new(Some(Instant::now())),
            }
        } else {
            let paths = vec![PathBuf::from(&settings.jwks_file)];
            let watched = secret_file::watch("auth.jwt.jwks_file", paths, secret_file::DEFAULT_POLL_INTERVAL, |c| {
                KeySet::parse(c.first().map_or(&[][..], Vec::as_slice))
            })?;
            Source::File(watched)
        };
        let algorithms = settings.algorithms.iter().filter_map(|a| parse_algorithm(a).ok()).collect();
        let auth = Self {
            inner: Arc::new(Inner {
                issuer: settings.issuer.clone(),
                audiences: settings.audiences.clone(),
                algorithms,
                leeway: settings.leeway,
                min_refresh: settings.min_refresh_interval,
                required_scopes: {
                    let mut required = declared;
                    required.extend(settings.required_scopes.clone());
                    required
                },
                source,
            }),
        };
        if matches!(auth.inner.source, Source::Url { .. }) {
            tokio::spawn(refresh_on_schedule(Arc::downgrade(&auth.inner), settings.refresh_interval));
        }
        Ok(Some(auth))
    }

    /// The scopes `method` (`/pkg.Service/Method`) requires.
    pub fn required_scopes(&self, method: &str) -> &[String] {
        self.inner.required_scopes.get(method).map_or(&[], Vec::as_slice)
    }

    /// Verifies `token` for a call of `method`.
    pub async fn verify(&self, token: &str, method: &str) -> Result<Claims, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| Refusal::Invalid(format!("bad header: {e}")))?;
        if !self.inner.algorithms.contains(&header.alg) {
            return Err(Refusal::Invalid(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let key = match self.find_key(header.kid.as_deref(), header.alg) {
            Some(key) => key,
            None => {
                self.refresh_for_unknown_kid().await;
                self.find_key(header.kid.as_deref(), header.alg)
                    .ok_or_else(|| Refusal::Invalid(format!("no key for kid {:?}", header.kid)))?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.inner.issuer]);
        validation.set_audience(&self.inner.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.inner.leeway.as_secs();
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation)
            .map_err(|e| Refusal::Invalid(format!("{:?}", e.kind())))?;
        let claims = Claims::from_map(data.claims);
        if !claims.has_scopes(self.required_scopes(method)) {
            return Err(Refusal::MissingScope);
        }
        Ok(claims)
    }

    /// The key for `kid` usable with `alg`; without a kid, the only
    /// anonymous key there is.
    fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Option<Key> {
        let usable = |key: &Key| key.alg.is_none_or(|pinned| pinned == alg) && key.key.family() == alg.family();
        let pick = |set: &KeySet| match kid {
            Some(kid) => set.by_kid.get(kid).filter(|k| usable(k)).cloned(),
            None if set.anonymous.len() == 1 => set.anonymous.first().filter(|k| usable(k)).cloned(),
            None => None,
        };
        match &self.inner.source {
            Source::File(watched) => pick(&watched.get()),
            Source::Url { keys, .. } => pick(&read(keys)),
        }
    }

    /// An unknown kid may be a key rotated in since the last fetch: fetch
    /// again, unless a fetch ran within the rate limit.
    async fn refresh_for_unknown_kid(&self) {
        let Source::Url { fetcher, last_fetch, keys } = &self.inner.source else { return };
        // One fetch at a time; callers waiting here see its result.
        let mut last = last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.inner.min_refresh) {
            return;
        }
        *last = Some(Instant::now());
        refresh(fetcher, keys).await;
    }
}

fn read(keys: &RwLock<Arc<KeySet>>) -> Arc<KeySet> {
    match keys.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Fetches the JWKS into `keys`; a failure keeps the old keys.
async fn refresh(fetcher: &Fetcher, keys: &RwLock<Arc<KeySet>>) {
    match fetcher.fetch().await {
        Ok(fresh) => {
            let fresh = Arc::new(fresh);
            match keys.write() {
                Ok(mut guard) => *guard = fresh,
                Err(poisoned) => *poisoned.into_inner() = fresh,
            }
            tracing::debug!(url = %fetcher.uri, "JWKS refreshed");
        }
        Err(reason) => {
            tracing::warn!(url = %fetcher.uri, %reason, "JWKS refresh failed; keeping the keys held");
        }
    }
}

async fn refresh_on_schedule(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Source::Url { fetcher, keys, last_fetch } = &inner.source {
            *last_fetch.lock().await = Some(Instant::now());
            refresh(fetcher, keys).await;
        }
    }
}

/// Fetches the JWKS over HTTP/1.1 with hyper, TLS by rustls.
struct Fetcher {
    uri: http::Uri,
    /// `keel_jwks_fetches_total`.
    fetches: Option<prometheus::IntCounterVec>,
    /// `None` for plain http (loopback only).
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Fetcher {
    fn new(settings: &JwtSettings, fetches: Option<prometheus::IntCounterVec>) -> Result<Self, JwtError> {
        let fail = |reason: String| JwtError::CaFile { path: settings.ca_file.clone(), reason };
        // Validated already; parsed again here for the parts.
        let uri = jwks_url_check(&settings.jwks_url).map_err(fail)?;
        let tls = if uri.scheme_str() == Some("https") {
            let roots = if settings.ca_file.is_empty() {
                rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
            } else {
                let pem = std::fs::read(&settings.ca_file).map_err(|e| fail(e.to_string()))?;
                crate::tls::parse_roots(&pem).map_err(fail)?
            };
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| fail(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Self { uri, fetches, tls })
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let fetched = self.fetch_once().await;
        if let Some(counter) = &self.fetches {
            counter.with_label_values(&[if fetched.is_ok() { "ok" } else { "error" }]).inc();
        }
        fetched
    }

    async fn fetch_once(&self) -> Result<KeySet, String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
        let keys = KeySet::parse(&body)?;
        if keys.is_empty() {
            return Err("the JWKS holds no usable signing key".to_owned());
        }
        Ok(keys)
    }

    async fn get(&self) -> Result<Bytes, String> {
        let host = self.uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let authority = self.uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let request = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = match &self.tls {
            Some(connector) => {
                let name = ServerName::try_from(host).map_err(|e| format!("invalid host: {e}"))?;
                let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
                send(hyper_util::rt::TokioIo::new(tls), request).await?
            }
            None => send(hyper_util::rt::TokioIo::new(tcp), request).await?,
        };
        if response.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        let limited = Limited::new(response.into_body(), MAX_JWKS_BYTES);
        let body = limited.collect().await.map_err(|e| format!("reading the body: {e}"))?;
        Ok(body.to_bytes())
    }
}

async fn send<T>(io: T, request: http::Request<Empty<Bytes>>) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(|e| format!("request: {e}"))
}

/// jsonwebtoken's verification on `ring` (already built for rustls).
/// Signing is not offered: keel only verifies.
static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: ring_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

fn no_signer(_: &Algorithm, _: &EncodingKey) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Err(jsonwebtoken::errors::ErrorKind::InvalidAlgorithm.into())
}

fn ring_verifier(alg: &Algorithm, key: &DecodingKey) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if key.family() != alg.family() {
        return Err(jsonwebtoken::errors::ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier { alg: *alg, key: key.clone() }))
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        use ring::signature as rs;
        let rsa: Option<&'static rs::RsaParameters> = match self.alg {
            Algorithm::RS256 => Some(&rs::RSA_PKCS1_2048_8192_SHA256),
            Algorithm::RS384 => Some(&rs::RSA_PKCS1_2048_8192_SHA384),
            Algorithm::RS512 => Some(&rs::RSA_PKCS1_2048_8192_SHA512),
            Algorithm::PS256 => Some(&rs::RSA_PSS_2048_8192_SHA256),
            Algorithm::PS384 => Some(&rs::RSA_PSS_2048_8192_SHA384),
            Algorithm::PS512 => Some(&rs::RSA_PSS_2048_8192_SHA512),
            _ => None,
        };
        let verified = match (rsa, self.key.kind()) {
            (Some(params), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                rs::RsaPublicKeyComponents { n, e }.verify(params, message, sig)
            }
            (Some(params), DecodingKeyKind::SecretOrDer(der)) => {
                rs::UnparsedPublicKey::new(params, der).verify(message, sig)
            }
            (None, DecodingKeyKind::SecretOrDer(raw)) => {
                let algorithm: &'static dyn rs::VerificationAlgorithm = match self.alg {
                    Algorithm::ES256 => &rs::ECDSA_P256_SHA256_FIXED,
                    Algorithm::ES384 => &rs::ECDSA_P384_SHA384_FIXED,
                    Algorithm::EdDSA => &rs::ED25519,
                    // HMAC and anything else: never.
                    _ => return Err(signature::Error::new()),
                };
                rs::UnparsedPublicKey::new(algorithm, raw).verify(message, sig)
            }
            _ => return Err(signature::Error::new()),
        };
        verified.map_err(|_| signature::Error::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_algorithms_are_accepted() {
        assert!(parse_algorithm("RS256").is_ok());
        assert!(parse_algorithm("EdDSA").is_ok());
        for bad in ["none", "NONE", "HS256", "hs512", "XX1"] {
            assert!(parse_algorithm(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_urls_need_https_except_on_loopback() {
        assert!(jwks_url_check("https://idp.example.com/jwks").is_ok());
        assert!(jwks_url_check("http://127.0.0.1:8080/jwks").is_ok());
        assert!(jwks_url_check("http://[::1]:8080/jwks").is_ok());
        assert!(jwks_url_check("http://localhost/jwks").is_ok());
        assert!(jwks_url_check("http://idp.example.com/jwks").is_err());
        assert!(jwks_url_check("ftp://idp.example.com/jwks").is_err());
        assert!(jwks_url_check("not a url").is_err());
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        let claims = |v: serde_json::Value| Claims::from_map(v.as_object().cloned().unwrap_or_default());
        let c = claims(serde_json::json!({"sub": "u1", "scope": "a b  c"}));
        assert_eq!(c.subject.as_deref(), Some("u1"));
        assert_eq!(c.scopes, ["a", "b", "c"]);
        assert!(c.has_scopes(&["a".into(), "c".into()]));
        assert!(!c.has_scopes(&["d".into()]));
        assert_eq!(claims(serde_json::json!({"scp": ["x", "y"]})).scopes, ["x", "y"]);
    }

    #[test]
    fn symmetric_and_encryption_keys_in_a_jwks_are_skipped() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"h","k":"c2VjcmV0"},
            {"kty":"OKP","crv":"Ed25519","kid":"e","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"s","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"weird"}
        ]}"#;
        let set = KeySet::parse(doc).unwrap();
        assert_eq!(set.by_kid.keys().collect::<Vec<_>>(), ["s"]);
    }
}
