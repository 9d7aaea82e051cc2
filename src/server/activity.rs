//! What a connection is doing, for its deadlines: whether its first request has arrived, how
//! many requests are in flight (until their response bodies end, so a long stream such as the
//! board's counts as busy) and since when it has had none. A connection that sends nothing (not
//! even a whole TLS handshake or HTTP/2 preface) is closed `header_timeout` after `accept`; one
//! with no request in flight, `idle_timeout` after its last one ended. hyper's own timers do
//! not cover these: its header timeout starts only once HTTP/1 has been chosen, and HTTP/2
//! has no idle timeout at all.
//!
//! A request stays in flight until the client has taken its response, so a client that never
//! takes it (HTTP/2 with its flow-control window left at zero, an HTTP/1 client that stops
//! reading) would hold the connection, and its memory, for good. So the responses waiting on
//! the client are counted too: while any is, and no response body of the connection has moved
//! for `idle_timeout`, the connection is closed. A body waiting on the relay (the board's
//! stream between two events) is not waiting on the client.

use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
// tokio's clock, so the tests can pause it.
use tokio::time::Instant;

pub(super) struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `born` to the end of the last request.
    idle_since: AtomicU64,
    seen: AtomicBool,
    /// Responses handed to hyper whose next move is the client's (see [`InFlight::moved`]).
    client_turn: AtomicUsize,
    /// Milliseconds from `born` to the last move of a response body.
    moved: AtomicU64,
    /// The first request arrived.
    first: Notify,
    /// The requests in flight went down to none.
    quiet: Notify,
}

impl Activity {
    /// Taken at `accept`: the first-bytes deadline counts from here.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            seen: AtomicBool::new(false),
            client_turn: AtomicUsize::new(0),
            moved: AtomicU64::new(0),
            first: Notify::new(),
            quiet: Notify::new(),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.first.notify_one();
        }
        InFlight { activity: self.clone(), on_client: false }
    }

    /// Resolves once the first request has arrived.
    pub async fn arrived(&self) {
        if !self.seen.load(Ordering::Acquire) {
            // notify_one keeps a permit when nobody waits yet: no lost wake-up.
            self.first.notified().await;
        }
    }

    /// Resolves when the connection has gone without a request for too long: `first` from
    /// `accept` while none has arrived, `idle` from the end of the last one after that.
    /// With requests in flight, it resolves once a response has waited on the client and no
    /// response body has moved for `idle` (see the module's documentation).
    pub async fn expired(&self, first: Duration, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                let stalled_at = (self.client_turn.load(Ordering::Acquire) > 0)
                    .then(|| self.born + Duration::from_millis(self.moved.load(Ordering::Acquire)) + idle);
                if stalled_at.is_some_and(|at| Instant::now() >= at) {
                    return;
                }
                // A permit is kept if the count drops between the load and this wait. Woken
                // every `idle` meanwhile: a response may start waiting on the client.
                let wake = stalled_at.unwrap_or_else(|| Instant::now() + idle);
                tokio::select! {
                    _ = self.quiet.notified() => {}
                    _ = tokio::time::sleep_until(wake) => {}
                }
                continue;
            }
            let limit = if self.seen.load(Ordering::Acquire) { idle } else { first };
            let deadline = self.born + Duration::from_millis(self.idle_since.load(Ordering::Acquire)) + limit;
            if Instant::now() >= deadline {
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                continue;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request in flight, from its arrival to the end (or drop) of its response body, and
/// whether its response's next move is the client's: from when it is handed to hyper until
/// hyper asks for a frame it does not have yet (the relay's move: `Pending`), again from each
/// frame it takes until it asks for the next, and no longer once it ended or is dropped.
pub(super) struct InFlight {
    activity: Arc<Activity>,
    on_client: bool,
}

impl InFlight {
    fn moved(&mut self, on_client: bool) {
        let a = &self.activity;
        a.moved.store(a.born.elapsed().as_millis() as u64, Ordering::Release);
        if on_client != std::mem::replace(&mut self.on_client, on_client) {
            if on_client {
                a.client_turn.fetch_add(1, Ordering::AcqRel);
            } else {
                a.client_turn.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.moved(false);
        let a = &self.activity;
        a.idle_since.store(a.born.elapsed().as_millis() as u64, Ordering::Release);
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.quiet.notify_one();
        }
    }
}

/// The connection's service: counts each request in flight until its response body ends.
#[derive(Clone)]
pub(super) struct Tracked<S> {
    pub inner: S,
    pub activity: Arc<Activity>,
}

impl<S, R, B> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R, Response = http::Response<B>>,
{
    type Response = http::Response<Counted<B>>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        let guard = self.activity.begin();
        Answer { inner: self.inner.call(req), guard: Some(guard) }
    }
}

pin_project_lite::pin_project! {
    /// The answer being computed; hands its [`InFlight`] on to the body.
    pub(super) struct Answer<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let mut guard = this.guard.take();
        if let Some(g) = &mut guard {
            g.moved(true); // handed over
        }
        Poll::Ready(Ok(resp.map(|inner| Counted { inner, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is done with.
    pub(super) struct Counted<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Some(g) = this.guard {
            g.moved(matches!(polled, Poll::Ready(Some(Ok(_)))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn nothing_sent_expires_after_the_first_bytes_deadline() {
        let a = Activity::new();
        let start = tokio::time::Instant::now();
        a.expired(FIRST, IDLE).await;
        assert_eq!(start.elapsed().as_secs(), 10);
    }

    /// A connection with a request in flight, and its expiry running, both busy for two minutes.
    async fn busy_for_two_minutes() -> (InFlight, tokio::task::JoinHandle<()>) {
        let a = Activity::new();
        let guard = a.begin();
        let expiry = tokio::spawn(async move { a.expired(FIRST, IDLE).await });
        // Waiting on the relay (the answer is being made, or a stream has nothing to send).
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!expiry.is_finished(), "busy for two minutes, still open");
        (guard, expiry)
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_does_not_take_expires_after_idle() {
        let (mut guard, expiry) = busy_for_two_minutes().await;
        // Handed over, and never asked for a frame.
        let started = tokio::time::Instant::now();
        guard.moved(true);
        expiry.await.unwrap();
        assert_eq!(started.elapsed().as_secs(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_it_open_and_idle_counts_from_its_end() {
        let (guard, expiry) = busy_for_two_minutes().await;
        drop(guard);
        let ended = tokio::time::Instant::now();
        expiry.await.unwrap();
        assert_eq!(ended.elapsed().as_secs(), 60);
    }
}
