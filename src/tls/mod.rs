//! The https listener's TLS stage: rustls (TLS 1.2 and 1.3; HTTP/2 and HTTP/1.1 by ALPN) with a
//! certificate that can change under a running listener.
//!
//! Two sources, one per config: [`FileCerts`] (`[server.tls]`: PEM files, re-read when they
//! change or on reload; a bad new pair is refused and the old one kept) and [`AcmeCerts`]
//! (`[server.acme]`: TLS-ALPN-01, renewed ahead of expiry; one relay: rustls-acme, cached under
//! `cache_dir`; relays sharing a database: one account and certificate for all, kept there, see
//! `shared_acme`). Either way the `ServerConfig` is built once and asks a resolver for the certificate
//! on every handshake, so a new certificate reaches new connections while open connections
//! keep the session they negotiated. `watch` re-reads the files when they change.
//!
//! Below the listeners (which accept through it) and the admin listener (which reports on it).

mod shared_acme;
mod watch;

pub use shared_acme::{SharedAcmeDriver, drive_shared_acme};
pub use watch::watch_cert_files;

use crate::clock::{Clock, SystemClock};
use crate::config::{Acme, TlsFiles};
use crate::metrics::{CertLabels, CertResult, CertSourceLabel, Metrics};
use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_acme::caches::DirCache;
use rustls_acme::{AccountCache, AcmeConfig, AcmeState, CertCache};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

/// How often certificate files are checked for changes. A stat of two files: cheap enough to do
/// often, and certbot-style renewals (new files behind the same names) are picked up without a
/// SIGHUP.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Protocols offered by ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Certificate(String),
    #[error(
        "ACME cache_dir {path}: {source} (create it, writable by the relay's user, or change [server.acme] cache_dir)"
    )]
    CacheDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Roots(#[from] crate::upstream::UpstreamError),
}

/// The crypto provider for every TLS config the relay builds (ring, as hyper-rustls uses).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What the relay reports about a certificate (logs, `/readyz`, metrics); never key material.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Subject alternative DNS names (or the subject when there are none).
    pub names: Vec<String>,
    pub not_after: i64,
}

impl CertInfo {
    fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut names: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            names.push(cert.subject().to_string());
        }
        let v = cert.validity();
        Ok(CertInfo { names, not_after: v.not_after.timestamp() })
    }

    pub fn expired(&self) -> bool {
        self.not_after < unix_now()
    }

    /// `chat.example.com (expires 2026-02-01T00:00:00Z)`, for log lines.
    pub fn describe(&self) -> String {
        let at = UNIX_EPOCH + Duration::from_secs(self.not_after.max(0) as u64);
        format!("{} (expires {})", self.names.join(", "), humantime::format_rfc3339_seconds(at))
    }
}

fn unix_now() -> i64 {
    (SystemClock.now_unix_ms() / 1000) as i64
}

/// Reads and checks a certificate chain and its key: both must parse, the key must belong to the
/// leaf, and the leaf must not have expired. Errors name the file and what to do.
pub fn load_pair(files: &TlsFiles) -> Result<(CertifiedKey, CertInfo), String> {
    let (cert_path, key_path) = (&files.cert_file, &files.key_file);
    let cert_pem = std::fs::read(cert_path).map_err(|e| format!("cannot read {}: {e}", cert_path.display()))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM blocks \"BEGIN CERTIFICATE\", leaf first)",
            cert_path.display()
        ));
    }
    let key_pem = std::fs::read(key_path).map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{}: not a PEM private key: {e}", key_path.display()))?
        .ok_or_else(|| format!("{}: no private key found (expected a PEM PRIVATE KEY block)", key_path.display()))?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_path.display()))?;
    let info = CertInfo::parse(&chain[0]).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let certified = CertifiedKey::new(chain, key);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) = certified.keys_match() {
        return Err(format!(
            "the key in {} does not belong to the certificate in {} (were both files replaced?)",
            key_path.display(),
            cert_path.display()
        ));
    }
    if info.expired() {
        return Err(format!("{}: the certificate for {} has expired", cert_path.display(), info.describe()));
    }
    Ok((certified, info))
}

/// What identifies one version of a file without reading it.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks, so a certbot-style `live/` link moved to new files counts.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp { modified: m.modified().ok(), len: m.len(), ino: m.ino() })
}

/// `[server.tls]`: the certificate from files, swapped in whole when the files change.
pub struct FileCerts {
    current: ArcSwap<CertifiedKey>,
    info: ArcSwap<CertInfo>,
    watch: Mutex<Watched>,
}

struct Watched {
    files: TlsFiles,
    /// The files as they were at the last attempt, good or bad: a bad pair is reported once,
    /// not every poll, and tried again when either file changes.
    seen: (Option<Stamp>, Option<Stamp>),
    last_error: Option<String>,
}

impl Debug for FileCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCerts").field("serving", &self.info.load().names).finish_non_exhaustive()
    }
}

impl FileCerts {
    /// Loads the pair at start; a bad pair is an error here, as there is nothing to fall back on.
    pub fn load(files: &TlsFiles) -> Result<Arc<FileCerts>, TlsError> {
        let seen = (stamp(&files.cert_file), stamp(&files.key_file));
        let (key, info) = load_pair(files).map_err(TlsError::Certificate)?;
        Ok(Arc::new(FileCerts {
            current: ArcSwap::from_pointee(key),
            info: ArcSwap::from_pointee(info),
            watch: Mutex::new(Watched { files: files.clone(), seen, last_error: None }),
        }))
    }

    pub fn info(&self) -> Arc<CertInfo> {
        self.info.load_full()
    }

    /// The last refused pair's reason, while the files stay as they were then.
    pub fn last_error(&self) -> Option<String> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner()).last_error.clone()
    }

    /// Loads the pair again if the files changed since the last attempt, or when `force` (a
    /// reload). `files`, when given, replaces the paths (a reloaded config may name others).
    /// Returns `None` when nothing was tried, else what happened; both outcomes are logged
    /// and counted here.
    pub fn refresh(
        &self,
        files: Option<&TlsFiles>,
        force: bool,
        metrics: &Metrics,
    ) -> Option<Result<CertInfo, String>> {
        let mut w = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        let moved = files.is_some_and(|f| f.cert_file != w.files.cert_file || f.key_file != w.files.key_file);
        if let Some(f) = files {
            w.files = f.clone();
        }
        let now = (stamp(&w.files.cert_file), stamp(&w.files.key_file));
        if !force && !moved && now == w.seen {
            return None;
        }
        w.seen = now;
        let labels = |result| CertLabels { source: CertSourceLabel::Files, result };
        match load_pair(&w.files) {
            Ok((key, info)) => {
                if self.current.load().cert.first() == key.cert.first() {
                    // A reload re-reads unchanged files: nothing to announce.
                    w.last_error = None;
                    return Some(Ok(info));
                }
                self.current.store(Arc::new(key));
                self.info.store(Arc::new(info.clone()));
                w.last_error = None;
                metrics.cert_loads.get_or_create(&labels(CertResult::Ok)).inc();
                metrics.cert_expiry.set(info.not_after);
                tracing::info!("tls: now serving the certificate for {} to new connections", info.describe());
                Some(Ok(info))
            }
            Err(e) => {
                let serving = self.info.load();
                tracing::error!("tls: new certificate refused, still serving the one for {}: {e}", serving.describe());
                metrics.cert_loads.get_or_create(&labels(CertResult::Refused)).inc();
                w.last_error = Some(e.clone());
                Some(Err(e))
            }
        }
    }
}

impl ResolvesServerCert for FileCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// `[server.acme]`: what the ACME driver reports, shared with the listener and `/readyz`.
pub struct AcmeCerts {
    resolver: Arc<dyn ResolvesServerCert>,
    /// For TLS-ALPN-01 validation handshakes (ALPN `acme-tls/1`), answered with the challenge
    /// certificate and then closed.
    challenge: Arc<ServerConfig>,
    info: ArcSwapOption<CertInfo>,
    /// Parsed at cache load, promoted when rustls-acme deploys the cached certificate.
    cached: ArcSwapOption<CertInfo>,
    last_error: Mutex<Option<String>>,
    domains: Vec<String>,
}

impl AcmeCerts {
    /// The certificate being served, once there is one.
    pub fn info(&self) -> Option<Arc<CertInfo>> {
        self.info.load_full()
    }

    /// The last failure's reason, until an attempt succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_info(&self, info: CertInfo, metrics: &Metrics) {
        metrics.cert_expiry.set(info.not_after);
        self.info.store(Some(Arc::new(info)));
    }
}

/// The ACME state machine to poll (see [`drive_acme`]) and what it shares.
pub type AcmeDriver = AcmeState<std::io::Error, std::io::Error>;

/// What keeps an ACME certificate current, to run once the https listener is bound.
pub enum AcmeRunner {
    /// One relay: rustls-acme and its cache directory.
    Cache(Arc<AcmeCerts>, AcmeDriver),
    /// Relays sharing a database: one account and certificate for all of them.
    Shared(Box<SharedAcmeDriver>),
}

impl AcmeRunner {
    pub async fn run(self, metrics: Arc<Metrics>, stop: tokio::sync::watch::Receiver<bool>) {
        match self {
            AcmeRunner::Cache(certs, state) => drive_acme(state, certs, metrics, stop).await,
            AcmeRunner::Shared(driver) => drive_shared_acme(*driver, stop).await,
        }
    }
}

/// Sets up `[server.acme]`: shared through `shared` (the relays' database) when there is one,
/// else rustls-acme over `cache_dir`. Nothing touches the network until the runner runs.
pub fn acme_source(
    cfg: &Acme,
    shared: Option<Arc<dyn crate::store::AcmeStore>>,
    metrics: Arc<Metrics>,
) -> Result<(Arc<AcmeCerts>, AcmeRunner), TlsError> {
    match shared {
        Some(store) => {
            let (certs, driver) = shared_acme::shared_acme(cfg, store, acme_client(cfg)?, metrics)?;
            Ok((certs, AcmeRunner::Shared(Box::new(driver))))
        }
        None => {
            let (certs, state) = acme(cfg, metrics)?;
            Ok((certs.clone(), AcmeRunner::Cache(certs, state)))
        }
    }
}

/// The client that reaches the ACME directory over https: public roots, plus `ca_file` for a
/// private ACME CA.
fn acme_client(cfg: &Acme) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = crate::upstream::root_store(cfg.ca_file.as_deref())?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(client))
}

/// Sets up automatic certificates: nothing touches the network until the returned driver is
/// polled, and the driver's first step is the cache, so a restart serves the cached
/// certificate before any call to the CA.
pub fn acme(cfg: &Acme, metrics: Arc<Metrics>) -> Result<(Arc<AcmeCerts>, AcmeDriver), TlsError> {
    prepare_cache_dir(&cfg.cache_dir)?;
    let client = acme_client(cfg)?;
    let shared = Arc::new(Mutex::new(None::<Arc<AcmeCerts>>));
    let cache = ObservedCache { dir: DirCache::new(cfg.cache_dir.clone()), certs: shared.clone(), metrics };
    let state = AcmeConfig::new_with_client_config(&cfg.domains, client)
        .contact(&cfg.contact)
        .directory(&cfg.directory)
        .cache(cache)
        .state();
    let certs = Arc::new(AcmeCerts {
        resolver: state.resolver(),
        challenge: state.challenge_rustls_config_with_provider(provider()),
        info: ArcSwapOption::empty(),
        cached: ArcSwapOption::empty(),
        last_error: Mutex::new(None),
        domains: cfg.domains.clone(),
    });
    *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(certs.clone());
    Ok((certs, state))
}

/// The cache holds the account key and certificate keys: create it private to the relay's user.
fn prepare_cache_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| TlsError::CacheDir { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    // Fail now rather than after the first certificate was issued and could not be kept.
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(err)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Polls the ACME state machine until `stop`: it loads the cache, orders a certificate when
/// there is none (or renewal is due: a third of the lifetime before expiry), and backs off on
/// errors. Each outcome is logged, counted, and kept for `/readyz`.
pub async fn drive_acme(
    mut state: AcmeDriver,
    certs: Arc<AcmeCerts>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    use rustls_acme::EventOk;
    let labels = |result| CertLabels { source: CertSourceLabel::Acme, result };
    let domains = certs.domains.join(", ");
    tracing::info!(%domains, "acme: starting (certificate cache first, then the CA if needed)");
    loop {
        let event = tokio::select! {
            e = state.next() => e,
            _ = stop.changed() => return,
        };
        let Some(event) = event else { return };
        match event {
            Ok(ok) => {
                match ok {
                    EventOk::DeployedCachedCert => {
                        if let Some(info) = certs.cached.load_full() {
                            certs.set_info((*info).clone(), &metrics);
                            tracing::info!("acme: serving the cached certificate for {}", info.describe());
                        }
                        metrics.cert_loads.get_or_create(&labels(CertResult::Ok)).inc();
                    }
                    EventOk::DeployedNewCert => {
                        // Its details arrive with the cache store that follows.
                        tracing::info!(%domains, "acme: obtained a new certificate; serving it to new connections");
                        metrics.cert_loads.get_or_create(&labels(CertResult::Ok)).inc();
                    }
                    EventOk::CertCacheStore | EventOk::AccountCacheStore => {
                        tracing::debug!("acme: cache updated ({ok:?})");
                    }
                }
                *certs.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                metrics.acme_failing.set(0);
            }
            Err(e) => {
                let serving = certs.info().map_or("no certificate yet".to_string(), |i| {
                    format!("still serving the certificate for {}", i.describe())
                });
                let reason = e.to_string();
                tracing::error!(
                    %domains,
                    "acme: {reason} ({serving}; retrying with backoff; check that the domains resolve to this host, \
                     port 443 reaches the https listener, and the directory is reachable)"
                );
                *certs.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                metrics.cert_loads.get_or_create(&labels(CertResult::Error)).inc();
                metrics.acme_failing.set(1);
            }
        }
    }
}

/// rustls-acme's directory cache, watched: what it loads or stores is parsed for the expiry the
/// relay reports (rustls-acme keeps the deployed certificate to itself).
struct ObservedCache {
    dir: DirCache<PathBuf>,
    certs: Arc<Mutex<Option<Arc<AcmeCerts>>>>,
    metrics: Arc<Metrics>,
}

impl ObservedCache {
    fn certs(&self) -> Option<Arc<AcmeCerts>> {
        self.certs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The leaf of a rustls-acme cache entry (the key's PEM first, then the chain).
fn leaf_info(pem: &[u8]) -> Option<CertInfo> {
    let leaf = rustls_pemfile::certs(&mut &pem[..]).next()?.ok()?;
    CertInfo::parse(&leaf).ok()
}

#[async_trait::async_trait]
impl CertCache for ObservedCache {
    type EC = std::io::Error;
    async fn load_cert(&self, domains: &[String], directory_url: &str) -> Result<Option<Vec<u8>>, Self::EC> {
        let pem = self.dir.load_cert(domains, directory_url).await?;
        if let (Some(pem), Some(certs)) = (&pem, self.certs()) {
            certs.cached.store(leaf_info(pem).map(Arc::new));
        }
        Ok(pem)
    }
    async fn store_cert(&self, domains: &[String], directory_url: &str, cert: &[u8]) -> Result<(), Self::EC> {
        // Stored only once deployed: this is what is being served, whether or not the write works.
        if let (Some(info), Some(certs)) = (leaf_info(cert), self.certs()) {
            tracing::info!("acme: serving the new certificate for {}", info.describe());
            certs.set_info(info, &self.metrics);
        }
        self.dir.store_cert(domains, directory_url, cert).await
    }
}

#[async_trait::async_trait]
impl AccountCache for ObservedCache {
    type EA = std::io::Error;
    async fn load_account(&self, contact: &[String], directory_url: &str) -> Result<Option<Vec<u8>>, Self::EA> {
        self.dir.load_account(contact, directory_url).await
    }
    async fn store_account(&self, contact: &[String], directory_url: &str, account: &[u8]) -> Result<(), Self::EA> {
        self.dir.store_account(contact, directory_url, account).await
    }
}

/// The TLS stage of the https listener.
pub struct Tls {
    config: Arc<ServerConfig>,
    pub source: CertSource,
}

pub enum CertSource {
    Files(Arc<FileCerts>),
    Acme(Arc<AcmeCerts>),
}

impl Tls {
    pub fn files(certs: Arc<FileCerts>) -> Tls {
        Tls { config: server_config(certs.clone()), source: CertSource::Files(certs) }
    }

    pub fn acme(certs: Arc<AcmeCerts>) -> Tls {
        Tls { config: server_config(certs.resolver.clone()), source: CertSource::Acme(certs) }
    }

    /// The handshake. `Ok(None)`: the connection was an ACME TLS-ALPN-01 validation, answered
    /// and closed; it carries no HTTP.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Option<TlsStream<TcpStream>>> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        if let CertSource::Acme(acme) = &self.source {
            if rustls_acme::is_tls_alpn_challenge(&start.client_hello()) {
                tracing::info!(
                    sni = start.client_hello().server_name().unwrap_or(""),
                    "acme: answering a TLS-ALPN-01 validation"
                );
                let mut tls = start.into_stream(acme.challenge.clone()).await?;
                let _ = tls.shutdown().await;
                return Ok(None);
            }
        }
        Ok(Some(start.into_stream(self.config.clone()).await?))
    }

    /// The certificate served now (None while ACME has none yet).
    pub fn info(&self) -> Option<Arc<CertInfo>> {
        match &self.source {
            CertSource::Files(f) => Some(f.info()),
            CertSource::Acme(a) => a.info(),
        }
    }

    /// Reasons `/readyz` should fail: no certificate to serve, or an expired one.
    pub fn problems(&self) -> Vec<String> {
        match &self.source {
            CertSource::Files(f) => {
                let info = f.info();
                if info.expired() {
                    vec![format!("tls: the certificate for {} has expired", info.describe())]
                } else {
                    vec![]
                }
            }
            CertSource::Acme(a) => match (a.info(), a.last_error()) {
                (None, Some(e)) => vec![format!("acme: no certificate yet; last attempt failed: {e}")],
                (None, None) => vec!["acme: no certificate yet (ordering)".to_string()],
                (Some(info), _) if info.expired() => {
                    vec![format!("acme: the certificate for {} has expired", info.describe())]
                }
                _ => vec![],
            },
        }
    }

    /// Things `/readyz` should show without failing: a refused file pair, a failing renewal.
    pub fn warnings(&self) -> Vec<String> {
        match &self.source {
            CertSource::Files(f) => {
                f.last_error().map(|e| format!("tls: new certificate files refused, serving the previous ones: {e}"))
            }
            CertSource::Acme(a) => match (a.info(), a.last_error()) {
                (Some(info), Some(e)) => {
                    Some(format!("acme: renewal failing, serving the certificate for {}: {e}", info.describe()))
                }
                _ => None,
            },
        }
        .into_iter()
        .collect()
    }
}
