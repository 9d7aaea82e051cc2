//! Listeners and the process lifecycle: binds the public (http, https) and admin listeners,
//! serves HTTP/1.1 and HTTP/2 on each accepted connection (by ALPN on https, by prior knowledge
//! on plain http), reloads on SIGHUP and `POST /admin/reload`, and on SIGTERM/SIGINT stops
//! accepting and lets requests in flight finish within `shutdown_grace`.

mod activity;
mod admission;
mod balance;
mod drain;
mod listen;
mod passed;

pub use passed::Passed;

use crate::admin::Admin;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StorageBackend};
use crate::control::{self, Control, Started};
use crate::relay::Relay;
use crate::request::{Conn, Scheme};
use crate::services::Services;
use crate::store::{EmbeddedStore, PostgresStore, Stores};
use crate::tls::{self, CertSource, FileCerts, Tls};
use admission::Admission;
use hyper::service::service_fn;
use listen::{Limits, accept_loop, bind, serve_per_core};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { addr: SocketAddr, what: &'static str, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

/// A started relay: its bound addresses and the handle that stops it.
pub struct Running {
    pub services: Arc<Services>,
    pub control: Arc<Control>,
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Stops accepting, waits for the listeners' connections to finish (bounded by
    /// `shutdown_grace`), then stops delivery and syncs the store.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let queue = self.services.queue.clone();
        let _ = tokio::task::spawn_blocking(move || queue.shutdown()).await;
    }

    /// A receiver that flips to `true` when shutdown starts.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }
}

/// Opens the store `[storage]` names (the one place that picks a backend), binds every
/// listener of `config` and starts serving. Port 0 binds an ephemeral port; the bound addresses
/// are returned and logged.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    start_passed(config, Passed::default()).await
}

/// Like [`start`], serving the sockets the service manager passed (see [`Passed`]) in place of
/// binding the configured addresses of the listeners they name.
pub async fn start_passed(config: Config, passed: Passed) -> Result<Running, ServeError> {
    let stores = open_stores(&config).await?;
    start_inner(config, stores, Arc::new(SystemClock), passed).await
}

/// The backend of `[storage]`, opened off the runtime's workers (disk or network I/O).
async fn open_stores(config: &Config) -> Result<Stores, ServeError> {
    let setup = |e: tokio::task::JoinError| ServeError::Setup(e.to_string());
    match &config.storage {
        StorageBackend::Embedded => {
            let path = config.storage_path.clone();
            let store =
                tokio::task::spawn_blocking(move || EmbeddedStore::open(&path)).await.map_err(setup)?.map_err(|e| {
                    match e {
                        // It already says what to do.
                        crate::store::StoreError::Damaged(_) => ServeError::Setup(e.to_string()),
                        e => ServeError::Setup(format!("{e} (check [storage] path and its permissions)")),
                    }
                })?;
            Ok(Stores::of(Arc::new(store)))
        }
        StorageBackend::Postgres(settings) => {
            let settings = settings.clone();
            let store = tokio::task::spawn_blocking(move || PostgresStore::open(&settings))
                .await
                .map_err(setup)?
                .map_err(|e| ServeError::Setup(format!("[storage] backend = \"postgres\": {e}")))?;
            Ok(Stores::shared(Arc::new(store)))
        }
    }
}

/// Like [`start`], over stores the caller opened and with its notion of "now" (tests inject
/// store faults, and move a manual clock across the 24-hour window or `give_up_after`).
pub async fn start_with(config: Config, stores: Stores, clock: Arc<dyn Clock>) -> Result<Running, ServeError> {
    start_inner(config, stores, clock, Passed::default()).await
}

async fn start_inner(
    config: Config,
    stores: Stores,
    clock: Arc<dyn Clock>,
    mut passed: Passed,
) -> Result<Running, ServeError> {
    let grace = config.server.shutdown_grace;
    let (header_timeout, idle_timeout) = (config.server.header_timeout, config.server.idle_timeout);
    let (http_addr, https_addr, admin_addr) = (config.server.http, config.server.https, config.admin.listen);
    let (tls_files, acme_cfg) = (config.server.tls.clone(), config.server.acme.clone());
    let started = Started::of(&config);
    // The connection caps, read before the config moves into the services.
    let (max_connections, per_ip) = (config.server.max_connections, config.server.max_connections_per_ip);
    let trusted = config.server.trusted_proxies.clone();
    let shared_acme = stores.acme.clone();
    let services = Services::start(config, stores, clock).map_err(|e| ServeError::Setup(e.to_string()))?;
    let metrics = services.metrics.clone();
    let admission = |what| Admission::new(what, max_connections, per_ip, trusted.clone(), &metrics);

    // The certificate source, before anything is bound: a bad certificate file fails the start.
    let mut acme_driver = None;
    let tls = match (https_addr, tls_files, acme_cfg) {
        (None, ..) => None,
        (Some(_), Some(files), _) => {
            let certs = FileCerts::load(&files).map_err(|e| {
                ServeError::Setup(format!("[server.tls]: {e} (fix the files, or remove [server] https)"))
            })?;
            metrics.cert_expiry.set(certs.info().not_after);
            tracing::info!("tls: serving the certificate for {}", certs.info().describe());
            Some(Arc::new(Tls::files(certs)))
        }
        (Some(_), None, Some(acme)) => {
            // Relays sharing a database share the certificate too.
            let (certs, runner) = tls::acme_source(&acme, shared_acme, metrics.clone())
                .map_err(|e| ServeError::Setup(format!("[server.acme]: {e}")))?;
            acme_driver = Some(runner);
            Some(Arc::new(Tls::acme(certs)))
        }
        (Some(_), None, None) => return Err(ServeError::Setup("https needs [server.tls] or [server.acme]".into())),
    };

    let control = Control::new(services.clone(), tls.clone(), started)
        .map_err(|e| ServeError::Setup(format!("cannot start the reload thread: {e}")))?;
    let control = Arc::new(control);
    let (stop, _) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = Running {
        services: services.clone(),
        control: control.clone(),
        http: None,
        https: None,
        admin: None,
        stop,
        tasks: Default::default(),
    };

    // Bound before anything is served: the public handler needs the https port (redirects).
    // A passed socket (systemd) stands in for the configured address of the listener it names.
    let http = match (passed.take("http", http_addr)?, http_addr) {
        (Some(socket), _) => Some(socket),
        (None, Some(addr)) => Some(bind(addr, "http").await?),
        (None, None) => None,
    };
    let https = match (passed.take("https", https_addr.filter(|_| tls.is_some()))?, https_addr, &tls) {
        (Some(socket), ..) => Some(socket),
        (None, Some(addr), Some(_)) => Some(bind(addr, "https").await?),
        _ => None,
    };
    let admin = match (passed.take("admin", admin_addr)?, admin_addr) {
        (Some(socket), _) => Some(socket),
        (None, Some(addr)) => Some(bind(addr, "admin").await?),
        (None, None) => None,
    };
    let relay = Arc::new(Relay::new(services.clone(), https.as_ref().map(|(_, bound)| bound.port())));
    let public = |scheme: Scheme| {
        let relay = relay.clone();
        move |peer: SocketAddr| {
            let relay = relay.clone();
            let conn = Conn { peer, scheme };
            service_fn(move |req| {
                let relay = relay.clone();
                async move { Ok::<_, Infallible>(relay.handle(req, conn).await) }
            })
        }
    };
    let limits = Limits { grace, header_timeout, idle_timeout };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some((listener, bound)) = http {
        running.http = Some(bound);
        let stop = running.stopping();
        serve_per_core(&mut tasks, listener, None, public(Scheme::Http), stop, limits, admission("http"), threads)?;
    }
    if let Some((listener, bound)) = https {
        running.https = Some(bound);
        let (tls, stop) = (tls.clone(), running.stopping());
        serve_per_core(&mut tasks, listener, tls, public(Scheme::Https), stop, limits, admission("https"), threads)?;
    }
    if let Some((listener, bound)) = admin {
        running.admin = Some(bound);
        let admin = Admin::new(control.clone(), running.stopping());
        tasks.spawn(admin.clone().sample(running.stopping()));
        let serve = move |_peer: SocketAddr| {
            let admin = admin.clone();
            service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            })
        };
        tasks.spawn(accept_loop(listener, None, serve, running.stopping(), limits, admission("admin"), None));
    }
    match tls.as_ref().map(|t| &t.source) {
        Some(CertSource::Files(files)) => {
            tasks.spawn(tls::watch_cert_files(files.clone(), metrics.clone(), running.stopping()));
        }
        Some(CertSource::Acme(_)) => {
            // Started once the https listener is bound: TLS-ALPN-01 validations arrive there.
            if let Some(runner) = acme_driver {
                tasks.spawn(runner.run(metrics.clone(), running.stopping()));
            }
        }
        None => {}
    }
    control.ready.listeners_bound.store(true, Ordering::Release);
    let show = |a: Option<SocketAddr>| a.map_or("-".into(), |a| a.to_string());
    tracing::info!(
        http = %show(running.http),
        https = %show(running.https),
        admin = %show(running.admin),
        version = crate::VERSION,
        "whatsapp-relay listening"
    );
    running.tasks = tasks;
    // The config's parse and the start's other one-off allocations are freed by now.
    crate::memory::release();
    Ok(running)
}

/// Runs until SIGTERM/SIGINT; SIGHUP reloads the configuration and the certificate files.
/// `passed`: the sockets the service manager passed ([`Passed::from_env`]).
pub async fn run(config: Config, passed: Passed) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| ServeError::Setup(e.to_string()))?;
    // Every connection is a file: take all the process may have (the soft limit is often
    // 1,024 while the hard one is far higher), so max_connections is what caps them.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!("open files limit: {limit}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    let running = start_passed(config, passed).await?;
    control::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Logged, counted and notified inside; a refused file keeps the running config.
                let _ = running.control.reload("SIGHUP").await;
            }
        }
    }
    control::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("finishing requests in flight"),
    ]);
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
