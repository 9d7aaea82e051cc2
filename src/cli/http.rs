//! The HTTP calls the command line makes to a running relay: the admin API (`queue`, `store
//! backup`) and `simulate`'s webhook. One explicit connection per call, plain or TLS, to a
//! listener address with the `Host` (and TLS server name) of the URL the relay is known by,
//! so an https-only relay, its certificate's name and host routes all work from the relay's
//! own machine.

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where a call goes: the address to connect to, the `Host` to send, and TLS if any.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub tls: Option<(ServerName<'static>, Arc<rustls::ClientConfig>)>,
}

impl Target {
    /// Plain HTTP to `addr` (the admin listener).
    pub fn plain(addr: SocketAddr) -> Target {
        let addr = reachable(addr);
        Target { addr, authority: addr.to_string(), tls: None }
    }

    /// The URL a message shows for `path`: what was asked of whom.
    pub fn show(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if self.authority == self.addr.to_string() {
            format!("{scheme}://{}{path}", self.authority)
        } else {
            format!("{scheme}://{}{path} (via {})", self.authority, self.addr)
        }
    }
}

/// How `simulate` trusts an https listener: the public roots plus `cacert` (a private CA or a
/// self-signed certificate), or, with `insecure`, any certificate.
pub fn tls_config(cacert: Option<&Path>, insecure: bool) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if insecure {
        crate::upstream::encrypted_only(builder, provider)
    } else {
        let roots = crate::upstream::root_store(cacert).map_err(|e| e.to_string())?;
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sends one request and returns the answer with its body still to be read (a backup streams).
pub async fn send(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<Response<Incoming>, String> {
    let unreachable = |e: String| format!("cannot reach the relay at {}: {e} (is it running?)", target.show(path));
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(target.addr))
        .await
        .map_err(|_| unreachable("connection timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut sender = match &target.tls {
        None => handshake(tcp).await,
        Some((name, config)) => {
            let tls =
                tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), tcp).await.map_err(|e| {
                    format!("TLS with {} failed: {e} (try --cacert FILE, or --insecure)", target.show(path))
                })?;
            handshake(tls).await
        }
    }
    .map_err(|e| unreachable(crate::http_util::error_chain(&e)))?;
    let mut req = http::Request::builder().method(method).uri(path).header(http::header::HOST, &target.authority);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| unreachable(crate::http_util::error_chain(&e)))
}

/// [`send`], with the whole answer read.
pub async fn call(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let resp = send(target, method, path, headers, body).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

async fn handshake<S>(io: S) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A listener address the command line can connect to (`0.0.0.0` means this machine).
pub fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    addr
}
