//! The graceful end of a listener's connections. hyper's own graceful shutdown closes a
//! connection that has not yet read a request head at once; for a connection accepted just
//! before the stop (its client has sent, or is sending, a webhook the kernel handed over), that
//! drops a request nobody else will answer: with a socket held across restarts (systemd) the
//! next relay would have served it. So each connection, once the stop comes, first gets its
//! first request (within [`FIRST_REQUEST_WAIT`]) and only then ends gracefully: the request in
//! progress is answered, keep-alive is off, an idle connection closes.

use hyper_util::server::graceful::GracefulConnection;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};

/// How long a connection accepted before the stop may take to send its first request head.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Tells a listener's connections to end and waits until they have.
pub(super) struct Drain {
    stop: watch::Sender<bool>,
    open: mpsc::Sender<()>,
    closed: mpsc::Receiver<()>,
}

/// What one connection holds: the stop signal, and its place in the count of open ones.
pub(super) struct Watch {
    stop: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
    first: Arc<First>,
}

/// Whether a connection's first request has arrived (set by its service).
#[derive(Default)]
pub(super) struct First {
    seen: AtomicBool,
    notify: Notify,
}

impl First {
    pub fn mark(&self) {
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    async fn arrived(&self) {
        if !self.seen.load(Ordering::Acquire) {
            // notify_one keeps a permit when nobody waits yet: no lost wake-up.
            self.notify.notified().await;
        }
    }
}

impl Drain {
    pub fn new() -> Drain {
        let (stop, _) = watch::channel(false);
        let (open, closed) = mpsc::channel(1);
        Drain { stop, open, closed }
    }

    /// Taken at accept, before anything else: the stop waits for this connection.
    pub fn watch(&self) -> Watch {
        Watch { stop: self.stop.subscribe(), _open: self.open.clone(), first: Arc::default() }
    }

    /// Asks every connection to end; waits until all have, or `grace` passed (false).
    pub async fn shutdown(self, grace: Duration) -> bool {
        let Drain { stop, open, mut closed } = self;
        let _ = stop.send(true);
        drop(open);
        // None once every connection's sender is gone.
        tokio::time::timeout(grace, closed.recv()).await.is_ok()
    }
}

impl Watch {
    /// The flag the connection's service sets when a request arrives.
    pub fn first(&self) -> Arc<First> {
        self.first.clone()
    }

    /// Serves `conn` until it ends; once the stop comes, lets its first request arrive (within
    /// [`FIRST_REQUEST_WAIT`]), then ends it gracefully.
    pub async fn serve<C>(mut self, conn: C) -> Result<(), C::Error>
    where
        C: GracefulConnection,
    {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = self.stop.wait_for(|s| *s) => {}
        }
        let first = self.first.clone();
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = first.arrived() => {}
            _ = tokio::time::sleep(FIRST_REQUEST_WAIT) => {}
        }
        conn.as_mut().graceful_shutdown();
        conn.await
    }
}

/// A service that marks the connection's first request before handing it on.
#[derive(Clone)]
pub(super) struct Marking<S> {
    pub inner: S,
    pub first: Arc<First>,
}

impl<S, R> hyper::service::Service<R> for Marking<S>
where
    S: hyper::service::Service<R>,
    S::Future: Future,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.first.mark();
        self.inner.call(req)
    }
}
