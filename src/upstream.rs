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

/// The pooled clients: one per thread for the public roots, one per Motion `ca_file`.
#[derive(Clone)]
pub struct Upstream {
    // Touched only when a routing table is built (start, reload), never per request.
    by_ca: Arc<Mutex<HashMap<PathBuf, Client>>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Upstream {
        Upstream { by_ca: Default::default() }
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
        let Some(path) = ca_file else { return Ok(None) };
        let mut cache = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(path) {
            return Ok(Some(c.clone()));
        }
        let client = build(root_store(Some(path))?);
        cache.insert(path.to_path_buf(), client.clone());
        Ok(Some(client))
    }
}

pub(crate) fn root_store(extra: Option<&Path>) -> Result<rustls::RootCertStore, UpstreamError> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra {
        let pem = std::fs::read(path).map_err(|source| UpstreamError::CaFile { path: path.into(), source })?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
        if added == 0 {
            return Err(UpstreamError::CaEmpty(path.into()));
        }
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
