//! Listeners and the process lifecycle: binds the public and admin listeners, serves HTTP/1.1
//! and HTTP/2 (prior knowledge) on each accepted connection, reloads on SIGHUP, and on
//! SIGTERM/SIGINT stops accepting and lets requests in flight finish within `shutdown_grace`.

use crate::admin::{self, Readiness};
use crate::config::Config;
use crate::relay::{Conn, Relay};
use crate::store::{EmbeddedStore, Store};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
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
    pub http: Option<SocketAddr>,
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
    let admin_addr = config.admin.listen;
    if config.server.https.is_some() {
        tracing::warn!("the https listener is not available in this version; serving plain http only");
    }
    let relay = Relay::with_clock(config, clock).map_err(|e| ServeError::Setup(e.to_string()))?;
    relay.start_queue(store).map_err(|e| ServeError::Setup(format!("cannot read the queue: {e}")))?;
    let ready = Arc::new(Readiness::default());
    let (stop, _) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = Running { relay: relay.clone(), http: None, admin: None, stop, tasks: Default::default() };

    if let Some(addr) = http_addr {
        let listener = bind(addr, "http").await?;
        running.http = Some(listener.local_addr().map_err(|source| ServeError::Bind { addr, what: "http", source })?);
        let relay = relay.clone();
        let serve = move |stream: TcpStream, peer: SocketAddr| {
            let relay = relay.clone();
            let conn = Conn { peer, proto: "http" };
            (
                stream,
                service_fn(move |req| {
                    let relay = relay.clone();
                    async move { Ok::<_, Infallible>(relay.handle(req, conn).await) }
                }),
            )
        };
        tasks.spawn(accept_loop(listener, serve, running.stopping(), grace, header_timeout));
    }
    if let Some(addr) = admin_addr {
        let listener = bind(addr, "admin").await?;
        running.admin =
            Some(listener.local_addr().map_err(|source| ServeError::Bind { addr, what: "admin", source })?);
        let (relay, ready) = (relay.clone(), ready.clone());
        let serve = move |stream: TcpStream, _peer: SocketAddr| {
            let (relay, ready) = (relay.clone(), ready.clone());
            (
                stream,
                service_fn(move |req| {
                    let (relay, ready) = (relay.clone(), ready.clone());
                    async move { Ok::<_, Infallible>(admin::handle(&relay, &ready, req).await) }
                }),
            )
        };
        tasks.spawn(accept_loop(listener, serve, running.stopping(), grace, header_timeout));
    }
    ready.listeners_bound.store(true, Ordering::Release);
    tracing::info!(
        http = %running.http.map_or("-".into(), |a| a.to_string()),
        admin = %running.admin.map_or("-".into(), |a| a.to_string()),
        "whatsapp-relay listening"
    );
    running.tasks = tasks;
    Ok(running)
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, what, source })
}

/// Accepts connections until `stop` flips, then waits up to `grace` for open ones to finish.
async fn accept_loop<F, S>(
    listener: TcpListener,
    serve: F,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    header_timeout: Duration,
) where
    F: Fn(TcpStream, SocketAddr) -> (TcpStream, S),
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
                let (stream, service) = serve(stream, peer);
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
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

/// Runs until SIGTERM/SIGINT; SIGHUP reloads the configuration.
pub async fn run(config: Config) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let running = start(config).await?;
    notify(sd_notify::NotifyState::Ready);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notify(sd_notify::NotifyState::Reloading);
                match running.relay.reload() {
                    Ok(()) => tracing::info!("configuration reloaded (SIGHUP)"),
                    Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
                }
                notify(sd_notify::NotifyState::Ready);
            }
        }
    }
    notify(sd_notify::NotifyState::Stopping);
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Tells systemd (Type=notify) about state changes; a no-op outside systemd.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::debug!("sd_notify failed: {e}");
    }
}
