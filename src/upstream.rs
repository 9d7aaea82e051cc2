//! The pooled HTTP client every upstream call goes through (Motion deliveries, provider APIs):
//! hyper-util's pooled client over hyper-rustls, HTTP/1.1 keep-alive and HTTP/2 by ALPN. One
//! pool per serving thread (connections stay with the thread that drives them), never one per
//! request. A Motion with its own `ca_file` gets a client that trusts that root in addition to
//! the public ones; such clients are cached by file so reloads keep their pools.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub type Client = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("CA file {0} holds no usable certificate")]
    CaEmpty(PathBuf),
}

/// A `ca_file`'s client and the digest of the contents it was built from.
type CaClient = ([u8; 32], Client);

/// The pooled clients: one per thread for the public roots, one per Motion `ca_file` content.
#[derive(Clone)]
pub struct Upstream {
    // Touched only when a routing table is built (start, reload), never per request. Keyed by
    // the file's path with the digest of what it held: a reload re-reads every `ca_file`, and
    // a file whose contents changed gets a new client (the old one goes with the old table).
    by_ca: Arc<Mutex<HashMap<PathBuf, CaClient>>>,
    #[cfg(test)]
    built: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Upstream {
        Upstream {
            by_ca: Default::default(),
            #[cfg(test)]
            built: Default::default(),
        }
    }

    /// The client for the public roots, one per thread: each serving thread keeps its own
    /// connection pool, so a request and the upstream connection it uses are driven by the same
    /// thread (no cross-thread wake-ups on the hot path). Pools are per thread, not per request.
    pub fn client(&self) -> Client {
        thread_local! {
            static LOCAL: Client = build(root_store(None).expect("built-in roots"));
        }
        LOCAL.with(Client::clone)
    }

    /// The client for a Motion with its own `ca_file` (one shared pool per file); `None` for the
    /// public roots, where [`Upstream::client`] gives the calling thread's.
    pub fn client_for(&self, ca_file: Option<&Path>) -> Result<Option<Client>, UpstreamError> {
        use sha2::Digest;
        let Some(path) = ca_file else { return Ok(None) };
        let pem = std::fs::read(path).map_err(|source| UpstreamError::CaFile { path: path.into(), source })?;
        let digest: [u8; 32] = sha2::Sha256::digest(&pem).into();
        let mut cache = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((d, c)) = cache.get(path) {
            if *d == digest {
                return Ok(Some(c.clone()));
            }
        }
        let client = build(roots_with(path, &pem)?);
        #[cfg(test)]
        self.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cache.insert(path.to_path_buf(), (digest, client.clone()));
        Ok(Some(client))
    }
}

/// The public roots, plus those of the PEM file `extra`.
pub(crate) fn root_store(extra: Option<&Path>) -> Result<rustls::RootCertStore, UpstreamError> {
    match extra {
        None => Ok(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| UpstreamError::CaFile { path: path.into(), source })?;
            roots_with(path, &pem)
        }
    }
}

/// The public roots plus the certificates of `pem` (read from `path`, which errors name).
fn roots_with(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, UpstreamError> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut &pem[..]).flatten() {
        if roots.add(cert).is_ok() {
            added += 1;
        }
    }
    if added == 0 {
        return Err(UpstreamError::CaEmpty(path.into()));
    }
    Ok(roots)
}

fn build(roots: rustls::RootCertStore) -> Client {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}

/// A client configuration that encrypts but does not authenticate the server: for `simulate
/// --insecure` against a test certificate and PostgreSQL's `sslmode=require`, where that is
/// what the operator asked for. The handshake's signatures are still checked.
pub fn encrypted_only(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> rustls::ClientConfig {
    builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))).with_no_client_auth()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    /// A reload rebuilds the routing table, which asks for each Motion's client again: a CA
    /// file that changed since must give a client that trusts the new CA.
    #[test]
    fn a_changed_ca_file_gets_a_new_client_an_unchanged_one_keeps_its_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca_pem()).unwrap();
        let up = Upstream::new();
        assert!(up.client_for(Some(&path)).unwrap().is_some());
        assert!(up.client_for(Some(&path)).unwrap().is_some());
        assert_eq!(up.built.load(Ordering::Relaxed), 1, "same contents, same pool");
        std::fs::write(&path, ca_pem()).unwrap();
        up.client_for(Some(&path)).unwrap();
        assert_eq!(up.built.load(Ordering::Relaxed), 2, "new contents, new client");
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(matches!(up.client_for(Some(&path)), Err(UpstreamError::CaEmpty(_))));
        assert!(up.client_for(None).unwrap().is_none());
    }
}
