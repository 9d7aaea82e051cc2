//! Accepting connections: binding a listener, serving it on one thread per core (public
//! listeners) or on the main runtime (admin), HTTP/1.1 and HTTP/2 on each connection (by ALPN
//! on https, by prior knowledge on plain http), the TLS handshake within `header_timeout`, and
//! the graceful end of open connections within `shutdown_grace`.

use super::ServeError;
use super::drain::{Drain, Marking};
use crate::tls::Tls;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What serves a connection's requests: a hyper service that never fails (errors are answers).
pub(super) trait Handler:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::http_util::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<T> Handler for T where
    T: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::http_util::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// The time limits of a listener's connections.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    /// How long open connections may take to finish once shutdown starts.
    pub grace: Duration,
    /// The TLS handshake and each request's headers must arrive within this.
    pub header_timeout: Duration,
}

pub(super) async fn bind(addr: SocketAddr, what: &'static str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let err = |source| ServeError::Bind { addr, what, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Serves a public listener on one thread per core, each with its own single-threaded runtime
/// accepting from the same socket: a connection, its requests and the upstream connections
/// they use (`Upstream::client` is per thread) stay on one thread, with no work-stealing or
/// cross-thread wake-ups on the request path. Everything else (admin, queue, reload, signals)
/// stays on the main runtime. Each thread ends after its connections drained (see
/// [`accept_loop`]); the join is added to `tasks`.
pub(super) fn serve_per_core<F, S>(
    tasks: &mut tokio::task::JoinSet<()>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    serve: F,
    stop: watch::Receiver<bool>,
    limits: Limits,
) -> Result<(), ServeError>
where
    F: Fn(SocketAddr) -> S + Clone + Send + 'static,
    S: Handler,
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
                        Ok(listener) => accept_loop(listener, tls, serve, stop, limits).await,
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
pub(super) async fn accept_loop<F, S>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    serve: F,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) where
    F: Fn(SocketAddr) -> S,
    S: Handler,
{
    let Limits { grace, header_timeout } = limits;
    let drain = Drain::new();
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
                // Taken now, so a shutdown that starts during the handshake still waits for
                // this connection (and ends it gracefully once its first request is served).
                let watcher = drain.watch();
                let service = Marking { inner: serve(peer), first: watcher.first() };
                let (builder, tls) = (builder.clone(), tls.clone());
                tokio::spawn(async move {
                    let ended = match tls {
                        None => watcher.serve(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
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
                            watcher.serve(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
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
    if !drain.shutdown(grace).await {
        tracing::warn!("shutdown_grace ({grace:?}) passed with connections still open; closing them");
    }
}
