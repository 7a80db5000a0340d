//! TLS, mTLS and JWT authentication against the whole app, with real
//! clients: tonic over rustls for gRPC, hyper over rustls for the gateway
//! (HTTP/2 and HTTP/1.1 by ALPN). Certificates are made here with rcgen;
//! JWTs are signed here with ring and served from an in-test JWKS server.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use keel::app::App;
use keel::config::Settings;
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::proto::user::v1::{DeleteUserRequest, GetUserRequest};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use support::{READY_BOUND, eventually, test_settings};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A test CA that issues server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and key (PEM) for `sans`, with common name `cn`.
    fn issue(&self, cn: &str, sans: Vec<SanType>) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn server(&self) -> Result<(String, String)> {
        self.issue("keel", vec![SanType::DnsName("localhost".try_into()?), SanType::IpAddress([127, 0, 0, 1].into())])
    }
}

/// A scratch directory for certificate files.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("keel-security-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// Writes `name` the kubelet's way: a new file renamed over the old.
    fn write(&self, name: &str, content: &str) -> Result<String> {
        let path = self.0.join(name);
        let staged = self.0.join(format!("{name}.new"));
        std::fs::write(&staged, content)?;
        std::fs::rename(&staged, &path)?;
        Ok(path.display().to_string())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Running {
    grpc: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), keel::app::AppError>>,
}

impl Running {
    /// The app with the test echo service too (it echoes the identity).
    async fn start(settings: Settings) -> Result<Self> {
        let echo = support::compile_test_proto("echo/v1/echo.proto")?;
        let pool = prost_reflect::DescriptorPool::decode(echo.as_slice())?;
        let app = App::build_with(settings, move |services, ctx| {
            keel::services::register(services, ctx)?;
            services.add_descriptors(&echo).add(support::echo::EchoBackend { pool });
            Ok(())
        })
        .await?;
        let (grpc, http, admin) = (app.grpc_addr(), app.http_addr(), app.admin_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self { grpc, http, admin, stop: Some(stop), task })
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await???;
        Ok(())
    }
}

fn tls_endpoint(addr: SocketAddr, ca_pem: &str, identity: Option<&(String, String)>) -> Result<Endpoint> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect_timeout(Duration::from_secs(5)))
}

async fn tls_channel(addr: SocketAddr, ca_pem: &str, identity: Option<&(String, String)>) -> Result<Channel> {
    Ok(tls_endpoint(addr, ca_pem, identity)?.connect().await?)
}

async fn health_over_tls(addr: SocketAddr, ca_pem: &str, identity: Option<&(String, String)>) -> Result<()> {
    let channel = tls_channel(addr, ca_pem, identity).await?;
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(())
}

/// A rustls client for the gateway, offering `alpn`.
fn rustls_client(
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<&(String, String)>,
) -> Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
            builder.with_client_auth_cert(chain, rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One GET over TLS; returns the negotiated protocol, the status and the
/// headers.
async fn https_get(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    path: &str,
    bearer: Option<&str>,
) -> Result<(Vec<u8>, http::StatusCode, http::HeaderMap)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector.connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec).unwrap_or_default();
    let mut request = http::Request::get(format!("https://localhost{path}"));
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let io = hyper_util::rt::TokioIo::new(tls);
    let response = if alpn == b"h2" {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let (mut parts, body) = request.into_parts();
        parts.uri = path.parse()?;
        parts.headers.insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
        sender.send_request(http::Request::from_parts(parts, body)).await?
    };
    let (parts, body) = response.into_parts();
    let _ = body.collect().await?;
    Ok((alpn, parts.status, parts.headers))
}

#[tokio::test]
async fn grpc_and_gateway_serve_tls_and_rotated_certificates_without_a_restart() -> Result<()> {
    let dir = Dir::new("rotation")?;
    let ca = Ca::new("first CA")?;
    let (cert, key) = ca.server()?;
    let cert_file = dir.write("tls.crt", &cert)?;
    let key_file = dir.write("tls.key", &key)?;
    let mut settings = test_settings();
    for tls in [&mut settings.grpc.tls, &mut settings.http.tls, &mut settings.admin.tls] {
        tls.cert_file = cert_file.clone();
        tls.key_file = key_file.clone();
    }
    let app = Running::start(settings).await?;
    eventually(READY_BOUND, || async { health_over_tls(app.grpc, &ca.pem(), None).await.is_ok() })
        .await
        .context("gRPC over TLS never answered")?;

    // Plaintext gRPC to the TLS port fails rather than hanging.
    let plain = Endpoint::from_shared(format!("http://{}", app.grpc))?.connect_timeout(Duration::from_secs(5));
    let refused = match plain.connect().await {
        Ok(channel) => HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "plaintext gRPC was served on the TLS port");

    // The gateway negotiates HTTP/2 and HTTP/1.1 by ALPN; its answers say
    // nosniff and no-store.
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let connector = rustls_client(&ca.pem(), &[alpn], None)?;
        let (negotiated, status, headers) = https_get(app.http, &connector, "/v1/users/none", None).await?;
        assert_eq!(negotiated, alpn);
        assert_eq!(status, http::StatusCode::NOT_FOUND);
        assert_eq!(headers.get("x-content-type-options").and_then(|v| v.to_str().ok()), Some("nosniff"));
        assert_eq!(headers.get("cache-control").and_then(|v| v.to_str().ok()), Some("no-store"));
    }
    // The admin port takes the same settings.
    let connector = rustls_client(&ca.pem(), &[b"http/1.1"], None)?;
    let (_, status, _) = https_get(app.admin, &connector, "/livez", None).await?;
    assert_eq!(status, http::StatusCode::OK);

    // Rotation: a certificate from another CA replaces the files; new
    // connections get it, with no restart.
    let next = Ca::new("second CA")?;
    let (cert, key) = next.server()?;
    // A half-written pair (the new key with the old certificate) is
    // refused, counted, and the old pair kept.
    let failed = || {
        keel::secret_file::reloads_collector()
            .map(|c| c.with_label_values(&["grpc.tls.cert_file", "error"]).get())
            .unwrap_or_default()
    };
    let before = failed();
    dir.write("tls.key", &key)?;
    eventually(Duration::from_secs(20), || async { failed() > before })
        .await
        .context("the mismatched pair was never refused")?;
    health_over_tls(app.grpc, &ca.pem(), None).await.context("a half-written pair must keep the old one")?;
    dir.write("tls.crt", &cert)?;
    eventually(Duration::from_secs(20), || async { health_over_tls(app.grpc, &next.pem(), None).await.is_ok() })
        .await
        .context("the rotated gRPC certificate was never served")?;
    assert!(health_over_tls(app.grpc, &ca.pem(), None).await.is_err(), "the old certificate is still served");
    let connector = rustls_client(&next.pem(), &[b"h2"], None)?;
    let (_, status, _) = https_get(app.http, &connector, "/healthz", None).await?;
    assert_eq!(status, http::StatusCode::OK);
    app.stop().await
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate() -> Result<()> {
    let dir = Dir::new("mtls")?;
    let ca = Ca::new("mTLS CA")?;
    let (cert, key) = ca.server()?;
    let client = ca.issue("orders", vec![SanType::URI("spiffe://test/orders".try_into()?)])?;
    let stranger = Ca::new("other CA")?.issue("intruder", vec![])?;
    let mut settings = test_settings();
    for tls in [&mut settings.grpc.tls, &mut settings.http.tls] {
        tls.cert_file = dir.write("tls.crt", &cert)?;
        tls.key_file = dir.write("tls.key", &key)?;
        tls.client_ca_file = dir.write("ca.crt", &ca.pem())?;
    }
    let app = Running::start(settings).await?;
    eventually(READY_BOUND, || async { health_over_tls(app.grpc, &ca.pem(), Some(&client)).await.is_ok() })
        .await
        .context("gRPC over mTLS never answered")?;
    assert!(health_over_tls(app.grpc, &ca.pem(), None).await.is_err(), "a client without a certificate was served");
    assert!(
        health_over_tls(app.grpc, &ca.pem(), Some(&stranger)).await.is_err(),
        "a certificate of another CA was accepted"
    );

    let with_cert = rustls_client(&ca.pem(), &[b"h2"], Some(&client))?;
    let (_, status, _) = https_get(app.http, &with_cert, "/healthz", None).await?;
    assert_eq!(status, http::StatusCode::OK);
    // The verified identity reaches the handler, through the gateway and
    // over gRPC.
    let (_, status, headers) = https_get(app.http, &with_cert, "/v1/echo/abc", None).await?;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers.get("grpc-metadata-echo-client").and_then(|v| v.to_str().ok()), Some("spiffe://test/orders"));
    let mut grpc_client = tonic::client::Grpc::new(tls_channel(app.grpc, &ca.pem(), Some(&client)).await?);
    grpc_client.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/echo.v1.EchoService/Echo");
    let response =
        grpc_client.unary::<(), (), _>(tonic::Request::new(()), path, tonic_prost::ProstCodec::default()).await?;
    assert_eq!(response.metadata().get("echo-client").and_then(|v| v.to_str().ok()), Some("spiffe://test/orders"));
    let without = rustls_client(&ca.pem(), &[b"h2"], None)?;
    assert!(
        https_get(app.http, &without, "/healthz", None).await.is_err(),
        "the gateway served a client without a certificate"
    );
    app.stop().await
}

#[test]
fn the_client_identity_is_the_verified_certificates_subject_and_sans() -> Result<()> {
    let ca = Ca::new("identity CA")?;
    let (cert, _) = ca.issue(
        "orders",
        vec![SanType::URI("spiffe://test/orders".try_into()?), SanType::DnsName("orders.test".try_into()?)],
    )?;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes())?;
    let identity = keel::tls::ClientIdentity::from_certificate(&der).context("unparsable certificate")?;
    assert_eq!(identity.subject, "CN=orders");
    assert_eq!(identity.sans, ["spiffe://test/orders", "orders.test"]);
    assert_eq!(identity.name(), "spiffe://test/orders");
    Ok(())
}

#[tokio::test]
async fn a_broken_certificate_file_is_a_config_error_naming_the_key() -> Result<()> {
    let dir = Dir::new("broken")?;
    let mut settings = test_settings();
    settings.http.tls.cert_file = dir.write("tls.crt", "not a certificate")?;
    settings.http.tls.key_file = dir.write("tls.key", "not a key")?;
    let error = match App::build(settings).await {
        Ok(_) => return Err(anyhow!("a broken certificate was accepted")),
        Err(error) => error,
    };
    assert!(error.is_config(), "{error:?}");
    assert!(error.to_string().contains("http.tls.cert_file"), "{error}");
    Ok(())
}

#[tokio::test]
async fn reflection_off_is_unimplemented_while_health_answers() -> Result<()> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    // Auth on, and no token sent: an unknown method is still UNIMPLEMENTED
    // (as grpc-go answers), while a real one demands credentials.
    let app = support::spawn_app_with(|s| {
        s.grpc.reflection = false;
        s.auth.tokens = vec!["secret".into()];
    })
    .await?;
    let denied = app.users()?.get_user(keel::proto::user::v1::GetUserRequest { user_id: "u1".into() }).await;
    assert_eq!(denied.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(app.channel()?);
    let code = match client.server_reflection_info(tokio_stream::iter(vec![request])).await {
        Ok(response) => match response.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        },
        Err(status) => status.code(),
    };
    assert_eq!(code, Code::Unimplemented);
    app.health()?.check(HealthCheckRequest { service: String::new() }).await?;
    app.stop().await
}

// ---- JWT ----

/// A JWKS served over HTTP on loopback; the document can be replaced and
/// the fetches are counted.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(document: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (doc, count) = (doc.clone(), count.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request: http::Request<hyper::body::Incoming>| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = doc.lock().map(|d| d.clone()).unwrap_or_default();
                        async move { Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(body)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, document, fetches })
    }

    fn set(&self, document: String) {
        if let Ok(mut d) = self.document.lock() {
            *d = document;
        }
    }
}

/// An ES256 signing key with its `kid`.
struct Signer {
    kid: String,
    key: EcdsaKeyPair,
}

impl Signer {
    fn new(kid: &str) -> Result<Self> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|e| anyhow!("{e}"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(Self { kid: kid.to_owned(), key })
    }

    fn public(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    fn jwk(&self) -> serde_json::Value {
        let point = self.public();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        })
    }

    fn sign(&self, claims: &serde_json::Value) -> Result<String> {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let signature =
            self.key.sign(&ring::rand::SystemRandom::new(), input.as_bytes()).map_err(|e| anyhow!("{e}"))?;
        Ok(format!("{input}.{}", B64.encode(signature.as_ref())))
    }
}

fn jwks(signers: &[&Signer]) -> String {
    serde_json::json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "keel-api";

fn claims(scope: &str) -> serde_json::Value {
    serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now() + 300, "iat": now(), "scope": scope})
}

fn with(mut claims: serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
    claims[key] = value;
    claims
}

async fn get_user_code(channel: &Channel, token: &str) -> Code {
    let mut client = UserServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(GetUserRequest { user_id: "nobody".into() });
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    match client.get_user(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn the_jwt_matrix_holds() -> Result<()> {
    let current = Signer::new("k1")?;
    let rotated = Signer::new("k2")?;
    let jwks_server = JwksServer::start(jwks(&[&current])).await?;
    let app = support::spawn_app_with(|s| {
        s.auth.jwt.issuer = ISSUER.into();
        s.auth.jwt.audiences = vec![AUDIENCE.into()];
        s.auth.jwt.jwks_url = format!("http://{}/jwks", jwks_server.addr);
        s.auth.jwt.leeway = Duration::ZERO;
        s.auth.jwt.min_refresh_interval = Duration::from_millis(1);
        // DeleteUser's users.admin comes from its proto option; the config
        // adds one for GetUser's sibling UpdateUser.
        s.auth.jwt.required_scopes.insert("/user.v1.UserService/UpdateUser".into(), vec!["users.write".into()]);
    })
    .await?;
    let channel = app.channel()?;

    // Valid: the call runs (and finds no such user).
    let valid = current.sign(&claims("users.read"))?;
    assert_eq!(get_user_code(&channel, &valid).await, Code::NotFound);

    // Each of these is the same UNAUTHENTICATED.
    let header_none = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = B64.encode(claims("users.read").to_string());
    let public = current.public().to_vec();
    let hs256 = {
        let header = B64.encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, current.kid));
        let input = format!("{header}.{body}");
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public), input.as_bytes());
        format!("{input}.{}", B64.encode(tag.as_ref()))
    };
    let bad_signature = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
        let mut signature = B64.decode(&parts[2])?;
        signature[10] ^= 0x01;
        parts[2] = B64.encode(signature);
        parts.join(".")
    };
    let refused = [
        ("expired", current.sign(&with(claims(""), "exp", (now() - 60).into()))?),
        ("not yet valid", current.sign(&with(claims(""), "nbf", (now() + 600).into()))?),
        ("nbf of the wrong type", current.sign(&with(claims(""), "nbf", "99999999999".into()))?),
        ("wrong issuer", current.sign(&with(claims(""), "iss", "https://evil.test".into()))?),
        ("wrong audience", current.sign(&with(claims(""), "aud", "other-api".into()))?),
        ("no exp", current.sign(&with(claims(""), "exp", serde_json::Value::Null))?),
        ("bad signature", bad_signature),
        ("alg none", format!("{header_none}.{body}.")),
        ("HS256 with the public key", hs256),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (case, token) in &refused {
        assert_eq!(get_user_code(&channel, token).await, Code::Unauthenticated, "{case}");
    }

    // An unknown kid: the JWKS is fetched again and the new key accepted.
    let fetches = jwks_server.fetches.load(Ordering::SeqCst);
    jwks_server.set(jwks(&[&current, &rotated]));
    let from_rotated = rotated.sign(&claims(""))?;
    assert_eq!(get_user_code(&channel, &from_rotated).await, Code::NotFound, "the rotated key was not fetched");
    assert!(jwks_server.fetches.load(Ordering::SeqCst) > fetches);
    let scrape = app.scrape().await?;
    assert!(
        support::sample(&scrape, "keel_jwks_fetches_total", &[("result", "ok")]).is_some_and(|n| n >= 2.0),
        "the fetches are counted"
    );

    // Per-method scopes (the proto option of DeleteUser): PERMISSION_DENIED
    // without, the call with.
    let mut users = UserServiceClient::new(channel.clone());
    let delete = |token: &str| {
        let mut request = tonic::Request::new(DeleteUserRequest { user_id: "nobody".into() });
        if let Ok(value) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    };
    let denied = users.delete_user(delete(&valid)).await.err().map(|s| s.code());
    assert_eq!(denied, Some(Code::PermissionDenied));
    let admin = current.sign(&claims("users.read users.admin"))?;
    let allowed = users.delete_user(delete(&admin)).await.err().map(|s| s.code());
    assert_eq!(allowed, Some(Code::NotFound));
    let update = {
        let mut request = tonic::Request::new(keel::proto::user::v1::UpdateUserRequest::default());
        request.metadata_mut().insert("authorization", format!("Bearer {admin}").parse()?);
        request
    };
    let denied = users.update_user(update).await.err().map(|s| s.code());
    assert_eq!(denied, Some(Code::PermissionDenied), "the config's required_scopes");
    let scp = current.sign(&with(claims(""), "scp", serde_json::json!(["users.admin"])))?;
    assert_eq!(users.delete_user(delete(&scp)).await.err().map(|s| s.code()), Some(Code::NotFound));

    // Through the gateway: 401 for a bad token, 403 for a missing scope.
    let http = app.http();
    let status = |path: &'static str, method: http::Method, token: String| {
        let http = http.clone();
        async move {
            http.send(method, path, &[("authorization", format!("Bearer {token}").as_str())], None)
                .await
                .map(|r| r.status)
        }
    };
    assert_eq!(status("/v1/users/nobody", http::Method::GET, valid.clone()).await?, http::StatusCode::NOT_FOUND);
    assert_eq!(
        status("/v1/users/nobody", http::Method::GET, refused[0].1.clone()).await?,
        http::StatusCode::UNAUTHORIZED
    );
    assert_eq!(status("/v1/users/nobody", http::Method::DELETE, valid.clone()).await?, http::StatusCode::FORBIDDEN);
    assert_eq!(status("/v1/users/nobody", http::Method::DELETE, admin).await?, http::StatusCode::NOT_FOUND);
    app.stop().await
}

#[tokio::test]
async fn verified_claims_reach_the_handler() -> Result<()> {
    let signer = Signer::new("k1")?;
    let jwks_server = JwksServer::start(jwks(&[&signer])).await?;
    let echo = support::compile_test_proto("echo/v1/echo.proto")?;
    let pool = prost_reflect::DescriptorPool::decode(echo.as_slice())?;
    let app = support::spawn_app_prepared(
        |s| {
            s.auth.jwt.issuer = ISSUER.into();
            s.auth.jwt.audiences = vec![AUDIENCE.into()];
            s.auth.jwt.jwks_url = format!("http://{}/jwks", jwks_server.addr);
        },
        move |services, _| {
            services.add_descriptors(&echo).add(support::echo::EchoBackend { pool });
            Ok(())
        },
    )
    .await?;
    let token = signer.sign(&with(claims("echo.read echo.write"), "sub", "bob".into()))?;
    let bearer = format!("Bearer {token}");
    let response =
        app.http().send(http::Method::GET, "/v1/echo/abc", &[("authorization", bearer.as_str())], None).await?;
    assert_eq!(response.status, http::StatusCode::OK, "{}", response.text());
    assert_eq!(response.header("grpc-metadata-echo-jwt-sub"), Some("bob"));
    assert_eq!(response.header("grpc-metadata-echo-jwt-scopes"), Some("echo.read echo.write"));
    app.stop().await
}

// ---- database TLS ----

/// A stand-in PostgreSQL server that accepts the SSLRequest and completes
/// the TLS handshake with `cert`, then closes: enough to see whether the
/// driver verified the server against `sslrootcert`.
async fn fake_tls_postgres(cert: &str, key: &str) -> Result<SocketAddr> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if stream.read_exact(&mut request).await.is_err() || stream.write_all(b"S").await.is_err() {
                    return;
                }
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let mut startup = [0u8; 64];
                    let _ = tls.read(&mut startup).await;
                }
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn sslmode_verify_full_checks_the_server_against_sslrootcert() -> Result<()> {
    use sqlx::Connection;
    let dir = Dir::new("database")?;
    let ca = Ca::new("database CA")?;
    let (cert, key) = ca.server()?;
    let addr = fake_tls_postgres(&cert, &key).await?;
    let trusted = dir.write("ca.crt", &ca.pem())?;
    let other = dir.write("other.crt", &Ca::new("another CA")?.pem())?;
    let connect = |root: String| async move {
        let url = format!("postgres://keel@localhost:{}/keel?sslmode=verify-full&sslrootcert={root}", addr.port());
        match sqlx::PgConnection::connect(&url).await {
            Ok(_) => "connected".to_owned(),
            Err(error) => format!("{error:?}"),
        }
    };
    // The right CA: the handshake passes, and what fails is the stand-in
    // server hanging up afterwards.
    let with_trusted = connect(trusted).await;
    assert!(!with_trusted.to_lowercase().contains("certificate"), "{with_trusted}");
    let with_other = connect(other).await;
    assert!(with_other.to_lowercase().contains("certificate") || with_other.contains("UnknownIssuer"), "{with_other}");
    Ok(())
}

/// `/readyz` of `admin` answers `expected`.
async fn readyz_is(admin: SocketAddr, expected: http::StatusCode) -> bool {
    support::http::HttpClient::new(admin).get("/readyz").await.is_ok_and(|r| r.status == expected)
}

#[tokio::test]
async fn clients_speak_tls_and_mtls_to_their_downstreams() -> Result<()> {
    let dir = Dir::new("client-tls")?;
    let ca = Ca::new("downstream CA")?;
    let (cert, key) = ca.server()?;
    let (client_cert, client_key) = ca.issue("caller", vec![SanType::URI("spiffe://test/caller".try_into()?)])?;
    let stranger = Ca::new("stranger CA")?;
    // The downstream: a keel with gRPC over mTLS.
    let mut down = test_settings();
    down.grpc.tls.cert_file = dir.write("down.crt", &cert)?;
    down.grpc.tls.key_file = dir.write("down.key", &key)?;
    down.grpc.tls.client_ca_file = dir.write("ca.crt", &ca.pem())?;
    let down = Running::start(down).await?;

    let caller = |ca_file: String, identity: bool| -> Result<Settings> {
        let mut settings = test_settings();
        let mut client = keel::config::ClientSettings {
            endpoint: format!("https://localhost:{}", down.grpc.port()),
            required_for_readiness: true,
            ..Default::default()
        };
        client.tls.ca_file = ca_file;
        if identity {
            client.tls.cert_file = dir.write("caller.crt", &client_cert)?;
            client.tls.key_file = dir.write("caller.key", &client_key)?;
        }
        settings.clients.insert("peer".to_owned(), client);
        Ok(settings)
    };

    // Verified against the CA, with a client certificate: ready.
    let good = Running::start(caller(dir.write("ca.crt", &ca.pem())?, true)?).await?;
    eventually(READY_BOUND, || readyz_is(good.admin, http::StatusCode::OK))
        .await
        .context("the caller never saw its TLS downstream healthy")?;
    good.stop().await?;

    // Without a client certificate, the downstream refuses the handshake.
    let anonymous = Running::start(caller(dir.write("ca.crt", &ca.pem())?, false)?).await?;
    eventually(READY_BOUND, || readyz_is(anonymous.admin, http::StatusCode::SERVICE_UNAVAILABLE)).await?;
    assert!(!readyz_is(anonymous.admin, http::StatusCode::OK).await, "mTLS let a caller without a certificate in");
    anonymous.stop().await?;

    // A downstream certificate from another CA is refused by the caller.
    let misled = Running::start(caller(dir.write("stranger.crt", &stranger.pem())?, true)?).await?;
    eventually(READY_BOUND, || readyz_is(misled.admin, http::StatusCode::SERVICE_UNAVAILABLE)).await?;
    let body = support::http::HttpClient::new(misled.admin).get("/readyz").await?.text();
    assert!(body.contains("client peer"), "{body}");
    misled.stop().await?;
    down.stop().await
}

#[test]
fn client_tls_settings_are_validated_naming_the_key() -> Result<()> {
    let dir = Dir::new("client-tls-config")?;
    let pem = dir.write("ca.crt", &Ca::new("config CA")?.pem())?;
    let load = |vars: &[(&str, &str)]| {
        let sources = keel::config::ConfigSources {
            dir: PathBuf::from("/nonexistent-keel-config"),
            env_vars: vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Default::default()
        };
        Settings::load(&sources)
    };
    const HTTPS: (&str, &str) = ("KEEL__CLIENTS__PEER__ENDPOINT", "https://localhost:9000");
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "clients.peer.tls",
            vec![
                ("KEEL__CLIENTS__PEER__ENDPOINT", "http://localhost:9000"),
                ("KEEL__CLIENTS__PEER__TLS__CA_FILE", &pem),
            ],
        ),
        ("clients.peer.tls.key_file", vec![HTTPS, ("KEEL__CLIENTS__PEER__TLS__KEY_FILE", &pem)]),
        ("clients.peer.tls.cert_file", vec![HTTPS, ("KEEL__CLIENTS__PEER__TLS__CERT_FILE", &pem)]),
        ("clients.peer.tls.ca_file", vec![HTTPS, ("KEEL__CLIENTS__PEER__TLS__CA_FILE", "/nonexistent/ca.crt")]),
    ];
    for (key, vars) in cases {
        let error = load(&vars).err().context(format!("{key}: accepted"))?;
        assert!(error.to_string().contains(key), "{key}: {error}");
    }
    let settings = load(&[HTTPS, ("KEEL__CLIENTS__PEER__TLS__CA_FILE", &pem)]).context("a valid client TLS config")?;
    assert_eq!(settings.clients["peer"].tls.ca_file, pem);
    Ok(())
}
