//! The durable queue: what `queue` mode does after verification. An accepted event is appended
//! through group commit (synced before the provider is acknowledged) and handed to its Motion's
//! scheduler, which delivers per-conversation in order and retries until Motion takes it.
//!
//! Owns: one scheduler per Motion, created at start (from what the store still holds), on
//! reload and on a new Motion's first event, and ended once its Motion is gone from the config
//! and it holds nothing; the per-Motion depth read on the request path for `max_queued` (an
//! atomic, no lock).
//!
//! Takes from the rest of the relay only a [`DeliveryContext`]: the routing snapshot (each
//! Motion's URL, client and delivery settings), the metrics and the clock.
//!
//! With a store other relays share, it schedules only what the store's [`Leases`] grant this
//! relay, and follows the store's news: events other relays stored (announced, and looked for
//! every second in case an announcement was missed) and changed leases (a full look).

pub mod ops;
pub mod retry;
mod scheduler;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::routing::Snapshots;
use crate::store::{Appended, EventMeta, GroupCommit, Leases, NewEvent, News, QueueStore, StoreError};
use arc_swap::ArcSwap;
pub use scheduler::DirectAnswer;
use scheduler::MotionQueue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::oneshot;

/// One Motion's queue as the board shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MotionStatus {
    pub depth: u64,
    pub bytes: u64,
    /// Since when its deliveries fail (Unix ms); None while they go through.
    pub failing_since_unix_ms: Option<u64>,
    pub last_errors: Vec<scheduler::LastError>,
    /// `(account, events waiting, oldest acceptance in Unix ms)`; empty past 100,000 waiting.
    pub accounts: Vec<(String, u64, u64)>,
}

/// What a delivery needs: where each Motion is and how to reach it (the current snapshot),
/// the metrics it counts into, and "now".
pub struct DeliveryContext {
    pub snapshots: Arc<Snapshots>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
}

/// How long shutdown waits, in all, for the schedulers to prune what they delivered: a store
/// that hangs must not hold the exit forever (worst case, a few delivered events are delivered
/// again after the restart).
const STOP_WAIT: Duration = Duration::from_secs(5);

pub struct Queue {
    store: Arc<dyn QueueStore>,
    leases: Arc<dyn Leases>,
    /// Every waiting event up to this seq has been handed to its scheduler (u64::MAX when no
    /// other relay shares the store); what new schedulers start from.
    seen: std::sync::atomic::AtomicU64,
    /// The lease epoch `seen` was reached in.
    seen_epoch: std::sync::atomic::AtomicU64,
    /// Asks `follow` to look at the store now (an event was stored here: events stored just
    /// before it elsewhere must be handed over before it goes).
    poke: Arc<tokio::sync::Notify>,
    commit: GroupCommit,
    motions: ArcSwap<HashMap<String, MotionQueue>>,
    // Serialises creation of schedulers only (start, reload, first event of a new Motion).
    create: Mutex<()>,
    ctx: Arc<DeliveryContext>,
    /// The runtime `start` ran on, where every scheduler lives.
    runtime: tokio::runtime::Handle,
    /// `auto` requests waiting for their event's first attempt, by delivery id (handed to the
    /// scheduler with the event once it is stored).
    waiters: Mutex<HashMap<String, scheduler::Waiter>>,
    /// With a shared store: every relay's waiting events and bytes per Motion, as last
    /// counted (see [`count_cluster`]); `max_queued` holds for the cluster, not per relay.
    cluster_waiting: ArcSwap<HashMap<String, (u64, u64)>>,
}

/// How often a relay on a shared store counts the cluster's waiting events. Between counts a
/// Motion may pass `max_queued` by what the relays accept in that time.
const CLUSTER_COUNT_EVERY: Duration = Duration::from_secs(1);

impl Queue {
    /// Opens the queue over `store` and resumes every event it still holds, in order. Runs its
    /// schedulers on the current runtime.
    pub fn start(ctx: Arc<DeliveryContext>, store: Arc<dyn QueueStore>) -> Result<Arc<Queue>, StoreError> {
        let queue = Arc::new_cyclic(|me: &Weak<Queue>| {
            let me = me.clone();
            // Scheduling happens on the writer thread, in commit order, as part of the commit:
            // a request that goes away while its event is being synced cannot strand the event,
            // and two events of one conversation reach the scheduler in the order they were stored.
            let on_commit: crate::store::group_commit::OnCommit = Box::new(move |events, results| {
                if let Some(q) = me.upgrade() {
                    q.schedule_stored(events, results);
                }
            });
            Queue {
                commit: GroupCommit::with_hook(store.clone(), on_commit),
                leases: store.leases(),
                seen: std::sync::atomic::AtomicU64::new(u64::MAX),
                seen_epoch: std::sync::atomic::AtomicU64::new(0),
                poke: Default::default(),
                store,
                motions: ArcSwap::from_pointee(HashMap::new()),
                create: Mutex::new(()),
                ctx: ctx.clone(),
                runtime: tokio::runtime::Handle::current(),
                waiters: Mutex::new(HashMap::new()),
                cluster_waiting: ArcSwap::from_pointee(HashMap::new()),
            }
        });
        let news = queue.leases.news();
        let epoch = news.as_ref().map_or(0, |n| n.borrow().epoch);
        let (top, pending) = match news {
            Some(_) => queue.store.pending_after(0)?,
            None => (0, queue.store.pending()?),
        };
        let resumed = pending.len();
        if news.is_some() {
            queue.seen.store(top, std::sync::atomic::Ordering::Release);
            queue.seen_epoch.store(epoch, std::sync::atomic::Ordering::Release);
        }
        for meta in pending {
            queue.enqueue(meta, None, None);
        }
        for m in ctx.snapshots.load().table.motions() {
            queue.motion(&m.motion.name);
        }
        if resumed > 0 {
            tracing::info!(events = resumed, "resuming undelivered events from the store");
        }
        tokio::spawn(prune_dedup(Arc::downgrade(&queue)));
        if let Some(news) = news {
            tokio::spawn(follow(Arc::downgrade(&queue), news, top));
            tokio::spawn(count_cluster(Arc::downgrade(&queue)));
        }
        Ok(queue)
    }

    /// The relays sharing the store and what each holds (None: this relay alone).
    pub fn cluster(&self) -> Option<crate::store::Cluster> {
        self.leases.cluster()
    }

    pub fn store(&self) -> &Arc<dyn QueueStore> {
        &self.store
    }

    pub fn context(&self) -> &Arc<DeliveryContext> {
        &self.ctx
    }

    /// The scheduler of a Motion, created on first use (or again, after the last one ended).
    fn motion(&self, name: &str) -> MotionQueue {
        if let Some(m) = self.motions.load().get(name).filter(|m| m.running()) {
            return m.clone();
        }
        let _guard = self.create.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.motions.load_full();
        if let Some(m) = current.get(name).filter(|m| m.running()) {
            return m.clone();
        }
        let m = MotionQueue::spawn(
            &self.runtime,
            name.to_string(),
            self.ctx.clone(),
            self.store.clone(),
            self.leases.clone(),
            (
                self.seen.load(std::sync::atomic::Ordering::Acquire),
                self.seen_epoch.load(std::sync::atomic::Ordering::Acquire),
            ),
        );
        let mut next = (*current).clone();
        next.insert(name.to_string(), m.clone());
        self.motions.store(Arc::new(next));
        m
    }

    /// Events waiting for a Motion.
    pub fn depth(&self, motion: &str) -> u64 {
        self.waiting(motion).0
    }

    /// Events and bytes waiting for a Motion, in one lookup (the request path's limits).
    pub fn waiting(&self, motion: &str) -> (u64, u64) {
        let here = self.motions.load().get(motion).map_or((0, 0), |m| (m.depth().events(), m.depth().bytes()));
        // What this relay holds is counted now, the cluster's as of its last count.
        match self.cluster_waiting.load().get(motion) {
            Some(&(events, bytes)) => (here.0.max(events), here.1.max(bytes)),
            None => here,
        }
    }

    /// Durably appends `events` (one atomic write); the stored ones are scheduled as part of
    /// the commit (see `start`).
    pub async fn accept(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        self.commit.append(events).await
    }

    /// `auto` mode: stores the event like [`accept`](Self::accept) and lets the caller wait for
    /// Motion's answer to its first attempt. The receiver yields nothing (is closed) when the
    /// event must wait its turn (its conversation has events waiting) or the attempt did not
    /// deliver it; the event then stays queued. Storing first keeps "a 2xx means it is on
    /// disk" true on both paths.
    pub async fn accept_waiting(
        &self,
        ev: NewEvent,
    ) -> Result<(Appended, oneshot::Receiver<DirectAnswer>), StoreError> {
        let (tx, rx) = oneshot::channel();
        let id = ev.delivery_id.clone();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), tx);
        // Taken by `schedule_stored` when stored; anything left here was not, and goes when
        // this returns, or when the request is cancelled midway (the guard's drop).
        let _forget = ForgetWaiter { queue: self, id };
        let result = self.commit.append(vec![ev]).await;
        let appended = result?.pop().ok_or(StoreError::Closed)?;
        Ok((appended, rx))
    }

    /// Hands freshly stored events to their schedulers (writer thread, commit order).
    fn schedule_stored(&self, events: Vec<NewEvent>, results: &[Appended]) {
        if self.seen.load(std::sync::atomic::Ordering::Acquire) != u64::MAX {
            self.poke.notify_one();
        }
        for (ev, r) in events.into_iter().zip(results) {
            let waiter = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&ev.delivery_id);
            if let Appended::Stored(seq) = r {
                let meta = EventMeta::of(*seq, 0, &ev);
                self.enqueue(meta, Some(Arc::new(ev)), waiter);
            }
        }
    }

    /// Hands a stored event to its Motion's scheduler if this relay holds its conversation
    /// (its holder hears of it from the store otherwise; an `auto` waiter is then answered with
    /// the acknowledgement, by dropping it).
    fn enqueue(&self, meta: EventMeta, cached: Option<Arc<NewEvent>>, waiter: Option<scheduler::Waiter>) {
        if self.leases.holds(&meta.motion, &meta.conversation) {
            let mut event = scheduler::Refused { meta, cached, waiter };
            // A scheduler that just ended gives the event back: the next one takes it.
            for _ in 0..3 {
                match self.motion(&event.meta.motion).enqueue(event.meta, event.cached, event.waiter) {
                    Ok(()) => return,
                    Err(back) => event = *back,
                }
            }
            tracing::error!(motion = %event.meta.motion, delivery = %event.meta.delivery_id, "no scheduler took the event; it is delivered after a restart");
        }
    }

    /// Schedules an event that is already stored (a replayed dead letter).
    pub fn schedule(&self, meta: EventMeta) {
        self.enqueue(meta, None, None);
    }

    /// After a reload: creates schedulers for Motions it added and forgets those that ended
    /// (a removed Motion's scheduler ends by itself once it holds nothing).
    pub fn sync_motions(&self, names: impl Iterator<Item = String>) {
        for n in names {
            self.motion(&n);
        }
        let _guard = self.create.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.motions.load_full();
        if current.values().any(|m| !m.running()) {
            let live = current.iter().filter(|(_, m)| m.running()).map(|(k, m)| (k.clone(), m.clone())).collect();
            self.motions.store(Arc::new(live));
        }
    }

    /// A Motion's waiting events and delivery health (None: it has no scheduler).
    pub fn status(&self, motion: &str) -> Option<MotionStatus> {
        let motions = self.motions.load();
        let m = motions.get(motion)?;
        Some(MotionStatus {
            depth: m.depth().events(),
            bytes: m.depth().bytes(),
            failing_since_unix_ms: m.health().failing_since(),
            last_errors: m.health().last_errors(),
            accounts: m.health().accounts(),
        })
    }

    /// The Motions with a running scheduler.
    pub fn scheduled_motions(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.motions.load().iter().filter(|(_, m)| m.running()).map(|(k, _)| k.clone()).collect();
        names.sort();
        names
    }

    /// Stops the schedulers and makes everything durable. Events not delivered stay stored.
    /// Every scheduler is told at once, and all of them together get [`STOP_WAIT`].
    pub fn shutdown(&self) {
        let stopping: Vec<_> = self.motions.load().values().map(|m| m.stop()).collect();
        let deadline = std::time::Instant::now() + STOP_WAIT;
        for heard in stopping {
            let _ = heard.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        self.commit.close();
        if let Err(e) = self.store.sync() {
            tracing::error!("final store sync failed: {e}");
        }
        // Nothing is in flight any more: the other relays may take over at once.
        self.leases.release();
    }
}

/// Follows a shared store: events other relays stored for conversations this relay holds, and
/// changed leases (then every scheduler drops what it lost and the whole queue is looked at
/// again for what it gained). `seen` is the seq up to which the store was looked at.
async fn follow(queue: Weak<Queue>, mut news: tokio::sync::watch::Receiver<News>, mut seen: u64) {
    let mut last = *news.borrow_and_update();
    let Some(poke) = queue.upgrade().map(|q| q.poke.clone()) else { return };
    loop {
        // Announcements and this relay's own appends wake it at once; the timeout covers an
        // announcement that was missed.
        tokio::select! {
            changed = news.changed() => if changed.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            },
            _ = poke.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Some(q) = queue.upgrade() else { return };
        let now = *news.borrow_and_update();
        let full = now.epoch != last.epoch;
        if full {
            for m in q.motions.load().values() {
                m.leases_changed();
            }
        }
        let store = q.store.clone();
        let after = if full { 0 } else { seen };
        match tokio::task::spawn_blocking(move || store.pending_after(after)).await {
            Ok(Ok((top, metas))) => {
                last = now;
                seen = seen.max(top);
                for meta in metas {
                    q.enqueue(meta, None, None);
                }
                // After what it handed over, in each scheduler's order of messages.
                q.seen.store(seen, std::sync::atomic::Ordering::Release);
                q.seen_epoch.store(now.epoch, std::sync::atomic::Ordering::Release);
                for m in q.motions.load().values() {
                    m.seen(seen, now.epoch);
                }
            }
            Ok(Err(e)) => tracing::debug!("could not look at the shared queue: {e}"),
            Err(_) => {}
        }
    }
}

/// Counts a shared store's waiting events per Motion every [`CLUSTER_COUNT_EVERY`], for
/// `max_queued` and `max_queued_bytes` (each relay holds only its conversations' events). A
/// failed count keeps the last one: the store's own outage answers 503 anyway.
async fn count_cluster(queue: Weak<Queue>) {
    let mut every = tokio::time::interval(CLUSTER_COUNT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(q) = queue.upgrade() else { return };
        let store = q.store.clone();
        drop(q);
        match tokio::task::spawn_blocking(move || store.waiting_by_motion()).await {
            Ok(Ok(Some(counts))) => match queue.upgrade() {
                Some(q) => q.cluster_waiting.store(Arc::new(counts)),
                None => return,
            },
            Ok(Ok(None)) => return,
            Ok(Err(e)) => tracing::debug!("could not count the shared queue: {e}"),
            Err(_) => {}
        }
    }
}

/// Deletes expired dedup keys, a slice of the table a minute, for as long as the queue lives, so
/// the dedup table holds about one `dedup_window` of keys (plus one sweep's time) and no more.
async fn prune_dedup(queue: Weak<Queue>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every.tick().await;
        let Some(q) = queue.upgrade() else { return };
        let store = q.store.clone();
        let now = q.ctx.clock.now_unix_ms();
        drop(q);
        match tokio::task::spawn_blocking(move || store.prune_dedup(now)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(pruned = n, "expired dedup keys deleted"),
            Ok(Err(e)) => tracing::warn!("could not prune dedup keys: {e}"),
            _ => {}
        }
    }
}

/// Removes an `auto` request's waiter from [`Queue::waiters`] when dropped.
struct ForgetWaiter<'a> {
    queue: &'a Queue,
    id: String,
}

impl Drop for ForgetWaiter<'_> {
    fn drop(&mut self) {
        self.queue.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
