//! Spreading a public listener's connections evenly over its serving threads. They all accept
//! from one socket, and which thread the kernel wakes for each new connection is not even: a
//! client that opens all its keep-alive connections at once (a provider, a load balancer) could
//! end up with all of them on one thread, serving on one core while the others idle. So a
//! thread that accepts a connection while holding more than the least loaded one (by more than
//! [`SLACK`]) hands it over, before its TLS handshake or first request.
//!
//! Each thread counts the connections it is serving, taken over ones included; a handed-over
//! connection counts for the thread it goes to from the moment it is sent.

use super::admission::Ticket;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// How many more connections than the least loaded thread a thread keeps before it hands new
/// ones over: one, so a burst settles within one connection of even, and a lone connection
/// never moves.
const SLACK: usize = 1;

/// A connection accepted on one thread, on its way to another. The std stream, since a tokio
/// one is registered with the accepting thread's reactor.
pub(super) struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub ticket: Ticket,
}

/// One serving thread's share of a listener: its own count and inbox, and the others'.
pub(super) struct Balance {
    me: usize,
    counts: Arc<[AtomicUsize]>,
    inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
}

/// Counts a connection for a thread until dropped (when its task ends).
pub(super) struct Counted {
    counts: Arc<[AtomicUsize]>,
    thread: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counts[self.thread].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an accepted connection is served.
pub(super) enum Placed {
    Here(tokio::net::TcpStream, Ticket, Counted),
    /// Handed over (the connection is the other thread's now), or lost on the way (closed).
    Moved,
}

impl Balance {
    /// One share per serving thread, in thread order.
    pub fn shares(threads: usize) -> Vec<Balance> {
        let counts: Arc<[AtomicUsize]> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[_]> = senders.into();
        receivers
            .into_iter()
            .enumerate()
            .map(|(me, inbox)| Balance { me, counts: counts.clone(), inboxes: inboxes.clone(), inbox })
            .collect()
    }

    /// Counts a connection this thread serves (accepted here or taken over).
    pub fn count_here(&self) -> Counted {
        self.counts[self.me].fetch_add(1, Ordering::Relaxed);
        self.counted()
    }

    /// The count of a connection handed to this thread: raised by the sender already.
    fn counted(&self) -> Counted {
        Counted { counts: self.counts.clone(), thread: self.me }
    }

    /// Keeps a connection accepted here, or hands it to the least loaded thread when this one
    /// holds more than [`SLACK`] connections over it. A thread that has stopped taking them
    /// gives the connection back, and it stays here.
    pub fn place(&self, stream: tokio::net::TcpStream, peer: SocketAddr, ticket: Ticket) -> Placed {
        let load = |i: usize| self.counts[i].load(Ordering::Relaxed);
        let mine = load(self.me);
        // A thread that stopped taking connections (ended, or shutting down) is no target.
        let open = |i: usize| i != self.me && !self.inboxes[i].is_closed();
        let least = (0..self.counts.len()).filter(|&i| open(i)).min_by_key(|&i| load(i));
        let Some(to) = least.filter(|&i| load(i) + SLACK < mine) else {
            return Placed::Here(stream, ticket, self.count_here());
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%peer, "could not hand a connection to another thread: {e}");
                return Placed::Moved;
            }
        };
        self.counts[to].fetch_add(1, Ordering::Relaxed);
        let Err(back) = self.inboxes[to].send(Handoff { stream, peer, ticket }) else {
            return Placed::Moved;
        };
        self.counts[to].fetch_sub(1, Ordering::Relaxed);
        let Handoff { stream, ticket, .. } = back.0;
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => Placed::Here(stream, ticket, self.count_here()),
            Err(e) => {
                tracing::debug!(%peer, "could not serve a connection given back: {e}");
                Placed::Moved
            }
        }
    }

    /// The next connection another thread handed to this one (already counted here).
    pub async fn taken_over(&mut self) -> Option<(Handoff, Counted)> {
        let h = self.inbox.recv().await?;
        Some((h, self.counted()))
    }

    /// Stops taking connections over and returns those already sent (to be served, so a
    /// connection accepted before the stop is not dropped unanswered); later hand-overs come
    /// back to their sender. Waits for a send already past the closed check: `recv` ends only
    /// once none is in flight, where `try_recv` could miss one.
    pub async fn close(&mut self) -> Vec<(Handoff, Counted)> {
        self.inbox.close();
        let mut left = Vec::new();
        while let Some(h) = self.inbox.recv().await {
            left.push((h, self.counted()));
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::server::admission::Admission;

    /// A loopback listener to accept real connections from, and an admission to count them.
    async fn setup() -> (tokio::net::TcpListener, Arc<Admission>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (listener, Admission::new("test", 100, 100, vec![], &Metrics::new()))
    }

    /// Accepts a new connection and offers it to `share`.
    async fn place(
        share: &Balance,
        listener: &tokio::net::TcpListener,
        admission: &Arc<Admission>,
    ) -> (Placed, SocketAddr) {
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        (share.place(stream, peer, admission.admit(peer.ip()).unwrap()), peer)
    }

    #[tokio::test]
    async fn a_connection_goes_to_the_least_loaded_thread_and_stays_when_the_others_stopped() {
        let (listener, admission) = setup().await;
        let mut shares = Balance::shares(3);
        let kept: Vec<_> = (0..2).map(|_| shares[0].count_here()).collect();
        let one = shares[1].count_here();

        // Thread 0 holds 2, thread 1 holds 1 and thread 2 none: thread 2 gets it.
        let (placed, peer) = place(&shares[0], &listener, &admission).await;
        assert!(matches!(placed, Placed::Moved));
        let (h, counted) = shares[2].taken_over().await.unwrap();
        assert_eq!(h.peer, peer);
        assert_eq!(shares[0].counts.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(), [2, 1, 1]);

        // Thread 1 and 2 have stopped taking connections: it stays on thread 0.
        assert!(shares[2].close().await.is_empty());
        let pending = shares.remove(1);
        drop(pending); // a thread that ended
        let (placed, _) = place(&shares[0], &listener, &admission).await;
        assert!(matches!(placed, Placed::Here(..)));
        drop((kept, one, counted));
    }

    #[tokio::test]
    async fn close_hands_back_what_was_sent_before_and_refuses_what_comes_after() {
        let (listener, admission) = setup().await;
        let mut shares = Balance::shares(2);
        let busy: Vec<_> = (0..3).map(|_| shares[0].count_here()).collect();
        let (placed, peer) = place(&shares[0], &listener, &admission).await;
        assert!(matches!(placed, Placed::Moved));

        let left = shares[1].close().await;
        assert_eq!(left.len(), 1, "sent before the stop: served by the thread it went to");
        assert_eq!(left[0].0.peer, peer);
        let (placed, _) = place(&shares[0], &listener, &admission).await;
        assert!(matches!(placed, Placed::Here(..)), "after the stop: kept by the thread that accepted it");
        drop((busy, left));
        assert_eq!(shares[0].counts[1].load(Ordering::Relaxed), 0, "counts given back");
    }
}
