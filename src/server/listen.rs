//! Accepting connections: binding a listener, serving it on one thread per core (public
//! listeners) or on the main runtime (admin), HTTP/1.1 and HTTP/2 on each connection (by ALPN
//! on https, by prior knowledge on plain http), the caps on open connections, the deadlines of
//! a connection (its first bytes, TLS handshake included, within `header_timeout`; closed after
//! `idle_timeout` without a request), and the graceful end of open connections within
//! `shutdown_grace`.

use super::ServeError;
use super::activity::{Activity, Tracked};
use super::admission::Admission;
use super::drain::Drain;
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
    /// A connection's first bytes (TLS handshake included) and each request's headers must
    /// arrive within this.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
}

/// Longest pause between `accept` attempts after errors (out of file descriptors): long
/// enough not to spin, short enough to serve again soon after connections close.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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
    admission: Arc<Admission>,
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
        let (tls, serve, stop, admission) = (tls.clone(), serve.clone(), stop.clone(), admission.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup)?;
        let thread = std::thread::Builder::new()
            .name(format!("serve-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => accept_loop(listener, tls, serve, stop, limits, admission).await,
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
/// A connection past the caps of `admission` is closed at once. With `tls`, each connection
/// first goes through the TLS handshake in its own task.
pub(super) async fn accept_loop<F, S>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    serve: F,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    admission: Arc<Admission>,
) where
    F: Fn(SocketAddr) -> S,
    S: Handler,
{
    let Limits { grace, header_timeout, idle_timeout } = limits;
    let drain = Drain::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper starts this timer when it waits for a request head, also between the requests of a
    // keep-alive connection, where it would close an idle connection after header_timeout: so
    // it gets the longer of the two. The first head is held to header_timeout by the
    // connection's first-bytes deadline (`Activity`), later ones to idle_timeout.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout.max(idle_timeout)).keep_alive(true);
    // Pings find a peer that vanished while a request of its is in flight.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(idle_timeout.min(Duration::from_secs(30))))
        .keep_alive_timeout(header_timeout);
    let builder = Arc::new(builder);
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off (more each time)
                        // instead of spinning, and say so every few seconds, not every time.
                        backoff = (backoff * 2).clamp(Duration::from_millis(5), ACCEPT_BACKOFF_MAX);
                        admission.accept_failed(&e);
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                };
                backoff = Duration::ZERO;
                let ticket = match admission.admit(peer.ip()) {
                    Ok(ticket) => ticket,
                    Err(why) => {
                        admission.refused(why);
                        continue; // dropping the stream closes it
                    }
                };
                let _ = stream.set_nodelay(true);
                let activity = Activity::new();
                // Taken now, so a shutdown that starts during the handshake still waits for
                // this connection (and ends it gracefully once its first request is served).
                let watcher = drain.watch(activity.clone());
                let service = Tracked { inner: serve(peer), activity: activity.clone() };
                let (builder, tls) = (builder.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ticket = ticket;
                    let serving = async {
                        match tls {
                            None => watcher.serve(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
                            Some(tls) => match tls.accept(stream).await {
                                Ok(Some(stream)) => {
                                    watcher.serve(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                                }
                                Ok(None) => Ok(()),
                                Err(e) => {
                                    tracing::debug!(%peer, "tls handshake failed: {e}");
                                    Ok(())
                                }
                            },
                        }
                    };
                    tokio::select! {
                        ended = serving => {
                            if let Err(e) = ended {
                                tracing::debug!(%peer, "connection ended: {e}");
                            }
                        }
                        // Dropping the connection closes it; no request is in flight.
                        _ = activity.expired(header_timeout, idle_timeout) => {
                            tracing::debug!(%peer, "closing a connection without a request in time");
                        }
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
