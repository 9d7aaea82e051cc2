//! The graceful end of a listener's connections. hyper's own graceful shutdown closes a
//! connection that has not yet read a request head at once; for a connection accepted just
//! before the stop (its client has sent, or is sending, a webhook the kernel handed over), that
//! drops a request nobody else will answer: with a socket held across restarts (systemd) the
//! next relay would have served it. So each connection, once the stop comes, first gets its
//! first request (within [`FIRST_REQUEST_WAIT`]) and only then ends gracefully: the request in
//! progress is answered, keep-alive is off, an idle connection closes.

use super::activity::Activity;
use hyper_util::server::graceful::GracefulConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

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
    activity: Arc<Activity>,
}

impl Drain {
    pub fn new() -> Drain {
        let (stop, _) = watch::channel(false);
        let (open, closed) = mpsc::channel(1);
        Drain { stop, open, closed }
    }

    /// Taken at accept, before anything else: the stop waits for this connection.
    pub fn watch(&self, activity: Arc<Activity>) -> Watch {
        Watch { stop: self.stop.subscribe(), _open: self.open.clone(), activity }
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
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = self.activity.arrived() => {}
            _ = tokio::time::sleep(FIRST_REQUEST_WAIT) => {}
        }
        conn.as_mut().graceful_shutdown();
        conn.await
    }
}
