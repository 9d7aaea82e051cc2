//! TLS for tests: a throwaway CA issuing leaf certificates (rcgen), certificate files written
//! the way an operator's tooling replaces them, and a rustls client that reports which
//! certificate it was shown and speaks HTTP/1.1 or HTTP/2 on one explicit connection (so a
//! dropped connection is an error, not a silent reconnect).
#![allow(dead_code)]

use super::Reply;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key, as PEM, plus the DER a client sees.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate (for `ca_file` settings) and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A new leaf (new key every time) for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

/// Replaces a file the way careful tooling does: write beside it, then rename over it.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes `leaf` as `cert.pem` + `key.pem` under `dir`; returns both paths.
pub fn write_leaf(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    replace_file(&key, &leaf.key_pem);
    replace_file(&cert, &leaf.cert_pem);
    (cert, key)
}

pub enum Versions {
    Both,
    Tls12,
    Tls13,
}

pub fn client_config(roots_pem: &[&str], alpn: &[&[u8]], versions: Versions) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in roots_pem {
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        Versions::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Versions::Tls12 => &[&rustls::version::TLS12],
        Versions::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    let (_, conn) = stream.get_ref();
    let certs: &[CertificateDer] = conn.peer_certificates().expect("server sent certificates");
    certs[0].to_vec()
}

pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

pub fn version(stream: &TlsStream<TcpStream>) -> Option<rustls::ProtocolVersion> {
    stream.get_ref().1.protocol_version()
}

/// One client connection, HTTP/1.1 (keep-alive) or HTTP/2, with no pool behind it.
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub async fn h1<S>(io: S) -> Conn
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
        tokio::spawn(conn);
        Conn::H1(send)
    }

    pub async fn h2<S>(io: S) -> Conn
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
        tokio::spawn(conn);
        Conn::H2(send)
    }

    /// Sends a request on this connection; an `Err` means the connection failed.
    pub async fn send(
        &mut self,
        method: Method,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, hyper::Error> {
        let mut req = Request::new(Full::new(body.into()));
        *req.method_mut() = method;
        for (k, v) in headers {
            req.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let resp = match self {
            Conn::H1(s) => {
                *req.uri_mut() = path.parse().unwrap();
                req.headers_mut().insert(http::header::HOST, authority.parse().unwrap());
                s.ready().await?;
                s.send_request(req).await?
            }
            Conn::H2(s) => {
                *req.uri_mut() = format!("https://{authority}{path}").parse().unwrap();
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
    }
}

/// GET over TLS on a fresh connection (for endpoints such as Pebble's management API).
pub async fn https_get(addr: SocketAddr, sni: &str, roots_pem: &[&str], path: &str) -> Reply {
    let tls = connect(addr, sni, client_config(roots_pem, &[b"http/1.1"], Versions::Both)).await.unwrap();
    let mut conn = Conn::h1(tls).await;
    conn.send(Method::GET, &addr.to_string(), path, &[], Bytes::new()).await.unwrap()
}
