//! Accepting connections: binding a listener, serving it on one thread per core (public
//! listeners, connections spread evenly over the threads by [`Balance`]) or on the main
//! runtime (admin), HTTP/1.1 and HTTP/2 on each connection (by ALPN
//! on https, by prior knowledge on plain http), the caps on open connections, the deadlines of
//! a connection (its first bytes, TLS handshake included, within `header_timeout`; closed after
//! `idle_timeout` without a request), and the graceful end of open connections within
//! `shutdown_grace`.

use super::ServeError;
use super::activity::{Activity, Tracked};
use super::admission::{Admission, Ticket};
use super::balance::{Balance, Counted, Handoff, Placed};
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

/// Serves a public listener on `threads` threads (one per core), each with its own
/// single-threaded runtime accepting from the same socket: a connection, its requests and the
/// upstream connections they use (`Upstream::client` is per thread) stay on one thread, with no
/// work-stealing or cross-thread wake-ups on the request path. New connections are spread
/// evenly over the threads ([`Balance`]). Everything else (admin, queue, reload, signals)
/// stays on the main runtime. Each thread ends after its connections drained (see
/// [`accept_loop`]); the join is added to `tasks`.
#[allow(clippy::too_many_arguments)] // each is one listener's own; a struct would only rename them
pub(super) fn serve_per_core<F, S>(
    tasks: &mut tokio::task::JoinSet<()>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    serve: F,
    stop: watch::Receiver<bool>,
    limits: Limits,
    admission: Arc<Admission>,
    threads: usize,
) -> Result<(), ServeError>
where
    F: Fn(SocketAddr) -> S + Clone + Send + 'static,
    S: Handler,
{
    let setup = |e: std::io::Error| ServeError::Setup(format!("cannot start a serving thread: {e}"));
    let shared = listener.into_std().map_err(setup)?;
    for (i, share) in Balance::shares(threads).into_iter().enumerate() {
        let socket = shared.try_clone().map_err(setup)?;
        let (tls, serve, stop, admission) = (tls.clone(), serve.clone(), stop.clone(), admission.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup)?;
        let thread = std::thread::Builder::new()
            .name(format!("serve-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => accept_loop(listener, tls, serve, stop, limits, admission, Some(share)).await,
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
    mut balance: Option<Balance>,
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
    // Serves one connection in its own task until it ends, holding its admission ticket and
    // its place in the thread's count.
    let spawn = |stream: tokio::net::TcpStream, peer: SocketAddr, ticket: Ticket, counted: Option<Counted>| {
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        // Taken now, so a shutdown that starts during the handshake still waits for this
        // connection (and ends it gracefully once its first request is served).
        let watcher = drain.watch(activity.clone());
        let service = Tracked { inner: serve(peer), activity: activity.clone() };
        let (builder, tls) = (builder.clone(), tls.clone());
        tokio::spawn(async move {
            let _held = (ticket, counted);
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
    };
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
                match &balance {
                    None => spawn(stream, peer, ticket, None),
                    Some(b) => match b.place(stream, peer, ticket) {
                        Placed::Here(stream, ticket, counted) => spawn(stream, peer, ticket, Some(counted)),
                        Placed::Moved => {}
                    },
                }
            }
            Some((h, counted)) = taken_over(&mut balance) => take_over(h, counted, &spawn),
            _ = stop.changed() => break,
        }
    }
    // Connections other threads handed over before the stop are served like those accepted
    // here; any handed over later go back to their sender.
    let left = match balance.as_mut() {
        Some(b) => b.close().await,
        None => Vec::new(),
    };
    for (h, counted) in left {
        take_over(h, counted, &spawn);
    }
    drop(listener);
    if !drain.shutdown(grace).await {
        tracing::warn!("shutdown_grace ({grace:?}) passed with connections still open; closing them");
    }
}

/// The next connection another serving thread handed over; never ready without a [`Balance`].
async fn taken_over(balance: &mut Option<Balance>) -> Option<(Handoff, Counted)> {
    match balance {
        Some(b) => b.taken_over().await,
        None => std::future::pending().await,
    }
}

/// Serves a connection another thread accepted, on this thread's reactor.
fn take_over(
    h: Handoff,
    counted: Counted,
    spawn: &impl Fn(tokio::net::TcpStream, SocketAddr, Ticket, Option<Counted>),
) {
    let Handoff { stream, peer, ticket } = h;
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => spawn(stream, peer, ticket, Some(counted)),
        Err(e) => tracing::debug!(%peer, "could not serve a connection handed over: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections opened at once end up within one of even on the serving threads, however
    /// the kernel hands them out, and each is answered by the thread it was placed on.
    #[tokio::test]
    async fn connections_opened_at_once_are_spread_over_the_serving_threads() {
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let admission = Admission::new("test", 1000, 1000, vec![], &Metrics::new());
        let limits = Limits {
            grace: Duration::from_secs(1),
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
        };
        let (stop_tx, stop) = watch::channel(false);
        let serve = |_peer: SocketAddr| {
            hyper::service::service_fn(|_req| async {
                let thread = std::thread::current().name().unwrap_or("?").to_string();
                Ok::<_, Infallible>(crate::http_util::text(http::StatusCode::OK, "text/plain", thread))
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        serve_per_core(&mut tasks, listener, None, serve, stop, limits, admission, 3).unwrap();

        // All connected before any request: where each is served is settled at accept.
        let mut conns = Vec::new();
        for _ in 0..12 {
            conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut served = std::collections::BTreeMap::<String, usize>::new();
        for c in &mut conns {
            c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            // Read until the body ("serve-N") is in.
            let (mut answer, mut buf) = (Vec::new(), [0; 1024]);
            let (answer, thread) = loop {
                let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap();
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&answer).to_string();
                if let Some((_, body)) = text.split_once("\r\n\r\n").filter(|(_, b)| b.len() >= "serve-0".len()) {
                    break (text.clone(), body.to_string());
                }
            };
            assert!(thread.starts_with("serve-"), "{answer}");
            *served.entry(thread).or_default() += 1;
        }
        assert_eq!(served.len(), 3, "{served:?}");
        assert!(served.values().all(|&n| (3..=5).contains(&n)), "{served:?}");

        drop(conns);
        stop_tx.send(true).unwrap();
        while tasks.join_next().await.is_some() {}
    }
}
