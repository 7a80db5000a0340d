//! Server TLS for the listeners (gRPC, gateway, admin): rustls with the
//! `ring` provider, TLS 1.2 and 1.3 only, certificates and client CAs read
//! from files and swapped in without a restart.
//!
//! The certificate is served by a resolver that reads the current value of
//! a [`secret_file::Watched`] on every handshake, and the client CA by a
//! verifier that does the same, so a rotated Secret (cert-manager) applies
//! to the next handshake while open connections keep theirs. A reload that
//! fails (a half-written pair, a key that does not match) keeps the old
//! value, and is logged and counted by `secret_file`.
//!
//! With a client CA (mTLS), a client without a certificate signed by it is
//! refused at the handshake. The verified certificate's subject and SANs
//! become a [`ClientIdentity`], left in the request extensions for the auth
//! layer and handlers, and named in the access log.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::TlsSettings;
use crate::secret_file::{self, SecretFileError, Watched};

/// ALPN for gRPC: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN for the HTTP servers: HTTP/2 preferred, HTTP/1.1 too.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The config keys of one listener's TLS files, naming them in errors,
/// logs and `keel_secret_reloads_total`.
#[derive(Debug, Clone, Copy)]
pub struct TlsKeys {
    /// `grpc.tls.cert_file` and the like (the pair is one secret).
    pub cert: &'static str,
    /// `grpc.tls.client_ca_file` and the like.
    pub client_ca: &'static str,
}

impl TlsKeys {
    pub const GRPC: Self = Self { cert: "grpc.tls.cert_file", client_ca: "grpc.tls.client_ca_file" };
    pub const HTTP: Self = Self { cert: "http.tls.cert_file", client_ca: "http.tls.client_ca_file" };
    pub const ADMIN: Self = Self { cert: "admin.tls.cert_file", client_ca: "admin.tls.client_ca_file" };
}

/// Why a listener's TLS could not be set up. A config problem: exit 78.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] SecretFileError),
    #[error("cannot build the TLS configuration of {key}")]
    Rustls {
        key: &'static str,
        #[source]
        source: rustls::Error,
    },
}

/// The rustls provider every TLS configuration of keel uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration of a listener, or `None` when it is
/// plaintext. Must be called within the runtime, which runs the polls.
pub fn server_config(
    settings: &TlsSettings,
    keys: TlsKeys,
    alpn: &[&[u8]],
) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    if !settings.enabled() {
        return Ok(None);
    }
    let interval = secret_file::DEFAULT_POLL_INTERVAL;
    let paths = vec![PathBuf::from(&settings.cert_file), PathBuf::from(&settings.key_file)];
    let certified = secret_file::watch(keys.cert, paths, interval, parse_certified_key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Rustls { key: keys.cert, source })?;
    let builder = if settings.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let paths = vec![PathBuf::from(&settings.client_ca_file)];
        let verifier = secret_file::watch(keys.client_ca, paths, interval, parse_client_ca)?;
        builder.with_client_cert_verifier(Arc::new(ReloadingClientVerifier(verifier)))
    };
    let mut config = builder.with_cert_resolver(Arc::new(ReloadingCert(certified)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Some(Arc::new(config)))
}

/// A certificate chain and its key, checked to belong together.
fn parse_certified_key(contents: &[Vec<u8>]) -> Result<CertifiedKey, String> {
    let [cert, key] = contents else { return Err("expected a certificate and a key file".to_owned()) };
    let chain = parse_certificates(cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("no usable PEM private key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("the private key cannot sign: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(certified)
}

/// Every certificate of a PEM bundle; at least one.
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate in the file".to_owned());
    }
    Ok(chain)
}

/// A root store of the CA certificates of a PEM bundle.
pub fn parse_roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certificates(pem)? {
        roots.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    Ok(roots)
}

fn parse_client_ca(contents: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let roots = parse_roots(contents.first().map_or(&[][..], Vec::as_slice))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("cannot verify clients with these CAs: {e}"))
}

/// Serves the certificate current at each handshake.
#[derive(Debug)]
struct ReloadingCert(Watched<CertifiedKey>);

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// Verifies client certificates against the CAs current at each handshake.
/// A certificate is mandatory.
#[derive(Debug)]
struct ReloadingClientVerifier(Watched<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for ReloadingClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional, and the current CAs cannot be borrowed past
        // a reload; clients send their certificate without them.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.get().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

/// Who the client is, from its verified certificate (mTLS only). In the
/// request extensions as `Arc<ClientIdentity>`, for the auth layer and
/// handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject's distinguished name (`CN=orders,O=example`).
    pub subject: String,
    /// Subject alternative names: `spiffe://…` URIs, DNS names, e-mails.
    pub sans: Vec<String>,
}

impl ClientIdentity {
    /// The identity from a certificate; `None` when it cannot be parsed
    /// (it was verified, so that does not happen in practice).
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject().to_string();
        let mut sans = Vec::new();
        if let Ok(Some(extension)) = cert.subject_alternative_name() {
            for name in &extension.value.general_names {
                use x509_parser::extensions::GeneralName;
                match name {
                    GeneralName::URI(uri) => sans.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => sans.push((*dns).to_owned()),
                    GeneralName::RFC822Name(mail) => sans.push((*mail).to_owned()),
                    _ => {}
                }
            }
        }
        Some(Self { subject, sans })
    }

    /// The one name for logs: the first SAN (a SPIFFE ID or a DNS name,
    /// as service meshes issue them), else the subject.
    pub fn name(&self) -> &str {
        self.sans.first().map_or(self.subject.as_str(), String::as_str)
    }

    /// The identity of an accepted TLS connection, if the client sent a
    /// certificate.
    pub fn of<S>(stream: &tokio_rustls::server::TlsStream<S>) -> Option<Arc<Self>> {
        let certs = stream.get_ref().1.peer_certificates()?;
        certs.first().and_then(|der| Self::from_certificate(der)).map(Arc::new)
    }
}

/// A server-side connection, plaintext or TLS.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
