//! What a connection is doing, for its deadlines: whether its first request has arrived, how
//! many requests are in flight (until their response bodies end, so a long stream such as the
//! board's counts as busy) and since when it has had none. A connection that sends nothing (not
//! even a whole TLS handshake or HTTP/2 preface) is closed `header_timeout` after `accept`; one
//! with no request in flight, `idle_timeout` after its last one ended. hyper's own timers do
//! not cover these: its header timeout starts only once HTTP/1 has been chosen, and HTTP/2
//! has no idle timeout at all.

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
            first: Notify::new(),
            quiet: Notify::new(),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.first.notify_one();
        }
        InFlight(self.clone())
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
    pub async fn expired(&self, first: Duration, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // A permit is kept if the count drops between the load and this wait.
                self.quiet.notified().await;
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

/// One request in flight, from its arrival to the end (or drop) of its response body.
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
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
        let guard = this.guard.take();
        Poll::Ready(Ok(resp.map(|inner| Counted { inner, _guard: guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is done with.
    pub(super) struct Counted<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
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

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_it_open_and_idle_counts_from_its_end() {
        let a = Activity::new();
        let guard = a.begin();
        let expiry = tokio::spawn({
            let a = a.clone();
            async move { a.expired(FIRST, IDLE).await }
        });
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!expiry.is_finished(), "busy for two minutes, still open");
        drop(guard);
        let ended = tokio::time::Instant::now();
        expiry.await.unwrap();
        assert_eq!(ended.elapsed().as_secs(), 60);
    }
}
