//! Listeners and the process lifecycle: binds the public (http, https) and admin listeners,
//! serves HTTP/1.1 and HTTP/2 on each accepted connection (by ALPN on https, by prior knowledge
//! on plain http), reloads on SIGHUP and `POST /admin/reload`, and on SIGTERM/SIGINT stops
//! accepting and lets requests in flight finish within `shutdown_grace`.

use crate::admin::{self, Readiness};
use crate::config::Config;
use crate::metrics::ResultLabels;
use crate::relay::{Conn, Relay};
use crate::store::{EmbeddedStore, Store};
use crate::tls::{self, CertSource, FileCerts, Tls};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
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
    pub relay: Arc<Relay>,
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
        if let Some(q) = self.relay.queue().cloned() {
            let _ = tokio::task::spawn_blocking(move || q.shutdown()).await;
        }
    }

    /// A receiver that flips to `true` when shutdown starts.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }
}

/// What the admin listener and the signal handler share: the relay, its readiness, the https
/// listener's certificates, and the one way to reload.
pub struct Control {
    pub relay: Arc<Relay>,
    pub ready: Readiness,
    pub tls: Option<Arc<Tls>>,
    started: Fixed,
    reload_thread: ReloadThread,
}

/// One long-lived thread that builds every new routing table and frees every old one. With
/// `spawn_blocking` each reload could land on another thread, hence another malloc arena, and
/// memory freed in one arena is not reused by the next: at 100,000 accounts the process grew
/// to about five times its start-up size. On one thread it stays near twice (old + new).
struct ReloadThread {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl ReloadThread {
    fn start() -> std::io::Result<ReloadThread> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        // Ends when the sender (the Control) is dropped.
        std::thread::Builder::new().name("reload".into()).spawn(move || {
            for job in rx {
                // A panicking reload fails that reload (its answer channel drops), not the next.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(ReloadThread { jobs: std::sync::Mutex::new(tx) })
    }

    /// Runs `f` on the reload thread and waits for its result without blocking the runtime.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.detach(move || {
            let _ = tx.send(f());
        })?;
        rx.await.map_err(|_| "the reload failed unexpectedly (see the log)".to_string())
    }

    /// Queues `f` on the reload thread without waiting for it.
    fn detach(&self, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
        let sent = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Box::new(f));
        sent.map_err(|_| "the reload thread has stopped; restart the relay".to_string())
    }
}

/// What a reload reports (the admin API returns it).
#[derive(Debug, serde::Serialize)]
pub struct ReloadReport {
    pub took_ms: f64,
    pub motions: usize,
    pub accounts: usize,
    /// Changes that were not applied (they need a restart) and a refused new certificate.
    pub warnings: Vec<String>,
}

impl Control {
    /// Reloads the config file: validates it and builds the new routing table off the runtime's
    /// workers, swaps it in whole (requests in flight finish on the old one; no listener is
    /// touched), then re-reads the certificate files. A file that does not validate is refused
    /// and the running config stays; the error is logged and returned.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, String> {
        notify_reloading();
        let relay = self.relay.clone();
        let result =
            self.reload_thread.run(move || relay.reload_config()).await.and_then(|r| r.map_err(|e| e.to_string()));
        let metrics = &self.relay.metrics;
        let reloaded = match result {
            Ok(r) => r,
            Err(e) => {
                metrics.config_reloads.get_or_create(&ResultLabels { result: "refused".into() }).inc();
                tracing::error!(trigger, "reload refused, keeping the running configuration: {e}");
                notify(&[sd_notify::NotifyState::Ready]);
                return Err(e);
            }
        };
        let config = &reloaded.new.config;
        let mut warnings = self.started.restart_needed(config);
        for w in &warnings {
            tracing::warn!(trigger, "{w}");
        }
        if let Some(CertSource::Files(files)) = self.tls.as_ref().map(|t| &t.source) {
            let (files, paths, m) = (files.clone(), config.server.tls.clone(), metrics.clone());
            // Forced: a reload re-reads the files even if they look unchanged.
            let refreshed = tokio::task::spawn_blocking(move || files.refresh(paths.as_ref(), true, &m)).await;
            if let Ok(Some(Err(e))) = refreshed {
                warnings.push(format!("new certificate refused, the previous one stays: {e}"));
            }
        }
        let report = ReloadReport {
            took_ms: reloaded.took.as_secs_f64() * 1000.0,
            motions: config.motions.len(),
            accounts: config.motions.iter().map(|m| m.accounts.len()).sum(),
            warnings,
        };
        metrics.config_reloads.get_or_create(&ResultLabels { result: "ok".into() }).inc();
        metrics.config_reload_seconds.set(reloaded.took.as_secs_f64());
        tracing::info!(
            trigger,
            took_ms = report.took_ms,
            motions = report.motions,
            accounts = report.accounts,
            "configuration reloaded"
        );
        // Freeing a large table takes a while too (a fifth of the build time at 100,000
        // accounts): not on a worker that serves requests. In-flight requests may still hold it.
        let old = reloaded.old;
        let _ = self.reload_thread.detach(move || drop(old));
        notify(&[sd_notify::NotifyState::Ready]);
        Ok(report)
    }
}

/// Settings read once at start (listeners, storage, certificate source, timeouts). A reload
/// that changes them is applied except for these, and the log says a restart is needed.
#[derive(PartialEq)]
struct Fixed {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    storage: PathBuf,
    tls_files: bool,
    /// Domains, contact, directory, cache and CA, compared as one.
    acme: Option<String>,
    shutdown_grace: Duration,
    header_timeout: Duration,
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        let s = &c.server;
        Fixed {
            http: s.http,
            https: s.https,
            admin: c.admin.listen,
            storage: c.storage_path.clone(),
            tls_files: s.tls.is_some(),
            acme: s.acme.as_ref().map(|a| {
                format!("{:?} {:?} {} {} {:?}", a.domains, a.contact, a.directory, a.cache_dir.display(), a.ca_file)
            }),
            shutdown_grace: s.shutdown_grace,
            header_timeout: s.header_timeout,
        }
    }

    fn restart_needed(&self, c: &Config) -> Vec<String> {
        let new = Fixed::of(c);
        let mut out = Vec::new();
        let opt = |a: Option<SocketAddr>| a.map_or("(none)".to_string(), |a| a.to_string());
        let mut changed = |what: &str, old: String, new: String| {
            if old != new {
                out.push(format!(
                    "{what} changed from {old} to {new}: not applied; restart the relay to apply it \
                     (a reload never re-binds listeners or reopens storage)"
                ));
            }
        };
        changed("[server] http", opt(self.http), opt(new.http));
        changed("[server] https", opt(self.https), opt(new.https));
        changed("[admin] listen", opt(self.admin), opt(new.admin));
        changed("[storage] path", self.storage.display().to_string(), new.storage.display().to_string());
        let source = |f: &Fixed| {
            if f.tls_files {
                "[server.tls]"
            } else if f.acme.is_some() {
                "[server.acme]"
            } else {
                "(none)"
            }
        };
        changed("the certificate source", source(self).into(), source(&new).into());
        if self.acme.is_some() && new.acme.is_some() && self.acme != new.acme {
            changed("[server.acme]", "its settings at start".into(), "new settings".into());
        }
        changed("[server] shutdown_grace", format!("{:?}", self.shutdown_grace), format!("{:?}", new.shutdown_grace));
        changed("[server] header_timeout", format!("{:?}", self.header_timeout), format!("{:?}", new.header_timeout));
        out
    }
}

/// Opens the embedded store under `[storage] path`, binds every listener of `config` and starts
/// serving. Port 0 binds an ephemeral port; the bound addresses are returned and logged.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let path = config.storage_path.clone();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .map_err(|e| ServeError::Setup(e.to_string()))?
        .map_err(|e| ServeError::Setup(format!("{e} (check [storage] path and its permissions)")))?;
    start_with_store(config, Arc::new(store)).await
}

/// Like [`start`], over a store the caller opened (tests inject faults this way).
pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> Result<Running, ServeError> {
    start_with_clock(config, store, Arc::new(crate::clock::SystemClock)).await
}

/// Like [`start_with_store`], with the relay's notion of "now" supplied (tests move a
/// [`crate::clock::ManualClock`] to cross the 24-hour window without waiting a day).
pub async fn start_with_clock(
    config: Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn crate::clock::Clock>,
) -> Result<Running, ServeError> {
    let grace = config.server.shutdown_grace;
    let header_timeout = config.server.header_timeout;
    let http_addr = config.server.http;
    let https_addr = config.server.https;
    let admin_addr = config.admin.listen;
    let tls_files = config.server.tls.clone();
    let acme_cfg = config.server.acme.clone();
    let started = Fixed::of(&config);
    let relay = Relay::with_clock(config, clock).map_err(|e| ServeError::Setup(e.to_string()))?;
    let metrics = relay.metrics.clone();

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
            let (certs, driver) =
                tls::acme(&acme, metrics.clone()).map_err(|e| ServeError::Setup(format!("[server.acme]: {e}")))?;
            acme_driver = Some((certs.clone(), driver));
            Some(Arc::new(Tls::acme(certs)))
        }
        (Some(_), None, None) => return Err(ServeError::Setup("https needs [server.tls] or [server.acme]".into())),
    };

    relay.start_queue(store).map_err(|e| ServeError::Setup(format!("cannot read the queue: {e}")))?;
    let reload_thread =
        ReloadThread::start().map_err(|e| ServeError::Setup(format!("cannot start the reload thread: {e}")))?;
    let control = Arc::new(Control {
        relay: relay.clone(),
        ready: Readiness::default(),
        tls: tls.clone(),
        started,
        reload_thread,
    });
    let (stop, _) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = Running {
        relay: relay.clone(),
        control: control.clone(),
        http: None,
        https: None,
        admin: None,
        stop,
        tasks: Default::default(),
    };
    let public = |proto: &'static str| {
        let relay = relay.clone();
        move |peer: SocketAddr| {
            let relay = relay.clone();
            let conn = Conn { peer, proto };
            service_fn(move |req| {
                let relay = relay.clone();
                async move { Ok::<_, Infallible>(relay.handle(req, conn).await) }
            })
        }
    };

    if let Some(addr) = http_addr {
        let (listener, bound) = bind(addr, "http").await?;
        running.http = Some(bound);
        serve_per_core(&mut tasks, listener, None, public("http"), running.stopping(), grace, header_timeout)?;
    }
    if let (Some(addr), Some(tls)) = (https_addr, &tls) {
        let (listener, bound) = bind(addr, "https").await?;
        running.https = Some(bound);
        relay.set_https_port(bound.port());
        let stage = Some(tls.clone());
        serve_per_core(&mut tasks, listener, stage, public("https"), running.stopping(), grace, header_timeout)?;
    }
    if let Some(addr) = admin_addr {
        let (listener, bound) = bind(addr, "admin").await?;
        running.admin = Some(bound);
        let control = control.clone();
        let serve = move |_peer: SocketAddr| {
            let control = control.clone();
            service_fn(move |req| {
                let control = control.clone();
                async move { Ok::<_, Infallible>(admin::handle(&control, req).await) }
            })
        };
        tasks.spawn(accept_loop(listener, None, serve, running.stopping(), grace, header_timeout));
    }
    match tls.as_ref().map(|t| &t.source) {
        Some(CertSource::Files(files)) => {
            tasks.spawn(watch_cert_files(files.clone(), metrics.clone(), running.stopping()));
        }
        Some(CertSource::Acme(_)) => {
            // Started once the https listener is bound: TLS-ALPN-01 validations arrive there.
            if let Some((certs, driver)) = acme_driver {
                tasks.spawn(tls::drive_acme(driver, certs, metrics.clone(), running.stopping()));
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
        "whatsapp-relay listening"
    );
    running.tasks = tasks;
    Ok(running)
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let err = |source| ServeError::Bind { addr, what, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Re-reads the certificate files when they change (polled: no inotify dependency, and it sees
/// files replaced behind symlinks too).
async fn watch_cert_files(
    certs: Arc<FileCerts>,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(tls::WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (certs, metrics) = (certs.clone(), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || certs.refresh(None, false, &metrics)).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// Serves a public listener on one thread per core, each with its own single-threaded runtime
/// accepting from the same socket: a connection, its requests and the upstream connections
/// they use (`Upstream::client` is per thread) stay on one thread, with no work-stealing or
/// cross-thread wake-ups on the request path. Everything else (admin, queue, reload, signals)
/// stays on the main runtime. Each thread ends after its connections drained (see
/// [`accept_loop`]); the join is added to `tasks`.
fn serve_per_core<F, S>(
    tasks: &mut tokio::task::JoinSet<()>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    serve: F,
    stop: watch::Receiver<bool>,
    grace: Duration,
    header_timeout: Duration,
) -> Result<(), ServeError>
where
    F: Fn(SocketAddr) -> S + Clone + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::http_util::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let setup = |e: std::io::Error| ServeError::Setup(format!("cannot start a serving thread: {e}"));
    let shared = listener.into_std().map_err(setup)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for i in 0..cores {
        let socket = shared.try_clone().map_err(setup)?;
        let (tls, serve, stop) = (tls.clone(), serve.clone(), stop.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup)?;
        let thread = std::thread::Builder::new()
            .name(format!("serve-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => accept_loop(listener, tls, serve, stop, grace, header_timeout).await,
                        Err(e) => tracing::error!("serving thread {i} cannot use the listener: {e}"),
                    }
                })
            })
            .map_err(setup)?;
        tasks.spawn_blocking(move || {
            if thread.join().is_err() {
                tracing::error!("serving thread {i} panicked");
            }
        });
    }
    Ok(())
}

/// Accepts connections until `stop` flips, then waits up to `grace` for open ones to finish.
/// With `tls`, each connection first goes through the TLS handshake (bounded by
/// `header_timeout`, like a slow request head) in its own task.
async fn accept_loop<F, S>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    serve: F,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    header_timeout: Duration,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::http_util::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    let builder = Arc::new(builder);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = serve(peer);
                // Taken now, so a shutdown that starts during the handshake still waits for
                // this connection (and ends it gracefully once it is served).
                let watcher = graceful.watcher();
                let (builder, tls) = (builder.clone(), tls.clone());
                tokio::spawn(async move {
                    let ended = match tls {
                        None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
                        Some(tls) => {
                            let stream = match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                                Ok(Ok(Some(s))) => s,
                                Ok(Ok(None)) => return,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "tls handshake failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "tls handshake timed out");
                                    return;
                                }
                            };
                            watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown_grace ({grace:?}) passed with connections still open; closing them");
    }
}

/// Runs until SIGTERM/SIGINT; SIGHUP reloads the configuration and the certificate files.
pub async fn run(config: Config) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let running = start(config).await?;
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);
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
    notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("finishing requests in flight")]);
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// `RELOADING=1` with the timestamp newer systemd versions expect alongside it.
fn notify_reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
    }
}

/// Tells systemd (Type=notify) about state changes; a no-op outside systemd.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!("sd_notify failed: {e}");
    }
}
